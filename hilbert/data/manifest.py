"""The corpus contract: a JSONL manifest of documents, and its validation.

One line per document::

    {"doc_id": "d0001", "audio": "audio/d0001.wav",
     "segments": [{"start": 0.0, "end": 2.31, "text": "..."}, ...],
     "labels": {"topic": "sports", "voice": null}, "group": "spk03"}

``audio`` is relative to the manifest's folder or absolute; ``labels`` maps a task to a class
string, or null where the document is not labelled for that task; ``group`` keeps related
documents in the same cross-validation fold.

:func:`validate_manifest` reads the whole file and reports *every* defect at once, each naming the
line, the ``doc_id`` and the field, so a user fixes a corpus in one pass instead of one error per
run. :func:`load_manifest` is what every other command calls: it validates first and refuses bad
input with a :class:`ManifestError` before any work starts.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

from hilbert.data.audio import AudioError, audio_info

# Forced alignments and ASR timestamps often overshoot the file end by a frame or two; anything
# beyond this is a real defect (wrong file, wrong units), not rounding.
END_TOLERANCE_SECONDS = 0.02

KNOWN_FIELDS = frozenset({"doc_id", "audio", "segments", "labels", "group"})

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Segment:
    """One utterance: a time span of the recording and its transcript."""

    start: float
    end: float
    text: str

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Document:
    """One recording with its transcript segments and (possibly partial) labels."""

    doc_id: str
    audio_path: Path
    segments: tuple[Segment, ...]
    labels: Mapping[str, str | None]
    group: str | None = None
    line: int = 0
    audio_duration: float | None = None

    def label(self, task: str) -> str | None:
        """The class of ``task`` for this document, or None when unlabelled."""
        return self.labels.get(task)


@dataclass(frozen=True)
class Problem:
    """One defect (error) or oddity (warning) found in a manifest."""

    severity: Severity
    line: int
    doc_id: str | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}"
        if self.doc_id is not None:
            where += f", doc_id {self.doc_id!r}"
        return f"{self.severity}: {where}, field {self.field!r}: {self.message}"


@dataclass(frozen=True)
class TaskSummary:
    name: str
    class_counts: Mapping[str, int]
    unlabelled: int


@dataclass(frozen=True)
class CorpusSummary:
    documents: int
    audio_hours: float
    segments_total: int
    segments_per_document: tuple[int, float, int]  # min, median, max
    tasks: tuple[TaskSummary, ...]


@dataclass
class ValidationReport:
    """Everything :func:`validate_manifest` found, plus the documents that parsed cleanly."""

    manifest_path: Path
    documents: list[Document] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> CorpusSummary:
        return summarize(self.documents)


class ManifestError(ValueError):
    """A manifest with defects; the message lists every one of them."""

    def __init__(self, report: ValidationReport):
        self.report = report
        lines = [f"{report.manifest_path}: {len(report.errors)} error(s) in the manifest"]
        lines += [f"  {problem}" for problem in report.errors]
        super().__init__("\n".join(lines))


@dataclass
class Manifest:
    """A validated corpus."""

    path: Path
    documents: list[Document]

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[Document]:
        return iter(self.documents)

    @property
    def tasks(self) -> list[str]:
        """Every task named in any document, sorted."""
        return sorted({task for doc in self.documents for task in doc.labels})

    def classes(self, task: str) -> list[str]:
        """The classes of ``task`` seen in this corpus, sorted."""
        return sorted({c for doc in self.documents if (c := doc.labels.get(task)) is not None})

    def by_id(self) -> dict[str, Document]:
        return {doc.doc_id: doc for doc in self.documents}


def load_manifest(path: str | Path, *, check_audio: bool = True) -> Manifest:
    """Validate ``path`` and return its documents; raise :class:`ManifestError` on any error."""
    report = validate_manifest(path, check_audio=check_audio)
    if not report.ok:
        raise ManifestError(report)
    return Manifest(report.manifest_path, report.documents)


def validate_manifest(path: str | Path, *, check_audio: bool = True) -> ValidationReport:
    """Check every line of the manifest at ``path`` and collect all problems.

    With ``check_audio`` the audio headers are read too (existence, decodability, emptiness,
    duration for the segment bounds); the samples themselves are not decoded.
    """
    path = Path(path)
    report = ValidationReport(manifest_path=path)
    if not path.is_file():
        report.problems.append(Problem("error", 0, None, "manifest", f"manifest not found: {path}"))
        return report
    first_line_of: dict[str, int] = {}
    for line_number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        checker = _LineChecker(line_number, path.parent, check_audio)
        document = checker.check(raw)
        report.problems.extend(checker.problems)
        if checker.doc_id is not None:
            if checker.doc_id in first_line_of:
                report.problems.append(Problem(
                    "error", line_number, checker.doc_id, "doc_id",
                    f"duplicate doc_id, first used on line {first_line_of[checker.doc_id]}"))
                continue
            first_line_of[checker.doc_id] = line_number
        if document is not None:
            report.documents.append(document)
    if not first_line_of and not report.errors:
        report.problems.append(Problem("error", 0, None, "manifest", "manifest holds no documents"))
    return report


class _LineChecker:
    """Validates one manifest line, collecting problems instead of stopping at the first."""

    def __init__(self, line: int, base_dir: Path, check_audio: bool):
        self.line = line
        self.base_dir = base_dir
        self.check_audio = check_audio
        self.doc_id: str | None = None
        self.problems: list[Problem] = []

    def _problem(self, field_name: str, message: str, severity: Severity = "error") -> None:
        self.problems.append(Problem(severity, self.line, self.doc_id, field_name, message))

    def check(self, raw: bytes) -> Document | None:
        record = self._parse(raw)
        if record is None:
            return None
        self.doc_id = self._check_doc_id(record.get("doc_id"))
        for unknown in sorted(set(record) - KNOWN_FIELDS):
            self._problem(unknown, "unknown field, ignored", "warning")
        audio_path, duration = self._check_audio(record.get("audio"))
        segments = self._check_segments(record.get("segments"), duration)
        labels = self._check_labels(record.get("labels", {}))
        group = self._check_group(record.get("group"))
        if any(p.severity == "error" for p in self.problems) or self.doc_id is None:
            return None
        assert audio_path is not None and segments is not None and labels is not None
        return Document(self.doc_id, audio_path, tuple(segments), labels, group, self.line, duration)

    def _parse(self, raw: bytes) -> dict[str, Any] | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            guess = re.search(rb'"doc_id"\s*:\s*"([^"]*)"', raw)
            self.doc_id = guess.group(1).decode("utf-8", "replace") if guess else None
            self._problem("(line)", f"not valid UTF-8 (byte {error.start}: {raw[error.start:error.start + 1]!r})")
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            guess = re.search(r'"doc_id"\s*:\s*"([^"]*)"', text)
            self.doc_id = guess.group(1) if guess else None
            self._problem("(line)", f"malformed JSON: {error.msg} at column {error.colno}")
            return None
        if not isinstance(record, dict):
            self._problem("(line)", f"expected a JSON object, got {type(record).__name__}")
            return None
        return record

    def _check_doc_id(self, value: Any) -> str | None:
        if value is None:
            self._problem("doc_id", "missing doc_id")
            return None
        if not isinstance(value, str) or not value.strip():
            self._problem("doc_id", f"doc_id must be a non-empty string, got {value!r}")
            return None
        if not _is_utf8(value):
            self._problem("doc_id", "doc_id is not valid UTF-8 (lone surrogate escape)")
            return None
        return value

    def _check_audio(self, value: Any) -> tuple[Path | None, float | None]:
        if value is None:
            self._problem("audio", "missing audio path")
            return None, None
        if not isinstance(value, str) or not value.strip():
            self._problem("audio", f"audio must be a non-empty path string, got {value!r}")
            return None, None
        audio_path = Path(value)
        if not audio_path.is_absolute():
            audio_path = self.base_dir / audio_path
        if not self.check_audio:
            return audio_path, None
        try:
            info = audio_info(audio_path)
        except AudioError as error:
            self._problem("audio", str(error))
            return audio_path, None
        if info.frames == 0 or info.sample_rate <= 0:
            self._problem("audio", f"audio file holds no samples: {audio_path}")
            return audio_path, None
        return audio_path, info.duration

    def _check_segments(self, value: Any, duration: float | None) -> list[Segment] | None:
        if value is None:
            self._problem("segments", "missing segments")
            return None
        if not isinstance(value, list):
            self._problem("segments", f"segments must be a list, got {type(value).__name__}")
            return None
        if not value:
            self._problem("segments", "empty segment list: a document needs at least one segment")
            return None
        segments = [self._check_segment(i, item, duration) for i, item in enumerate(value)]
        if any(s is None for s in segments):
            return None
        checked = [s for s in segments if s is not None]
        self._warn_overlaps(checked)
        return checked

    def _check_segment(self, index: int, item: Any, duration: float | None) -> Segment | None:
        where = f"segments[{index}]"
        if not isinstance(item, dict):
            self._problem(where, f"a segment must be an object, got {type(item).__name__}")
            return None
        start = self._check_time(f"{where}.start", item.get("start"))
        end = self._check_time(f"{where}.end", item.get("end"))
        text = item.get("text")
        text_ok = True
        if not isinstance(text, str):
            self._problem(f"{where}.text", f"text must be a string (\"\" for no words), got {text!r}")
            text_ok = False
        elif not _is_utf8(text):
            self._problem(f"{where}.text", "text is not valid UTF-8 (lone surrogate escape)")
            text_ok = False
        if start is None or end is None or not text_ok:
            return None
        if end <= start:
            self._problem(where, f"end ({end}) must be greater than start ({start})")
            return None
        if duration is not None and end > duration + END_TOLERANCE_SECONDS:
            self._problem(f"{where}.end", f"end {end:.3f} s is past the end of the audio ({duration:.3f} s)")
            return None
        return Segment(start, min(end, duration) if duration is not None else end, text)

    def _check_time(self, field_name: str, value: Any) -> float | None:
        if value is None:
            self._problem(field_name, "missing time")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._problem(field_name, f"time must be a number of seconds, got {value!r}")
            return None
        if not math.isfinite(value):
            self._problem(field_name, f"time must be finite, got {value}")
            return None
        if value < 0:
            self._problem(field_name, f"time must not be negative, got {value}")
            return None
        return float(value)

    def _warn_overlaps(self, segments: list[Segment]) -> None:
        order = sorted(range(len(segments)), key=lambda i: segments[i].start)
        overlaps = [(a, b) for a, b in zip(order, order[1:]) if segments[b].start < segments[a].end]
        if overlaps:
            a, b = overlaps[0]
            self._problem("segments", f"{len(overlaps)} overlapping segment pair(s), first "
                          f"segments[{a}] and segments[{b}] (kept: overlapping speech is valid)", "warning")

    def _check_labels(self, value: Any) -> dict[str, str | None] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self._problem("labels", f"labels must be an object mapping task to class, got {type(value).__name__}")
            return None
        labels: dict[str, str | None] = {}
        ok = True
        for task, cls in value.items():
            if cls is None:
                labels[task] = None
            elif not isinstance(cls, str):
                self._problem(f"labels.{task}", f"label must be a class name string or null, got {cls!r}")
                ok = False
            elif not cls.strip():
                self._problem(f"labels.{task}", "label is an empty string (use null for unlabelled)")
                ok = False
            elif not _is_utf8(cls):
                self._problem(f"labels.{task}", "label is not valid UTF-8 (lone surrogate escape)")
                ok = False
            else:
                labels[task] = cls
        return labels if ok else None

    def _check_group(self, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self._problem("group", f"group must be a string (or integer id), got {value!r}")
            return None
        return str(value)


def _is_utf8(text: str) -> bool:
    # json.loads accepts "\udc80"-style escapes that no UTF-8 encoder can write back out.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def summarize(documents: list[Document]) -> CorpusSummary:
    """Counts a user wants before training: size, hours, segments, classes per task."""
    counts = [len(doc.segments) for doc in documents] or [0]
    hours = sum(doc.audio_duration or 0.0 for doc in documents) / 3600.0
    task_names = sorted({task for doc in documents for task in doc.labels})
    tasks = []
    for task in task_names:
        classes = Counter(c for doc in documents if (c := doc.labels.get(task)) is not None)
        unlabelled = sum(1 for doc in documents if doc.labels.get(task) is None)
        tasks.append(TaskSummary(task, dict(sorted(classes.items())), unlabelled))
    return CorpusSummary(
        documents=len(documents),
        audio_hours=hours,
        segments_total=sum(counts) if documents else 0,
        segments_per_document=(min(counts), float(statistics.median(counts)), max(counts)),
        tasks=tuple(tasks),
    )
