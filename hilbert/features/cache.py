"""A content-addressed, crash-safe store of frozen-encoder features.

Layout under the cache root::

    entries/audio/ab/<key>.safetensors   one document's audio features [segments, dim]
    entries/text/cd/<key>.safetensors    one document's text features  [segments, dim]
    entries/timing/ef/<key>.safetensors  one document's segment timing [segments, columns]
                                         (hilbert.features.timing; no encoder)
    sets/<set id>.json                   which entry holds each document of one manifest,
                                         for one (audio encoder, text encoder) pair
    fingerprints.json                    memo: audio file (path, size, mtime) -> sha256
    pending/extract-<token>.json         keys a running extraction is about to name in a set
    pending/prune-<token>.json           marker of a running `hilbert cache prune`

An entry's key is a hash of everything its values depend on (see :func:`audio_entry_key` and
:func:`text_entry_key`), so an unchanged document is a cache hit whatever run, manifest or node
asks for it, and changing one part of the key recomputes exactly the entries it touches.

Every file is written to a temporary name in its final folder, flushed, then renamed into place
(``os.replace`` is atomic on POSIX file systems): a killed extraction leaves either a whole entry
or none, and the next run resumes from what is there. Stored as safetensors: no pickle anywhere.

The root may also be a URI (an object store such as ``s3://bucket/cache``, or any pyarrow file
system), so that every node of a cluster shares one cache: each file is one upload there, which
readers see whole or not at all, and each node reads through a local mirror of the same layout
(see :class:`FeatureCache`).

Entries no feature set names any more are deleted by :mod:`hilbert.features.housekeeping`
(``hilbert cache prune``); the pending references and prune markers here are its protocol with
concurrent extractions, described there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from hilbert import storage

Modality = Literal["audio", "text"]
MODALITIES: tuple[Modality, ...] = ("audio", "text")
# What a cache entry can hold: an encoder's features of one modality, or a document's segment
# timing (computed from the manifest by hilbert.features.timing, by no encoder).
EntryKind = Literal["audio", "text", "timing"]
ENTRY_KINDS: tuple[EntryKind, ...] = ("audio", "text", "timing")
TIMING: EntryKind = "timing"

# Bump when the meaning of stored features changes without any key input changing (for example
# a fix in how segments are sliced): every old entry then misses instead of being reused.
CACHE_FORMAT_VERSION = 1

# How audio is prepared before any encoder sees it; part of every audio key.
AUDIO_PREPROCESSING = {"downmix": "mean", "resampler": "torchaudio.functional.resample(sinc)",
                       "slicing": "round(seconds * rate), clipped to the signal"}

# Where node-local mirrors of URI roots live, unless $HILBERT_CACHE_MIRROR names another folder.
MIRROR_ENV = "HILBERT_CACHE_MIRROR"
DEFAULT_MIRRORS = Path("~/.cache/hilbert/mirrors")

# Temporary files older than this are leftovers of a killed writer, not a writer in progress.
STALE_TEMPORARY_SECONDS = 3600

# Pending references and prune markers (see hilbert.features.housekeeping for the protocol).
PENDING = "pending"
EXTRACTION_PREFIX, PRUNE_PREFIX = "extract-", "prune-"
# A pending reference counts at least this long after its last write (a prune's grace period may
# make it longer); a running extraction rewrites its reference well within it.
PENDING_REFERENCE_SECONDS = 3600
PENDING_REFRESH_SECONDS = 600
# A prune rewrites its marker this often while it deletes; a marker older than the stale age is
# a killed prune's, which nobody needs to wait for.
PRUNE_MARKER_REFRESH_SECONDS = 30
PRUNE_MARKER_STALE_SECONDS = 120


class CacheError(RuntimeError):
    """A cache entry or feature set that is missing, corrupt or inconsistent."""


class FeatureValueError(ValueError):
    """Features that are not finite; the message names the document and the encoder."""


def _digest(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def audio_entry_key(audio_sha256: str, spans: Iterable[tuple[float, float]],
                    encoder_fingerprint: Mapping[str, Any]) -> str:
    """Key of one document's audio features.

    Covers the audio content (sha256 of the file bytes, so a moved or renamed file still hits),
    every segment's start and end, the encoder's identity and settings, the audio preprocessing
    and the cache format version.
    """
    return _digest({"v": CACHE_FORMAT_VERSION, "modality": "audio", "audio": audio_sha256,
                    "spans": [[float(s), float(e)] for s, e in spans],
                    "encoder": dict(encoder_fingerprint), "preprocessing": AUDIO_PREPROCESSING})


def text_entry_key(texts: Iterable[str], encoder_fingerprint: Mapping[str, Any]) -> str:
    """Key of one document's text features: every segment's text and the encoder's identity."""
    return _digest({"v": CACHE_FORMAT_VERSION, "modality": "text", "texts": list(texts),
                    "encoder": dict(encoder_fingerprint)})


def timing_entry_key(spans: Iterable[tuple[float, float]], texts: Iterable[str],
                     timing_fingerprint: Mapping[str, Any]) -> str:
    """Key of one document's timing rows: every segment's start, end and text, and the timing
    features' version and columns."""
    return _digest({"v": CACHE_FORMAT_VERSION, "modality": TIMING, "spans": [[float(s), float(e)] for s, e in spans],
                    "texts": list(texts), "timing": dict(timing_fingerprint)})


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file, or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    """``payload`` as standard JSON (NaN and infinities, which JSON lacks, become null), atomically."""
    text = json.dumps(_without_non_finite(payload), indent=1, ensure_ascii=False, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def _without_non_finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _without_non_finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_non_finite(item) for item in value]
    return value


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def entry_name(modality: EntryKind, key: str) -> str:
    """Where entry ``key`` lives, relative to the cache root."""
    return f"entries/{modality}/{key[:2]}/{key}.safetensors"


def parse_entry_name(name: str) -> tuple[EntryKind, str] | None:
    """``(kind, key)`` of an entry's relative name; None for anything else (a temporary)."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "entries" or parts[1] not in ENTRY_KINDS or not parts[3].endswith(".safetensors"):
        return None
    key = parts[3][:-len(".safetensors")]
    return (parts[1], key) if parts[2] == key[:2] and not key.startswith(".") else None  # type: ignore[return-value]


def is_temporary(name: str) -> bool:
    """Whether a relative name is a writer's temporary file: ``atomic_write_bytes``'s ``.*.tmp``,
    or :meth:`storage.Folder.write_bytes`'s ``.*.partial`` on a shared file system."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") and base.endswith((".tmp", ".partial"))


def _token() -> str:
    return f"{int(time.time())}-{os.getpid()}-{os.urandom(4).hex()}"


def mirror_folder(uri: str) -> Path:
    """This node's mirror of the cache at ``uri``: one folder per URI (its ``?options`` aside)."""
    mirrors = Path(os.environ.get(MIRROR_ENV) or DEFAULT_MIRRORS).expanduser()
    return mirrors / hashlib.sha256(uri.partition("?")[0].rstrip("/").encode("utf-8")).hexdigest()[:16]


@dataclass
class FeatureSet:
    """Where the features of every document of one manifest live, for one encoder pair.

    Written once extraction of the whole manifest has finished, so its presence means every
    entry it names exists. Training and evaluation read features through it.
    """

    manifest: str
    manifest_sha256: str
    audio_encoder: str
    text_encoder: str
    audio_fingerprint: dict[str, Any]
    text_fingerprint: dict[str, Any]
    audio_dim: int
    text_dim: int
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)  # doc_id -> audio, text, timing, segments
    created: float = field(default_factory=time.time)
    # hilbert.features.timing.timing_fingerprint() of the timing entries each document names
    # ("timing"); None in feature sets written before timing features existed: they have none.
    timing: dict[str, Any] | None = None

    @staticmethod
    def set_id(manifest_sha256: str, audio_encoder: str, text_encoder: str) -> str:
        return _digest({"manifest": manifest_sha256, "audio": audio_encoder, "text": text_encoder})[:32]

    @property
    def id(self) -> str:
        return self.set_id(self.manifest_sha256, self.audio_encoder, self.text_encoder)

    def document_identity(self, doc_id: str) -> str:
        """What a document is under these encoders, whatever its ``doc_id``: its audio and text
        entry keys (audio bytes, segment spans, transcripts) hashed to 16 hex digits. A model
        records the identities of the documents it trained on, so that scoring it on one of them
        can be caught."""
        entry = self.documents[doc_id]
        return hashlib.sha256(f"{entry['audio']}:{entry['text']}".encode("ascii")).hexdigest()[:16]


class FeatureCache:
    """The feature store rooted at ``root`` (created on first write): a folder, or a URI.

    With a URI (``s3://``, ``gs://``, any pyarrow file system) the store is shared by every node
    and authoritative; ``root`` is then a node-local mirror folder that holds whatever this node
    wrote or read (``$HILBERT_CACHE_MIRROR``, default ``~/.cache/hilbert/mirrors``, one subfolder
    per URI). An entry's key covers everything its values depend on, so a mirror copy is never
    stale. Entries reach the store before the mirror, so a mirror never claims what the store
    lacks. ``location`` is what to hand to other processes and nodes, never ``root``.
    """

    def __init__(self, root: str | Path):
        self.location = storage.absolute(root)
        self.store: storage.Folder | None = None
        if storage.is_uri(self.location):
            self.store = storage.Folder(self.location)
            self.root = mirror_folder(self.location)
        else:
            self.root = Path(root)

    def _shown(self, relative: str) -> str:
        """Where file ``relative`` lives, for messages."""
        return storage.shown(self.store.uri(relative)) if self.store else str(self.root / relative)

    def _refresh(self, relative: str) -> bool:
        """Copy file ``relative`` from the store into the mirror (atomically); False when the store
        has none (or the root is local)."""
        if self.store is None:
            return False
        try:
            data = self.store.read_bytes(relative)
        except FileNotFoundError:
            return False
        atomic_write_bytes(self.root / relative, data)
        return True

    def _write(self, relative: str, data: bytes) -> Path:
        """Write file ``relative``: to the store first, then the mirror (or only the local root)."""
        if self.store is not None:
            self.store.write_bytes(relative, data)
        path = self.root / relative
        atomic_write_bytes(path, data)
        return path

    def local_copy(self, relative: str) -> Path:
        """The local path of file ``relative`` (say ``splits/x.json``), refreshed from the store
        first when the root is a URI (the store's copy wins); it may not exist."""
        self._refresh(relative)
        return self.root / relative

    def publish(self, relative: str) -> None:
        """Copy local file ``relative`` (written at :meth:`local_copy`'s path) to the store."""
        if self.store is not None:
            self.store.write_bytes(relative, (self.root / relative).read_bytes())

    @property
    def authority(self) -> storage.Folder:
        """The files every reader trusts: the store for a URI root, else the root folder itself.
        Housekeeping lists and deletes through it."""
        return self.store if self.store is not None else storage.Folder(self.location)

    def write_authoritative(self, relative: str, data: bytes) -> None:
        """Write file ``relative`` to the store only (or the local root): for files that concern
        every node, not this node's mirror (pending references, prune markers)."""
        if self.store is not None:
            self.store.write_bytes(relative, data)
        else:
            atomic_write_bytes(self.root / relative, data)

    def delete_authoritative(self, relative: str) -> bool:
        """Delete file ``relative`` from the store (or the local root); False when it was not there."""
        if self.store is not None:
            return self.store.delete_file(relative)
        try:
            (self.root / relative).unlink()
        except FileNotFoundError:
            return False
        return True

    # entries ------------------------------------------------------------------------------
    @staticmethod
    def _entry(modality: EntryKind, key: str) -> str:
        return entry_name(modality, key)

    def entry_path(self, modality: EntryKind, key: str) -> Path:
        return self.root / self._entry(modality, key)

    def has(self, modality: EntryKind, key: str) -> bool:
        """True when a complete, readable entry exists (header checked, values not read).

        With a URI root: when the store holds the entry (the mirror is not asked: the store is
        what other nodes read). A corrupt local entry counts as missing, so it is recomputed.
        """
        if self.store is not None:
            return self.store.exists(self._entry(modality, key))
        path = self.entry_path(modality, key)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="numpy") as entry:
                return "features" in entry.keys()
        except (SafetensorError, OSError, ValueError):
            return False  # a corrupt file (say, a truncated copy) is recomputed, then replaced

    def present(self, modality: EntryKind, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` :meth:`has`; a store is listed once rather than asked key by key."""
        keys = list(keys)
        if self.store is None or len(keys) <= 16:
            return {key for key in keys if self.has(modality, key)}
        listed = set(self.store.files(f"entries/{modality}"))
        return {key for key in keys if self._entry(modality, key) in listed}

    def put(self, modality: EntryKind, key: str, features: np.ndarray, *, doc_id: str, encoder: str) -> Path:
        """Store one document's features atomically after checking they are finite; returns the
        local (mirror) path."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2:
            raise FeatureValueError(f"doc_id {doc_id!r}: {modality} encoder {encoder!r} returned shape "
                                    f"{features.shape}, expected [segments, dim]")
        bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
        if bad_rows.size:
            raise FeatureValueError(
                f"doc_id {doc_id!r}: {modality} encoder {encoder!r} produced NaN or infinite features "
                f"for segments {bad_rows[:10].tolist()}{' ...' if bad_rows.size > 10 else ''}")
        metadata = {"doc_id": doc_id, "encoder": encoder, "modality": modality, "key": key,
                    "format_version": str(CACHE_FORMAT_VERSION)}
        return self._write(self._entry(modality, key), safetensors_bytes({"features": features}, metadata=metadata))

    def get(self, modality: EntryKind, key: str) -> np.ndarray:
        relative = self._entry(modality, key)
        path = self.root / relative
        if self.store is not None and not path.is_file():
            self._refresh(relative)
        try:
            try:
                return self._read_features(path)
            except FileNotFoundError:
                # A mirror copy pruned between the check above and the open: the store still has it.
                if not self._refresh(relative):
                    raise
                return self._read_features(path)
        except FileNotFoundError:
            raise CacheError(f"cache entry missing: {self._shown(relative)} (run `hilbert extract` again)") from None
        except (SafetensorError, OSError, ValueError) as error:
            if self.store is not None:
                path.unlink(missing_ok=True)  # the next read downloads it again
            raise CacheError(f"cache entry unreadable: {self._shown(relative)} ({error}); "
                             "delete it and extract again") from error

    @staticmethod
    def _read_features(path: Path) -> np.ndarray:
        # Once open, the file stays readable on POSIX even if a prune unlinks it meanwhile.
        with safe_open(str(path), framework="numpy") as entry:
            return entry.get_tensor("features")

    # feature sets -------------------------------------------------------------------------
    @staticmethod
    def _feature_set(set_id: str) -> str:
        return f"sets/{set_id}.json"

    def feature_set_path(self, set_id: str) -> Path:
        return self.root / self._feature_set(set_id)

    def feature_set_location(self, set_id: str) -> str:
        """Where the feature set lives, for messages (its URI without options, or its path)."""
        return self._shown(self._feature_set(set_id))

    def write_feature_set(self, feature_set: FeatureSet) -> Path:
        payload = json.dumps(asdict(feature_set), indent=1, ensure_ascii=False) + "\n"
        return self._write(self._feature_set(feature_set.id), payload.encode("utf-8"))

    def read_feature_set(self, manifest_sha256: str, audio_encoder: str, text_encoder: str) -> FeatureSet | None:
        """The feature set, or None; with a URI root the store's copy is read (and mirrored)."""
        relative = self._feature_set(FeatureSet.set_id(manifest_sha256, audio_encoder, text_encoder))
        if self.store is not None and not self._refresh(relative):
            return None
        path = self.root / relative
        if not path.is_file():
            return None
        try:
            return FeatureSet(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as error:
            raise CacheError(f"feature set unreadable: {self._shown(relative)} ({error}); "
                             "run `hilbert extract` again") from error

    def feature_set_ids(self) -> list[str]:
        """Ids of every feature set the cache holds (the store's, for a URI root)."""
        names = self.authority.files("sets", recursive=False)
        return sorted(name[len("sets/"):-len(".json")] for name in names
                      if name.endswith(".json") and not name.rsplit("/", 1)[-1].startswith("."))

    def feature_set_by_id(self, set_id: str) -> FeatureSet | None:
        """The feature set ``set_id`` as the store (or local root) holds it, or None; the mirror
        is neither read nor written (housekeeping looks at every set, training reads through
        :meth:`read_feature_set`)."""
        relative = self._feature_set(set_id)
        try:
            payload = self.authority.read_bytes(relative)
        except FileNotFoundError:
            return None
        try:
            return FeatureSet(**json.loads(payload.decode("utf-8")))
        except (ValueError, TypeError) as error:
            raise CacheError(f"feature set unreadable: {self._shown(relative)} ({error}); "
                             "run `hilbert extract` again, or delete it") from error

    def load_document(self, feature_set: FeatureSet, doc_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The (audio [S, Da], text [S, Dt]) features of one document of ``feature_set``."""
        try:
            entry = feature_set.documents[doc_id]
        except KeyError:
            raise CacheError(f"doc_id {doc_id!r} is not in feature set {feature_set.id}") from None
        audio, text = self.get("audio", entry["audio"]), self.get("text", entry["text"])
        if audio.shape[0] != text.shape[0]:
            raise CacheError(f"doc_id {doc_id!r}: {audio.shape[0]} audio vs {text.shape[0]} text segment features")
        return audio, text

    def load_timing(self, feature_set: FeatureSet, doc_id: str) -> np.ndarray:
        """The timing rows [S, columns of ``feature_set.timing``] of one document of ``feature_set``."""
        try:
            entry = feature_set.documents[doc_id]
        except KeyError:
            raise CacheError(f"doc_id {doc_id!r} is not in feature set {feature_set.id}") from None
        if feature_set.timing is None or TIMING not in entry:
            raise CacheError(f"feature set {feature_set.id} was written before segment timing features existed: "
                             "run `hilbert extract` again to add them (or train with data.timing: false)")
        return self.get(TIMING, entry[TIMING])

    # audio fingerprints -------------------------------------------------------------------
    def audio_sha256(self, paths: Iterable[Path]) -> dict[Path, str]:
        """sha256 of each audio file, memoised by (path, size, mtime) so re-runs skip hashing.

        The memo is about this machine's files, so with a URI root it stays in the mirror."""
        memo_path = self.root / "fingerprints.json"
        try:
            memo = json.loads(memo_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            memo = {}
        result, changed = {}, False
        for path in paths:
            stat = path.stat()
            stamp = [stat.st_size, stat.st_mtime_ns]
            remembered = memo.get(str(path.resolve()))
            if remembered and remembered[:2] == stamp:
                result[path] = remembered[2]
                continue
            result[path] = file_sha256(path)
            memo[str(path.resolve())] = [*stamp, result[path]]
            changed = True
        if changed:
            atomic_write_json(memo_path, memo)
        return result

    # pending references and prune markers -------------------------------------------------
    @contextmanager
    def referencing(self, keys: Mapping[EntryKind, Iterable[str]],
                    description: str = "") -> Iterator["PendingReference"]:
        """Publish ``keys`` as a pending reference for the duration of the block: a concurrent
        ``hilbert cache prune`` keeps those entries even though no feature set names them yet."""
        reference = PendingReference(self, keys, description)
        reference.write()
        try:
            yield reference
        finally:
            reference.remove()

    def prunes_in_progress(self) -> list[str]:
        """Names of the markers of prunes running now (stale markers of killed prunes left out)."""
        cutoff = time.time() - PRUNE_MARKER_STALE_SECONDS
        return [stored.name for stored in self.authority.stat_files(PENDING, recursive=False)
                if stored.name.rsplit("/", 1)[-1].startswith(PRUNE_PREFIX) and stored.mtime >= cutoff]

    def wait_for_prunes(self, log: Callable[[str], None] = print, poll_seconds: float = 0.5) -> None:
        """Return once no prune is running: one that read the references before this process
        published its pending reference may still be deleting entries this process counted as
        present."""
        running = self.prunes_in_progress()
        if running:
            log(f"waiting for {len(running)} `hilbert cache prune` in progress on {self.location_shown} "
                f"({', '.join(running)})")
        while running:
            time.sleep(poll_seconds)
            running = self.prunes_in_progress()

    @property
    def location_shown(self) -> str:
        """The root for messages: its URI without options or credentials, or its path."""
        return storage.shown(self.location)

    # housekeeping -------------------------------------------------------------------------
    def remove_stale_temporaries(self, older_than_seconds: float = STALE_TEMPORARY_SECONDS) -> int:
        """Delete temporary files left by killed writers (in the mirror, for a URI root); returns
        how many were removed. An object store never shows a half-written object."""
        if not self.root.exists():
            return 0
        cutoff, removed = time.time() - older_than_seconds, 0
        for temporary in self.root.rglob(".*.tmp"):
            try:
                if temporary.stat().st_mtime < cutoff:
                    temporary.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # another process finished or removed it meanwhile
        return removed


class PendingReference:
    """Entry keys an extraction is about to name in a feature set, written to the cache before it
    looks at which entries exist and deleted after its feature set is written.

    A prune treats it as a reference while it is fresh; :meth:`keep_alive` rewrites it now and
    then so a long extraction's stays fresh, and a killed extraction's expires.
    """

    def __init__(self, cache: FeatureCache, keys: Mapping[EntryKind, Iterable[str]], description: str = ""):
        self.cache = cache
        self.name = f"{PENDING}/{EXTRACTION_PREFIX}{_token()}.json"
        payload = {"description": description, "host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.time(), **{m: sorted(set(keys.get(m, ()))) for m in ENTRY_KINDS}}
        self._payload = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._written = 0.0

    def write(self) -> None:
        self.cache.write_authoritative(self.name, self._payload)
        self._written = time.monotonic()

    def keep_alive(self) -> None:
        """Rewrite the reference when its last write is getting old (cheap to call often)."""
        if time.monotonic() - self._written > PENDING_REFRESH_SECONDS:
            self.write()

    def remove(self) -> None:
        self.cache.delete_authoritative(self.name)
