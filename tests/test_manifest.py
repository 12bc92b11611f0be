"""The data contract: every defect is reported with its line, doc_id and field; valid edge cases pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import document, write_manifest, write_tone
from hilbert.data.manifest import ManifestError, load_manifest, validate_manifest


def only_error(path: Path):
    report = validate_manifest(path)
    assert len(report.errors) == 1, [str(p) for p in report.problems]
    return report.errors[0]


@pytest.fixture
def audio_dir(tmp_path: Path) -> Path:
    write_tone(tmp_path / "audio" / "ok.wav", seconds=3.0)
    return tmp_path


def test_valid_corpus_loads_with_labels_groups_and_nulls(tiny_corpus: Path):
    manifest = load_manifest(tiny_corpus)
    assert [d.doc_id for d in manifest] == ["d0", "d1", "d2", "d3"]
    assert manifest.tasks == ["topic", "voice"]
    assert manifest.classes("voice") == ["x", "y"]
    first = manifest.documents[0]
    assert first.label("voice") is None and first.group == "g0"
    assert first.audio_path == tiny_corpus.parent / "audio" / "d0.wav"
    assert first.audio_duration == pytest.approx(3.0)


def test_summary_counts_classes_unlabelled_and_hours(tiny_corpus: Path):
    summary = validate_manifest(tiny_corpus).summary()
    assert summary.documents == 4
    assert summary.audio_hours == pytest.approx(4 * 3.0 / 3600)
    assert summary.segments_per_document == (2, 2.0, 2)
    voice = next(t for t in summary.tasks if t.name == "voice")
    assert voice.class_counts == {"x": 1, "y": 2} and voice.unlabelled == 1


def test_malformed_json_names_the_line_and_guesses_the_doc_id(audio_dir: Path):
    path = write_manifest(audio_dir, [document("a", "audio/ok.wav"), '{"doc_id": "b", "audio": "audio/ok.wav",'])
    error = only_error(path)
    assert (error.line, error.doc_id) == (2, "b") and "malformed JSON" in error.message


def test_non_object_line_is_an_error(audio_dir: Path):
    error = only_error(write_manifest(audio_dir, ["[1, 2, 3]"]))
    assert "JSON object" in error.message


def test_missing_doc_id(audio_dir: Path):
    record = document("x", "audio/ok.wav")
    del record["doc_id"]
    error = only_error(write_manifest(audio_dir, [record]))
    assert error.field == "doc_id" and "missing" in error.message


def test_duplicate_doc_id_names_the_first_line(audio_dir: Path):
    path = write_manifest(audio_dir, [document("a", "audio/ok.wav"), document("b", "audio/ok.wav"),
                                      document("a", "audio/ok.wav")])
    error = only_error(path)
    assert (error.line, error.doc_id, error.field) == (3, "a", "doc_id") and "line 1" in error.message


def test_missing_audio_file(audio_dir: Path):
    error = only_error(write_manifest(audio_dir, [document("a", "audio/nowhere.wav")]))
    assert (error.doc_id, error.field) == ("a", "audio") and "not found" in error.message


def test_undecodable_audio_file(audio_dir: Path):
    (audio_dir / "audio" / "junk.wav").write_bytes(b"RIFF but not really a wave file" * 10)
    error = only_error(write_manifest(audio_dir, [document("a", "audio/junk.wav")]))
    assert error.field == "audio" and "cannot be decoded" in error.message


def test_empty_audio_file(audio_dir: Path):
    write_tone(audio_dir / "audio" / "empty.wav", seconds=0.0)
    error = only_error(write_manifest(audio_dir, [document("a", "audio/empty.wav")]))
    assert error.field == "audio" and "no samples" in error.message


@pytest.mark.parametrize("start, end, field, words", [
    (-0.5, 1.0, "segments[0].start", "negative"),
    (float("nan"), 1.0, "segments[0].start", "finite"),
    (0.0, float("inf"), "segments[0].end", "finite"),
    (2.0, 1.0, "segments[0]", "greater than start"),
    (1.0, 1.0, "segments[0]", "greater than start"),
    (0.0, 3.5, "segments[0].end", "past the end"),
    ("0.0", 1.0, "segments[0].start", "number"),
    (True, 1.0, "segments[0].start", "number"),
])
def test_bad_segment_times(audio_dir: Path, start, end, field, words):
    error = only_error(write_manifest(audio_dir, [document("a", "audio/ok.wav", [(start, end, "hi")])]))
    assert (error.doc_id, error.field) == ("a", field) and words in error.message


def test_end_within_rounding_of_audio_end_is_accepted_and_clipped(audio_dir: Path):
    manifest = load_manifest(write_manifest(audio_dir, [document("a", "audio/ok.wav", [(2.0, 3.01, "hi")])]))
    assert manifest.documents[0].segments[0].end == pytest.approx(3.0)


def test_empty_and_missing_segment_lists(audio_dir: Path):
    empty = document("a", "audio/ok.wav", [])
    missing = document("b", "audio/ok.wav")
    del missing["segments"]
    report = validate_manifest(write_manifest(audio_dir, [empty, missing]))
    assert [(p.doc_id, p.field) for p in report.errors] == [("a", "segments"), ("b", "segments")]
    assert "empty segment list" in report.errors[0].message


@pytest.mark.parametrize("label", [3, 1.5, True, ["a"], {"a": 1}, ""])
def test_non_string_labels(audio_dir: Path, label):
    error = only_error(write_manifest(audio_dir, [document("a", "audio/ok.wav", labels={"topic": label})]))
    assert (error.doc_id, error.field) == ("a", "labels.topic")


def test_labels_must_be_a_mapping(audio_dir: Path):
    error = only_error(write_manifest(audio_dir, [document("a", "audio/ok.wav", labels=["topic"])]))
    assert error.field == "labels"


def test_non_utf8_bytes_name_the_line_and_doc(audio_dir: Path):
    line = json.dumps(document("a", "audio/ok.wav", [(0.0, 1.0, "TEXT")])).encode().replace(b"TEXT", b"caf\xe9")
    error = only_error(write_manifest(audio_dir, [document("z", "audio/ok.wav"), line]))
    assert (error.line, error.doc_id) == (2, "a") and "UTF-8" in error.message


def test_lone_surrogate_escape_in_text_is_not_utf8(audio_dir: Path):
    line = json.dumps(document("a", "audio/ok.wav", [(0.0, 1.0, "TEXT")])).replace("TEXT", "\\udc80")
    error = only_error(write_manifest(audio_dir, [line]))
    assert (error.doc_id, error.field) == ("a", "segments[0].text") and "UTF-8" in error.message


def test_text_must_be_a_string(audio_dir: Path):
    error = only_error(write_manifest(audio_dir, [document("a", "audio/ok.wav", [(0.0, 1.0, None)])]))
    assert error.field == "segments[0].text"


def test_every_defect_is_reported_in_one_pass(audio_dir: Path):
    path = write_manifest(audio_dir, [
        "{not json",
        document("a", "audio/missing.wav"),
        document("b", "audio/ok.wav", [(-1.0, 1.0, "x")]),
        document("c", "audio/ok.wav", labels={"topic": 7}),
        document("d", "audio/ok.wav"),
    ])
    report = validate_manifest(path)
    assert [e.line for e in report.errors] == [1, 2, 3, 4]
    assert [d.doc_id for d in report.documents] == ["d"]
    with pytest.raises(ManifestError) as raised:
        load_manifest(path)
    message = str(raised.value)
    assert "4 error(s)" in message and "'a'" in message and "labels.topic" in message


def test_valid_edge_cases_are_accepted(audio_dir: Path):
    write_tone(audio_dir / "audio" / "long.wav", seconds=30.0, sample_rate=8000)
    many = [(i * 0.1, i * 0.1 + 0.08, "" if i % 7 == 0 else f"mot {i}") for i in range(300)]
    overlapping = [(0.0, 1.5, "je parle"), (1.0, 2.0, "moi aussi — 你好 🎙️")]
    path = write_manifest(audio_dir, [
        document("many", "audio/long.wav", many),
        document("overlap", "audio/ok.wav", overlapping, labels={"topic": None}),
        document("unlabelled", str((audio_dir / "audio" / "ok.wav").resolve()), labels={}),
    ])
    report = validate_manifest(path)
    assert report.ok, [str(p) for p in report.errors]
    assert len(report.documents) == 3 and len(report.documents[0].segments) == 300
    assert [(w.doc_id, w.field) for w in report.warnings] == [("overlap", "segments")]
    assert report.documents[1].segments[1].text == "moi aussi — 你好 🎙️"


def test_unknown_fields_warn_and_integer_groups_are_read_as_strings(audio_dir: Path):
    record = document("a", "audio/ok.wav")
    record["speaker_age"] = 41
    record["group"] = 7
    report = validate_manifest(write_manifest(audio_dir, [record]))
    assert report.ok and report.warnings[0].field == "speaker_age"
    assert report.documents[0].group == "7"


def test_stereo_48k_flac_and_ogg_are_read(tmp_path: Path):
    write_tone(tmp_path / "a.flac", seconds=2.0, sample_rate=48000, channels=2)
    write_tone(tmp_path / "b.ogg", seconds=2.0, sample_rate=22050, channels=2)
    manifest = load_manifest(write_manifest(tmp_path, [document("a", "a.flac", [(0.0, 1.9, "x")]),
                                                       document("b", "b.ogg", [(0.0, 1.9, "y")])]))
    assert [round(d.audio_duration, 2) for d in manifest] == [2.0, 2.0]


def test_missing_or_empty_manifest(tmp_path: Path):
    assert "not found" in validate_manifest(tmp_path / "nope.jsonl").errors[0].message
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "no documents" in validate_manifest(tmp_path / "empty.jsonl").errors[0].message
