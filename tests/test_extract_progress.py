"""Extraction progress: documents done / total, audio seconds per second and an ETA while encoding."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hilbert.data.manifest import load_manifest
from hilbert.features.extract import ExtractionProgress, _Job, duration_text, extract_features

LINE = re.compile(r"encoding: (\d+)/(\d+) documents, (\d+)/(\d+) s of audio, ([\d.]+) audio s/s, (ETA .+|done in .+)")


def job(doc_id: str, seconds: float) -> _Job:
    return _Job(doc_id, audio_key=f"a-{doc_id}", spans=((0.0, seconds),))


def test_progress_estimates_the_time_left_from_audio_seconds(monkeypatch):
    clock = iter([100.0, 110.0, 111.0, 130.0])
    monkeypatch.setattr("hilbert.features.extract.time.perf_counter", lambda: next(clock))
    lines: list[str] = []
    progress = ExtractionProgress([job("a", 30.0), job("b", 10.0), job("c", 10.0), job("d", 10.0)], lines.append)
    progress.add(1, 30.0)  # t = 110: half the audio in 10 s
    progress.add(1, 10.0)  # t = 111: within 10 s of the last line, not reported
    progress.add(2, 20.0)  # t = 130: the last one is always reported
    assert lines == ["encoding: 1/4 documents, 30/60 s of audio, 3.0 audio s/s, ETA 10 s",
                     "encoding: 4/4 documents, 60/60 s of audio, 2.0 audio s/s, done in 30 s"]


def test_progress_counts_documents_when_no_audio_is_left(monkeypatch):
    clock = iter([0.0, 5.0])
    monkeypatch.setattr("hilbert.features.extract.time.perf_counter", lambda: next(clock))
    lines: list[str] = []
    ExtractionProgress([_Job("a", text_key="t"), _Job("b", text_key="t")], lines.append).add(1, 0.0)
    assert lines == ["encoding: 1/2 documents, 0/0 s of audio, 0.0 audio s/s, ETA 5 s"]


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (42, "42 s"), (185, "3 min 05 s"), (7620, "2 h 07 min")])
def test_durations_read_like_a_clock(seconds, text):
    assert duration_text(seconds) == text


@pytest.mark.slow
@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "ray-data"])
def test_extraction_logs_documents_audio_rate_and_eta_while_encoding(local_ray, tiny_corpus: Path, tmp_path: Path,
                                                                     in_process: bool):
    lines: list[str] = []
    extract_features(load_manifest(tiny_corpus), "logmel", "hashngram", tmp_path / "cache", documents_per_batch=1,
                     num_actors=1, log=lines.append, in_process=in_process)
    progress = [LINE.fullmatch(line) for line in lines if line.startswith("encoding:")]
    assert progress and all(progress), lines
    first, last = progress[0], progress[-1]
    assert first.group(6).startswith("ETA ") and int(first.group(1)) < 4 and first.group(2) == "4"
    assert last.group(1, 2, 3, 4) == ("4", "4", "9", "9") and last.group(6).startswith("done in ")
    assert float(last.group(5)) > 0
    # Nothing encoded, nothing to report.
    lines.clear()
    assert extract_features(load_manifest(tiny_corpus), "logmel", "hashngram", tmp_path / "cache",
                            log=lines.append).cache_hit
    assert not [line for line in lines if line.startswith("encoding:")]
