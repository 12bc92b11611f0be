"""Cache housekeeping: `hilbert cache info` counts what a real extracted cache holds, `hilbert cache
prune` deletes exactly the old unreferenced entries (in the store and the node mirrors of a URI
root), and neither a concurrent reader nor a concurrent extraction loses anything to it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import extract_in_process
from hilbert.cli import app
from hilbert.data.demo import write_demo_corpus
from hilbert.data.manifest import Manifest, load_manifest
from hilbert.features.cache import (
    MIRROR_ENV,
    PENDING,
    PRUNE_PREFIX,
    FeatureCache,
    FeatureSet,
    PendingReference,
    entry_name,
)
from hilbert.features.extract import extract_features
from hilbert.features.housekeeping import HousekeepingError, Pruner, cache_info, prune_cache, prune_mirror
from test_cache_uri import CREDENTIALS, bucket, objects  # noqa: F401  (bucket: the moto S3 fixture)

HOURS_AGO_2 = time.time() - 2 * 3600
PAIRS = (("logmel", "hashngram"), ("logmel?n_mels=32", "hashngram"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Manifest, Manifest]:
    """Four demo documents, and an edited copy of two of them (new transcripts, same audio)."""
    folder = tmp_path_factory.mktemp("corpus")
    path = write_demo_corpus(folder, n_documents=4, seed=3)
    records = [json.loads(line) for line in path.read_text().splitlines()[:2]]
    for record in records:
        record["segments"][0]["text"] = "an edited transcript"
    edited = folder / "edited.jsonl"
    edited.write_text("".join(json.dumps(record) + "\n" for record in records))
    return load_manifest(path), load_manifest(edited)


@pytest.fixture(scope="module")
def template(corpus, tmp_path_factory) -> tuple[Path, dict[str, FeatureSet]]:
    """A real cache: both encoder pairs on the corpus, and the first pair on its edited copy."""
    root = tmp_path_factory.mktemp("template") / "cache"
    full, edited = corpus
    sets = {f"{audio}/{text}": extract_in_process(full, audio, text, root) for audio, text in PAIRS}
    sets["edited"] = extract_in_process(edited, *PAIRS[0], root)
    return root, sets


@pytest.fixture
def cache_root(template, tmp_path: Path) -> Path:
    """A copy of the template cache for one test (modification times kept)."""
    return Path(shutil.copytree(template[0], tmp_path / "cache"))


def entry_files(root: Path) -> dict[str, int]:
    """Relative name -> size of every entry under ``root``."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in (root / "entries").rglob("*.safetensors")}


def names_of(feature_set: FeatureSet) -> set[str]:
    return {entry_name(m, d[m]) for d in feature_set.documents.values() for m in ("audio", "text", "timing")}


def full_and_edited_sets(corpus, root: str | Path) -> tuple[FeatureSet, FeatureSet, set[str]]:
    """The full corpus's feature set, the edited corpus's, and the entries only the edited one names."""
    full, edited = corpus
    kept = extract_in_process(full, *PAIRS[0], root)
    dropped = extract_in_process(edited, *PAIRS[0], root)
    return kept, dropped, names_of(dropped) - names_of(kept)


def age(paths, when: float = HOURS_AGO_2) -> None:
    for path in paths:
        os.utime(path, (when, when))


def age_every_entry(root: Path) -> None:
    age((root / "entries").rglob("*.safetensors"))


def stray(cache: FeatureCache, seed: int, encoder: str = "stray-encoder", modality: str = "audio") -> str:
    """An entry no feature set names; returns its relative name."""
    key = f"{seed:064x}"
    cache.put(modality, key, np.full((2, 3), seed, np.float32), doc_id=f"stray{seed}", encoder=encoder)
    return entry_name(modality, key)


def load_every_document(cache: FeatureCache, feature_sets) -> int:
    loaded = 0
    for feature_set in feature_sets:
        for doc_id in feature_set.documents:
            audio, text = cache.load_document(feature_set, doc_id)
            assert audio.shape[0] == text.shape[0] == cache.load_timing(feature_set, doc_id).shape[0] > 0
            loaded += 1
    return loaded


# cache info --------------------------------------------------------------------------------
def test_info_counts_entries_and_bytes_per_encoder_and_per_feature_set(template, cache_root: Path):
    _, sets = template
    cache = FeatureCache(cache_root)
    stray_name = stray(cache, 1)
    (cache_root / "entries" / "audio" / ".half.safetensors.1.tmp").write_bytes(b"half")
    sizes = entry_files(cache_root)
    info = cache_info(cache_root)

    full, n_mels, edited = sets["logmel/hashngram"], sets["logmel?n_mels=32/hashngram"], sets["edited"]
    audio_of = lambda *s: {entry_name("audio", d["audio"]) for f in s for d in f.documents.values()}  # noqa: E731
    text_of = {entry_name("text", d["text"]) for f in sets.values() for d in f.documents.values()}
    timing_of = {entry_name("timing", d["timing"]) for f in sets.values() for d in f.documents.values()}
    expected = {("audio", "logmel"): audio_of(full, edited), ("audio", "logmel?n_mels=32"): audio_of(n_mels),
                ("audio", "stray-encoder"): {stray_name}, ("text", "hashngram"): text_of,
                ("timing", "segment-timing v1"): timing_of}
    assert len(expected[("audio", "logmel")]) == 4, "the edited copy shares its audio entries"
    assert len(text_of) == 4 + 2, "and has two transcripts of its own"
    assert len(timing_of) == 4 + 2, "timing rows are shared by both encoder pairs, not by edited transcripts"
    got = {(row.modality, row.encoder): row for row in info.encoders}
    assert set(got) == set(expected)
    for pair, names in expected.items():
        assert (got[pair].entries, got[pair].bytes) == (len(names), sum(sizes[n] for n in names)), pair
    assert (got[("audio", "stray-encoder")].unreferenced_entries, info.unreferenced.files) == (1, 1)
    assert info.unreferenced.bytes == sizes[stray_name]
    assert {m: (t.files, t.bytes) for m, t in info.modalities.items()} == {
        m: (sum(1 for n in sizes if n.startswith(f"entries/{m}/")),
            sum(s for n, s in sizes.items() if n.startswith(f"entries/{m}/"))) for m in ("audio", "text", "timing")}

    summaries = {summary.id: summary for summary in info.sets}
    assert set(summaries) == {feature_set.id for feature_set in sets.values()}
    for feature_set in sets.values():
        summary = summaries[feature_set.id]
        assert (summary.documents, summary.audio_encoder, summary.missing_entries, summary.manifest_state) == (
            len(feature_set.documents), feature_set.audio_encoder, 0, "current")
        assert summary.bytes == sum(sizes[name] for name in names_of(feature_set))
    assert (info.temporaries.files, info.stale_temporaries.files, info.pending_references.files) == (1, 0, 0)
    assert not info.is_uri and info.mirror is None and info.exists


# prune -------------------------------------------------------------------------------------
def test_prune_removes_exactly_the_old_unreferenced_entries_and_every_set_still_loads(template, cache_root: Path):
    _, sets = template
    cache = FeatureCache(cache_root)
    old = {stray(cache, seed) for seed in range(3)} | {stray(cache, 3, modality="text")}
    age_every_entry(cache_root)  # referenced entries are just as old: being named is what keeps them
    young = stray(cache, 9)
    before = entry_files(cache_root)

    [report] = prune_cache(cache_root)
    after = entry_files(cache_root)
    assert set(before) - set(after) == old and young in after
    assert (report.removed["audio entries"].files, report.removed["text entries"].files) == (3, 1)
    assert report.removed["audio entries"].bytes + report.removed["text entries"].bytes == sum(before[n] for n in old)
    assert (report.kept_young.files, report.kept_young.bytes) == (1, before[young])
    assert load_every_document(FeatureCache(cache_root), sets.values()) == 4 + 4 + 2
    assert cache.feature_set_ids() == sorted(feature_set.id for feature_set in sets.values())


def test_pending_references_keep_their_entries_until_they_expire(cache_root: Path):
    cache = FeatureCache(cache_root)
    named, killed, other = stray(cache, 1), stray(cache, 2), stray(cache, 3)
    age_every_entry(cache_root)
    left_behind = PendingReference(cache, {"audio": [killed.rsplit("/", 1)[1][:-len(".safetensors")]]})
    left_behind.write()  # by an extraction killed two hours ago
    age([cache_root / left_behind.name])
    with cache.referencing({"audio": [named.rsplit("/", 1)[1][:-len(".safetensors")]]}):
        [report] = prune_cache(cache_root, older_than=0)
        pending = list((cache_root / PENDING).iterdir())
    remaining = entry_files(cache_root)
    assert named in remaining and killed not in remaining and other not in remaining
    assert report.kept_pending.files == 1 and report.removed["pending references"].files == 1
    assert len(pending) == 1 and pending[0].name.startswith("extract-"), "the running extraction's stays"
    assert not list((cache_root / PENDING).iterdir()), "and goes when its extraction is done"


def test_a_killed_prunes_marker_is_ignored_once_stale_and_then_swept(cache_root: Path):
    cache = FeatureCache(cache_root)
    marker = cache_root / PENDING / f"{PRUNE_PREFIX}killed.json"
    marker.parent.mkdir(exist_ok=True)
    marker.write_text("{}")
    assert cache.prunes_in_progress() == [f"{PENDING}/{marker.name}"], "a fresh marker is a prune running"
    age([marker], time.time() - 600)
    assert cache.prunes_in_progress() == []
    [report] = prune_cache(cache_root)
    assert report.removed["prune markers"].files == 1 and not marker.exists()


def test_dry_run_deletes_nothing_and_reports_what_the_real_run_removes(template, cache_root: Path):
    _, sets = template
    cache = FeatureCache(cache_root)
    for seed in range(3):
        stray(cache, seed)
    temporary = cache_root / "entries" / "text" / ".killed.safetensors.7.tmp"
    temporary.write_bytes(b"half a file")
    age_every_entry(cache_root)
    age([temporary])

    def snapshot() -> dict[str, float]:
        return {p.relative_to(cache_root).as_posix(): p.stat().st_mtime for p in cache_root.rglob("*") if p.is_file()}

    before = snapshot()
    [dry] = prune_cache(cache_root, drop_sets=[sets["edited"].id], dry_run=True)
    assert snapshot() == before
    [real] = prune_cache(cache_root, drop_sets=[sets["edited"].id])
    assert dry.removed == real.removed and dry.dry_run and not real.dry_run
    assert {kind: tally.files for kind, tally in real.removed.items() if tally.files} == {
        "audio entries": 3, "text entries": 2, "timing entries": 2, "feature sets": 1, "temporaries": 1}


def test_drop_set_deletes_the_set_and_then_only_the_entries_no_other_set_needs(template, cache_root: Path):
    _, sets = template
    edited, others = sets["edited"], [s for name, s in sets.items() if name != "edited"]
    cache = FeatureCache(cache_root)
    own = names_of(edited) - set().union(*map(names_of, others))
    assert len(own) == 2 + 2  # the edited transcripts' text features and timing rows

    [young] = prune_cache(cache_root, drop_sets=[edited.id])  # entries written just now: kept
    assert young.dropped_sets == [edited.id] and not cache.feature_set_path(edited.id).exists()
    assert young.kept_young.files == 4 and own <= set(entry_files(cache_root))

    age_every_entry(cache_root)
    [report] = prune_cache(cache_root)
    assert report.removed["text entries"].files == report.removed["timing entries"].files == 2
    assert not own & set(entry_files(cache_root))
    assert load_every_document(cache, others) == 8

    refusal = rf"no feature set 'nope' in {re.escape(str(cache_root))}.*{others[0].id}"
    with pytest.raises(HousekeepingError, match=refusal):
        prune_cache(cache_root, drop_sets=["nope"])


def test_uri_root_prunes_the_store_then_the_mirror_of_each_node(corpus, bucket, monkeypatch, tmp_path: Path):
    uri, fs, prefix = bucket
    kept, dropped, own = full_and_edited_sets(corpus, uri)
    driver = FeatureCache(uri)
    assert own <= set(entry_files(driver.root)), "the driver's mirror holds what it wrote"

    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror-other"))
    other = FeatureCache(uri)
    load_every_document(other, [dropped])  # the other node has read the set to be dropped
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror-driver"))

    info = cache_info(uri)
    assert info.is_uri and info.mirror == str(driver.root) and info.mirror_size.files > 0
    assert {s.id for s in info.sets} == {kept.id, dropped.id} and "endpoint_override" not in info.location

    store, mirror = prune_cache(uri, drop_sets=[dropped.id], older_than=0)
    stored = set(objects(fs, prefix))
    assert store.tree == "store" and store.removed["text entries"].files == 2 and not own & stored
    assert f"sets/{dropped.id}.json" not in stored and f"sets/{kept.id}.json" in stored
    assert mirror.tree == "mirror" and mirror.removed["text entries"].files == 2
    assert mirror.removed["feature sets"].files == 1 and not own & set(entry_files(driver.root))
    assert not (driver.root / "sets" / f"{dropped.id}.json").exists()

    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror-other"))
    assert own <= set(entry_files(other.root))
    report = prune_mirror(uri, older_than=3600)  # copies of what the store lost go, however young
    assert report.removed["text entries"].files == 2 and not own & set(entry_files(other.root))
    assert names_of(kept) & set(entry_files(other.root)), "copies of what sets still name stay"

    (driver.root / sorted(names_of(kept))[0]).unlink()  # a mirror copy gone: read again from the store
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror-driver"))
    assert load_every_document(FeatureCache(uri), [kept]) == 4


def test_a_reader_loading_every_document_while_prune_runs_loses_nothing(template, cache_root: Path):
    _, sets = template
    cache = FeatureCache(cache_root)
    for seed in range(200):  # enough garbage for the prune to take a while
        stray(cache, seed)
    age_every_entry(cache_root)
    done, failures, passes = threading.Event(), [], []

    def read() -> None:
        reader = FeatureCache(cache_root)
        try:
            while True:
                finished = done.is_set()
                passes.append(load_every_document(reader, sets.values()))
                if finished:
                    return
        except Exception as error:  # noqa: BLE001 - recorded for the assertion below
            failures.append(error)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        [report] = prune_cache(cache_root)
    finally:
        done.set()
        thread.join(timeout=60)
    assert not failures and len(passes) >= 2 and set(passes) == {10}
    assert report.removed["audio entries"].files == 200


@pytest.mark.slow
def test_an_extraction_racing_a_prune_ends_with_a_complete_feature_set(local_ray, corpus, template,
                                                                       cache_root: Path):
    """The worst interleaving: the prune reads the references before the extraction publishes its
    own and deletes after the extraction has counted those entries as cached."""
    _, edited = corpus
    dropped = template[1]["edited"]
    age_every_entry(cache_root)
    waiting, outcome = threading.Event(), {}

    def log(message: str) -> None:
        if "waiting for" in message:
            waiting.set()

    def extract() -> None:
        try:
            outcome["report"] = extract_features(edited, *PAIRS[0], cache_root, progress=False, log=log)
        except Exception as error:  # noqa: BLE001
            outcome["error"] = error
            waiting.set()

    with Pruner(cache_root, drop_sets=[dropped.id]) as pruner:
        plan = pruner.plan()  # before the extraction starts: its entries look like garbage
        thread = threading.Thread(target=extract)
        thread.start()
        assert waiting.wait(timeout=60), "the extraction must wait for the prune in progress"
        report = pruner.apply(plan)
    thread.join(timeout=240)
    assert "error" not in outcome, outcome
    assert report.removed["text entries"].files == 2 and report.removed["feature sets"].files == 1
    extraction = outcome["report"]
    assert extraction.cache_hit and extraction.reencoded == {"audio": 0, "text": 2}
    cache = FeatureCache(cache_root)
    assert cache.feature_set_by_id(dropped.id).documents == dropped.documents
    assert load_every_document(cache, [extraction.feature_set]) == 2


# the command line --------------------------------------------------------------------------
def test_cli_info_and_prune_print_tables_and_json(template, cache_root: Path):
    _, sets = template
    garbage = stray(FeatureCache(cache_root), 5)
    age_every_entry(cache_root)
    size = entry_files(cache_root)[garbage]
    runner = CliRunner()
    shown = runner.invoke(app, ["cache", "info", "--cache", str(cache_root)])
    assert shown.exit_code == 0, shown.output
    assert all(feature_set.id in shown.output for feature_set in sets.values())
    assert "logmel?n_mels=32" in shown.output and "stray-encoder" in shown.output
    assert "unreferenced (named by no feature set or running extraction): 1 entries" in shown.output

    as_json = runner.invoke(app, ["cache", "info", "--cache", str(cache_root), "--json"])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert payload == json.loads(json.dumps(cache_info(cache_root).to_json()))
    assert payload["unreferenced"]["files"] == 1 and len(payload["sets"]) == 3

    dry = runner.invoke(app, ["cache", "prune", "--cache", str(cache_root), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would remove" in dry.output and "audio entries" in dry.output
    assert len(entry_files(cache_root)) == 4 + 4 + 4 + 2 + 6 + 1  # audio x2, text, edited text, timing, stray
    pruned = runner.invoke(app, ["cache", "prune", "--cache", str(cache_root), "--older-than", "30m", "--json"])
    assert pruned.exit_code == 0, pruned.output
    [report] = json.loads(pruned.stdout)
    assert report["removed"]["audio entries"] == {"files": 1, "bytes": size}
    assert report["older_than"] == 1800 and len(entry_files(cache_root)) == 20


def test_cli_on_a_missing_or_empty_cache_says_so(tmp_path: Path):
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    for folder in ("missing", "empty"):
        shown = runner.invoke(app, ["cache", "info", "--cache", str(tmp_path / folder)])
        assert shown.exit_code == 0, shown.output
        assert f"no feature cache at {tmp_path / folder} yet" in shown.output
        pruned = runner.invoke(app, ["cache", "prune", "--cache", str(tmp_path / folder)])
        assert pruned.exit_code == 0 and "nothing" in pruned.output, pruned.output
    as_json = runner.invoke(app, ["cache", "info", "--cache", str(tmp_path / "missing"), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["exists"] is False
    assert not (tmp_path / "missing").exists(), "looking must not create the cache"


@pytest.mark.parametrize("arguments, message", [
    (["--older-than", "5 parsecs"], "is not a duration"),
    (["--drop-set", "0123abcd"], "no feature set '0123abcd'"),
    (["--address", "auto"], "only a URI root has node mirrors"),
])
def test_cli_refuses_a_bad_argument_with_exit_code_2(arguments, message, template, cache_root: Path):
    before = entry_files(cache_root)
    result = CliRunner().invoke(app, ["cache", "prune", "--cache", str(cache_root), *arguments])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert entry_files(cache_root) == before


CLUSTER_PRUNE = """
import json, sys
from typer.testing import CliRunner
from hilbert.cli import app
from hilbert.ray_runtime import connect
import ray
connect(num_cpus=2)
try:
    result = CliRunner().invoke(app, ["cache", "prune", "--cache", sys.argv[1], "--drop-set", sys.argv[2],
                                      "--older-than", "0", "--address", "local", "--json"])
finally:
    ray.shutdown()
print(result.stdout)
sys.exit(result.exit_code)
"""


@pytest.mark.slow
def test_cli_prune_with_an_address_prunes_the_mirror_on_every_node(corpus, bucket, monkeypatch, tmp_path: Path):
    uri, fs, prefix = bucket
    kept, dropped, own = full_and_edited_sets(corpus, uri)
    node_mirror = tmp_path / "mirror-node"
    monkeypatch.setenv(MIRROR_ENV, str(node_mirror))
    load_every_document(FeatureCache(uri), [dropped])  # this node has read the set to be dropped
    assert own <= set(entry_files(FeatureCache(uri).root))

    env = {**os.environ, **CREDENTIALS, MIRROR_ENV: str(node_mirror), "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run([sys.executable, "-c", CLUSTER_PRUNE, uri, dropped.id], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    store, *mirrors = json.loads(run.stdout[run.stdout.index("["):])
    assert store["tree"] == "store" and store["removed"]["text entries"]["files"] == 2
    assert len(mirrors) == 1 and not mirrors[0]["error"], mirrors
    assert mirrors[0]["path"] == str(FeatureCache(uri).root) and mirrors[0]["removed"]["text entries"]["files"] == 2
    assert not own & set(entry_files(FeatureCache(uri).root)) and not own & set(objects(fs, prefix))
