"""Locations that are a local path or a storage URI (``s3://``, ``gs://``, ``abfs://``, ``file://``...).

On a cluster, a sweep's state must be where every node can read it: a shared file system (a path)
or an object store (a URI). Ray Tune and Ray Train accept both as ``storage_path``; the few files
hilbert keeps beside them go through the same pyarrow file systems, so a URI that Ray can use,
hilbert can too (credentials and options such as ``?endpoint_override=`` as pyarrow reads them).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

# pyarrow is imported where it is used: ``import pyarrow.fs`` takes ~0.4 s, and every command of
# the CLI imports this module, most of them never touching a URI.


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


def _file(location: str) -> tuple["Folder", str]:
    return Folder(parent_of(location)), name_of(location)


def read_text(location: str) -> str:
    """The text of a file (a path or a URI); FileNotFoundError when there is none."""
    folder, name = _file(location)
    return folder.read_bytes(name).decode("utf-8")


def write_text(location: str, text: str) -> None:
    """Write a whole file, never half (see :meth:`Folder.write_bytes`)."""
    folder, name = _file(location)
    folder.write_bytes(name, text.encode("utf-8"))


def exists(location: str) -> bool:
    """Whether a file is there."""
    folder, name = _file(location)
    return folder.exists(name)


def write_parquet(table, path: str | Path) -> Path:
    """A Parquet file on the local file system, written whole or not at all (a temporary name in
    its folder, then renamed): a killed writer never leaves half a table where readers look."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, temporary)
    temporary.replace(path)
    return path


def shown(location: str) -> str:
    """A location fit for messages and logs: a URI without its ``?options`` or ``user:secret@``."""
    if not is_uri(location):
        return str(location)
    scheme, _, rest = location.partition("?")[0].partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


@dataclass(frozen=True)
class StoredFile:
    """One file of a listing: its name relative to the listed folder, size in bytes, and when it
    was last written (seconds since the epoch; an object's last-modified time)."""

    name: str
    size: int
    mtime: float


class Folder:
    """The files below one URI, its file system resolved once (resolving costs ~10 ms, more than
    a request). Names below it are relative, ``/``-separated. Pickles as its URI alone."""

    def __init__(self, location: str):
        self.location = location
        self._resolved = None

    def __getstate__(self) -> dict:
        return {"location": self.location, "_resolved": None}

    def _locate(self, relative: str):
        if self._resolved is None:
            self._resolved = _filesystem(self.location)
        fs, base = self._resolved
        return fs, f"{base.rstrip('/')}/{relative}" if relative else base.rstrip("/")

    def uri(self, relative: str) -> str:
        return join(self.location, *relative.split("/"))

    def read_bytes(self, relative: str) -> bytes:
        """The whole file; FileNotFoundError when there is none."""
        fs, path = self._locate(relative)
        try:
            with fs.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise FileNotFoundError(shown(self.uri(relative))) from None

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a whole file, never half: an object store's single upload is all-or-nothing (a
        reader sees the old object or the new one); elsewhere, written beside and renamed over."""
        fs, path = self._locate(relative)
        if fs.type_name in ("s3", "gcs", "abfs"):  # object stores: no folders to make, no rename
            with fs.open_output_stream(path) as stream:
                stream.write(data)
            return
        parent, _, name = path.rpartition("/")
        fs.create_dir(parent, recursive=True)
        partial = f"{parent}/.{name}.{os.getpid()}.{os.urandom(4).hex()}.partial"
        with fs.open_output_stream(partial) as stream:
            stream.write(data)
        fs.move(partial, path)

    def exists(self, relative: str) -> bool:
        import pyarrow.fs

        fs, path = self._locate(relative)
        return fs.get_file_info(path).type == pyarrow.fs.FileType.File

    def files(self, relative: str, recursive: bool = True) -> list[str]:
        """Names (relative to this folder) of every file below ``relative`` (or only of those
        directly in it), in a few listing requests (an object store lists a thousand names per
        request)."""
        import pyarrow.fs

        fs, path = self._locate(relative)
        _, base = self._locate("")
        selector = pyarrow.fs.FileSelector(path, recursive=recursive, allow_not_found=True)
        return [info.path[len(base) + 1:] for info in fs.get_file_info(selector)
                if info.type == pyarrow.fs.FileType.File]

    def stat_files(self, relative: str, recursive: bool = True) -> list[StoredFile]:
        """Like :meth:`files`, with each file's size and modification time (same requests)."""
        import pyarrow.fs

        fs, path = self._locate(relative)
        _, base = self._locate("")
        selector = pyarrow.fs.FileSelector(path, recursive=recursive, allow_not_found=True)
        return [StoredFile(info.path[len(base) + 1:], int(info.size or 0),
                           info.mtime.timestamp() if info.mtime is not None else 0.0)
                for info in fs.get_file_info(selector) if info.type == pyarrow.fs.FileType.File]

    def delete_file(self, relative: str) -> bool:
        """Delete one file; False when it was not there (another process deleted it first)."""
        fs, path = self._locate(relative)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            return False
        return True

    def upload(self, local_dir: str | Path, relative: str) -> None:
        """Copy a local folder's files to ``relative`` (below this folder)."""
        import pyarrow.fs

        fs, path = self._locate(relative)
        fs.create_dir(path, recursive=True)
        pyarrow.fs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)

    def move_in(self, local_dir: str | Path, relative: str) -> None:
        """Move a local folder to ``relative``: a rename when both are on the same local file
        system (no bytes copied), else :meth:`upload` and delete the local folder."""
        target = self.local_path(relative)
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(local_dir, target)
                return
            except OSError:  # another device (or the target exists): copy instead
                pass
        self.upload(local_dir, relative)
        shutil.rmtree(local_dir, ignore_errors=True)

    def local_path(self, relative: str) -> Path | None:
        """``relative`` as a path on this machine when the folder is on a local file system."""
        fs, path = self._locate(relative)
        return Path(path) if fs.type_name == "local" else None

    def download(self, relative: str, local_dir: str | Path) -> Path:
        """Copy the files below ``relative`` into a local folder; returns it."""
        import pyarrow.fs

        fs, path = self._locate(relative)
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(path, str(Path(local_dir).resolve()), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        return Path(local_dir)

    def remove(self, relative: str) -> None:
        """Delete the folder ``relative`` and everything below it (nothing when it is absent)."""
        import pyarrow.fs

        fs, path = self._locate(relative)
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(path)

    def folders(self, relative: str = "") -> list[str]:
        """Names of the folders directly below ``relative``."""
        import pyarrow.fs

        fs, path = self._locate(relative)
        selector = pyarrow.fs.FileSelector(path, recursive=False, allow_not_found=True)
        return [info.base_name for info in fs.get_file_info(selector) if info.type == pyarrow.fs.FileType.Directory]
