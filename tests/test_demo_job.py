"""`run_demo` as a library function: what it refuses before any work starts. (The whole job, end to
end, is test_packaged_configs.py::test_the_readme_main_job_runs_end_to_end_from_any_folder.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import document, write_manifest
from hilbert.config import ConfigError
from hilbert.data.manifest import ManifestError
from hilbert.demo_job import run_demo


def test_an_invalid_corpus_is_refused_with_its_report_before_anything_is_extracted(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_manifest(corpus, [document(f"d{i}", f"audio/d{i}.wav", group=f"s{i}") for i in range(5)])
    headings, lines, validated = [], [], []

    with pytest.raises(ManifestError) as refused:
        run_demo(tmp_path, log=lines.append, section=headings.append, on_validated=validated.append)

    assert not refused.value.report.ok
    assert {problem.field for problem in refused.value.report.errors} == {"audio"}
    assert headings == ["1. demo corpus", "2. validate"]
    assert lines == [f"reusing {corpus / 'manifest.jsonl'}"]
    assert not validated and not (tmp_path / "cache").exists()


def test_a_sweep_file_that_does_not_exist_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        run_demo(tmp_path, sweep_file=tmp_path / "missing.yaml")
    assert not (tmp_path / "corpus").exists()
