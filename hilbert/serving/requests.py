"""The documents of a request, checked as a manifest is.

A request is rows of documents, each ``doc_id``, ``audio`` (a path the serving process reads) and
``segments`` (a list of ``{"start", "end", "text"}``): a manifest's lines without labels. They are
checked by :func:`hilbert.data.manifest.validate_manifest` itself, so a served document is
refused for exactly what ``hilbert predict`` refuses (missing or unreadable audio, segment times
that are not numbers, negative, reversed or past the end of the audio, empty segment lists, ...),
plus what a manifest only warns about: fields nobody reads (a typo would otherwise pass silently).
Every defect is reported at once, named by row, document and field.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from hilbert.data.manifest import Manifest, Problem, validate_manifest

REQUEST_FIELDS = ("doc_id", "audio", "segments")
IGNORED_FIELDS = ("labels", "group")  # a manifest line may be posted as it is
SEGMENT_FIELDS = frozenset({"start", "end", "text"})


class RequestError(ValueError):
    """Documents of a request that cannot be predicted; the message names every defect."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} error(s) in the request: " + "; ".join(problems))


def documents_from_rows(rows: Iterable[Mapping[str, Any]], base_dir: str | Path | None = None) -> Manifest:
    """The documents of ``rows`` (dicts; NaN, None or an absent key: missing) as a validated
    :class:`Manifest`; relative audio paths are resolved against ``base_dir`` (default: the
    current directory). Raises :class:`RequestError` naming every defect."""
    base = Path(base_dir or Path.cwd()).resolve()
    records = [_plain_record(row) for row in rows]
    if not records:
        raise RequestError(["the request holds no documents"])
    problems = [problem for index, record in enumerate(records) for problem in _unread_fields(index, record)]
    with tempfile.TemporaryDirectory(prefix="hilbert-request-") as folder:
        path = Path(folder) / "request.jsonl"
        lines = [json.dumps(_with_absolute_audio(record, base), ensure_ascii=False) for record in records]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        report = validate_manifest(path)
        problems += [_described(problem) for problem in report.errors]
        if problems:
            raise RequestError(problems)
        return Manifest(path, report.documents)


def _described(problem: Problem) -> str:
    where = f"row {problem.line - 1}" if problem.line else "request"
    if problem.doc_id is not None:
        where = f"document {problem.doc_id!r} ({where})"
    return f"{where}, field {problem.field!r}: {problem.message}"


def _unread_fields(index: int, record: dict[str, Any]) -> list[str]:
    """Fields that would be ignored: refused, since a misspelt field is a silent mistake."""
    where = f"document {record['doc_id']!r} (row {index})" if isinstance(record.get("doc_id"), str) else f"row {index}"
    found = [f"{where}, field {name!r}: unknown field (expected {', '.join(REQUEST_FIELDS)})"
             for name in sorted(set(record) - set(REQUEST_FIELDS) - set(IGNORED_FIELDS))]
    segments = record.get("segments")
    for position, segment in enumerate(segments if isinstance(segments, list) else []):
        if isinstance(segment, dict):
            found += [f"{where}, field 'segments[{position}].{name}': unknown field (expected start, end, text)"
                      for name in sorted(set(segment) - SEGMENT_FIELDS)]
    return found


def _with_absolute_audio(record: dict[str, Any], base: Path) -> dict[str, Any]:
    audio = record.get("audio")
    if isinstance(audio, str) and audio.strip() and not Path(audio).is_absolute():
        return {**record, "audio": str(base / audio)}
    return record


def _plain_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as JSON values; a missing value (None, NaN: how pandas fills an absent key) is dropped."""
    return {str(key): _plain(value) for key, value in row.items() if not _missing(value)}


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
