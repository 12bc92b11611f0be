"""Locations that are a local path or a storage URI (``s3://``, ``gs://``, ``abfs://``, ``file://``...).

On a cluster, a sweep's state must be where every node can read it: a shared file system (a path)
or an object store (a URI). Ray Tune and Ray Train accept both as ``storage_path``; the few files
hilbert keeps beside them go through the same pyarrow file systems, so a URI that Ray can use,
hilbert can too (credentials and options such as ``?endpoint_override=`` as pyarrow reads them).
"""

from __future__ import annotations

import os
from pathlib import Path


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def absolute(location: str | Path) -> str:
    """A URI as it is; a local path made absolute (Ray needs absolute storage paths)."""
    return str(location) if is_uri(location) else str(Path(location).resolve())


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a path or a URI (its ``?options`` kept at the end)."""
    if not is_uri(location):
        return str(Path(location, *parts))
    base, _, options = location.partition("?")
    joined = "/".join([base.rstrip("/"), *parts])
    return f"{joined}?{options}" if options else joined


def name_of(location: str) -> str:
    return location.partition("?")[0].rstrip("/").rsplit("/", 1)[-1] if is_uri(location) else Path(location).name


def parent_of(location: str) -> str:
    if not is_uri(location):
        return str(Path(location).parent)
    base, _, options = location.partition("?")
    parent = base.rstrip("/").rsplit("/", 1)[0]
    return f"{parent}?{options}" if options else parent


def _filesystem(location: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(location)


def read_text(location: str) -> str:
    """The text of a file; FileNotFoundError when there is none."""
    if not is_uri(location):
        return Path(location).read_text(encoding="utf-8")
    fs, path = _filesystem(location)
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(location)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def write_text(location: str, text: str) -> None:
    """Write a whole file, never half: a local file is written beside and renamed over; an object
    store's single upload is already all-or-nothing."""
    data = text.encode("utf-8")
    if not is_uri(location):
        target = Path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        partial.write_bytes(data)
        os.replace(partial, target)
        return
    fs, path = _filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def exists(location: str) -> bool:
    if not is_uri(location):
        return Path(location).exists()
    import pyarrow.fs

    fs, path = _filesystem(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
