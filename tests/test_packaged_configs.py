"""`hilbert demo` from any folder: the demo's configs ship inside the package, and tune/ links to
them, so there is one copy of each and a plain (non-editable) install finds them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hilbert.cli import app
from hilbert.configs import DEMO_SWEEP, packaged
from hilbert.sweep.config import load_sweep

REPOSITORY = Path(__file__).resolve().parents[1]
SHIPPED = ("demo.yaml", "train-demo.yaml")


@pytest.mark.parametrize("name", SHIPPED)
def test_the_tune_file_users_edit_is_the_shipped_config(name):
    assert os.path.samefile(REPOSITORY / "tune" / name, packaged(name))


def test_the_shipped_demo_sweep_reads_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(packaged(DEMO_SWEEP))
    assert sweep.base_config is not None
    # Its paths stay relative: `hilbert demo` writes hilbert-demo/ where it runs.
    assert sweep.base_config.data.manifest == "hilbert-demo/corpus/development.jsonl"
    assert not Path(sweep.base_config.output_dir).is_absolute()


def test_an_unknown_config_is_refused_by_name():
    with pytest.raises(FileNotFoundError, match="no config 'nope.yaml'"):
        packaged("nope.yaml")


def test_demo_with_a_missing_sweep_file_says_which(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo", "--sweep", "elsewhere.yaml"])
    assert result.exit_code == 2 and "elsewhere.yaml" in result.output, result.output
    assert not (tmp_path / "hilbert-demo").exists()  # refused before writing anything


@pytest.mark.slow
def test_a_built_wheel_ships_the_configs_and_finds_them_outside_the_repository(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(tmp_path / "dist"), str(REPOSITORY)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hilbert-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for name in SHIPPED:
            assert archive.read(f"hilbert/configs/{name}") == (REPOSITORY / "tune" / name).read_bytes()
    # Installed as plain files (no link to this checkout), imported from a folder far from it.
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                                str(tmp_path / "site"), str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("from hilbert.configs import packaged; from hilbert.sweep.config import load_sweep; "
             "path = packaged('demo.yaml'); sweep = load_sweep(path); "
             "print(path); print(sweep.base_config.data.cache_dir)")
    ran = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert ran.returncode == 0, ran.stderr[-3000:]
    path, cache_dir = ran.stdout.split()
    assert Path(path).is_relative_to(tmp_path / "site") and cache_dir == "hilbert-demo/cache"


@pytest.mark.slow
def test_the_readme_main_job_runs_end_to_end_from_any_folder(tmp_path):
    """`hilbert demo` (the shipped sweep, shortened: fewer documents, one trial of two epochs)
    in a folder far from the repository: corpus, validation, extraction, sweep, registration,
    promotion, predictions and the final table, all under ./hilbert-demo."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    in_checkout = (REPOSITORY / "hilbert-demo").exists()
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["COLUMNS"] = "200"  # rich's rules and tables at full width in the captured output
    done = subprocess.run([str(Path(sys.executable).parent / "hilbert"), "demo", "--documents", "60", "--trials", "1",
                           "--epochs", "2"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    demo = elsewhere / "hilbert-demo"
    assert (demo / "corpus" / "manifest.jsonl").is_file() and (demo / "runs" / "mlruns.db").is_file()
    assert (demo / "predictions" / "held_out.parquet").is_file()
    for expected in ("4. sweep: 1 trials", "registered trial-", "held-out documents", "HILBERT champion",
                     "baseline: logreg", "open the MLflow UI"):
        assert expected in output, (expected, output[-3000:])
    assert (REPOSITORY / "hilbert-demo").exists() == in_checkout  # written where it ran, not in the checkout
