"""Cache housekeeping: what a feature cache holds, and deleting what no feature set needs any
more, safely while other processes read from it and extract into it.

:func:`cache_info` describes a cache (``hilbert cache info``); :func:`prune_cache` deletes its
garbage (``hilbert cache prune``), :func:`prune_mirror` one node's mirror of a URI root and
:func:`prune_mirrors_on_cluster` the mirror of every node of a Ray cluster.

What a prune deletes
--------------------
An entry (a document's audio or text features, or its segment timing rows) is *referenced*
when a feature set (``sets/<id>.json``) names its key, or a fresh pending reference does
(``pending/extract-*.json``: every key a running extraction's feature set will name). A prune deletes an entry when it is unreferenced and older than the grace period
``older_than`` (default 1 h, like ``git gc``'s), its age being now minus the time it was written
(the file's mtime, an object's last-modified time). Files of writers in progress are kept at
least :data:`~hilbert.features.cache.STALE_TEMPORARY_SECONDS` (temporaries) or
:data:`~hilbert.features.cache.PENDING_REFERENCE_SECONDS` (pending references) whatever
``older_than`` says, so ``older_than=0`` (``git gc --prune=now``) still leaves a running
extraction alone. Nothing else is deleted: ``fingerprints.json``, ``splits/`` and folders stay
(a folder removed could be the one a writer is about to create its temporary in).

``drop_sets`` deletes those feature sets first; their entries then go by the rule above, so an
entry another set or a pending reference names stays, and so does one written within the grace
period. A process that already holds a dropped set (a training run, a sweep) may lose its
entries: drop only sets no running job uses.

With a URI root the store is pruned (it is authoritative), then this node's mirror: a mirror
copy goes when the store no longer holds it (whatever its age), or when it is unreferenced and
older than the grace period; so does a mirror copy of a feature set the store no longer holds.
Other nodes' mirrors: :func:`prune_mirrors_on_cluster`. Deleting a whole mirror folder is always
safe: the store holds everything in it but the audio fingerprint memo.

The protocol with concurrent extractions and readers
----------------------------------------------------
::

    extraction (hilbert.features.extract)         prune (Pruner)
    E1 publish the pending reference               P1 list the entries
    E2 check which entries exist; encode the rest  P2 write its marker pending/prune-<token>.json
       (rewriting the reference every 10 min)      P3 read the fresh pending references, then
    E3 wait while a fresh prune marker exists         the feature sets (listed after that)
    E4 check again; encode what vanished, once     P4 delete the dropped sets, then the old
    E5 write the feature set                          unreferenced entries (marker rewritten
    E6 delete the pending reference                   every 30 s)
                                                   P5 delete its marker

No feature set ever names a deleted entry. Its entries were all present at E4. A prune that
read the references (P3) after E1 saw the pending reference (or, if that was already gone, the
feature set written before it went) and kept them. A prune that read them before E1 had written
its marker (P2) before that, and keeps it until its last deletion (P5): E3 waited for it, so E4
saw every deletion it made. A killed prune's marker is stale after
:data:`~hilbert.features.cache.PRUNE_MARKER_STALE_SECONDS`; a killed extraction's pending
reference expires after ``max(older_than, PENDING_REFERENCE_SECONDS)``. A prune killed at any
point leaves a consistent cache: feature sets are deleted (only when asked) before any entry,
and an entry only when no feature set names it. Readers: a file already open stays readable
after it is unlinked (POSIX), and a reader whose mirror copy was deleted gets it again from the
store (:meth:`FeatureCache.get`). The store is assumed to give read-after-write and listing
consistency (S3, GCS and POSIX file systems do).

Which encoder an entry belongs to
---------------------------------
The encoder of the feature sets that name it (the first alphabetically, when two spellings of
one encoder share entries); timing entries have no encoder and are named by their version
(``segment-timing v1``). Feature sets written before timing entries existed name none. An unreferenced entry: the ``encoder`` field of its safetensors
header when a local copy exists (a local root, or this node's mirror), else ``(unknown)``:
reading headers from an object store would cost one request per entry.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

from safetensors import SafetensorError, safe_open

from hilbert import storage
from hilbert.features.cache import (
    ENTRY_KINDS,
    EXTRACTION_PREFIX,
    TIMING,
    PENDING,
    PENDING_REFERENCE_SECONDS,
    PRUNE_MARKER_REFRESH_SECONDS,
    PRUNE_MARKER_STALE_SECONDS,
    PRUNE_PREFIX,
    STALE_TEMPORARY_SECONDS,
    CacheError,
    FeatureCache,
    FeatureSet,
    entry_name,
    file_sha256,
    is_temporary,
    parse_entry_name,
)
from hilbert.features.timing import timing_label
from hilbert.ray_runtime import connect
from hilbert.storage import StoredFile

DEFAULT_GRACE_SECONDS = 3600.0
UNKNOWN_ENCODER = "(unknown)"
# What a prune removes, in the order its reports list them.
KINDS = ("audio entries", "text entries", "timing entries", "feature sets", "pending references", "prune markers",
         "temporaries")


class HousekeepingError(ValueError):
    """A request that cannot be carried out as asked (an unknown feature set id, a cluster
    prune of a local cache); the message says what to do instead."""


# durations ---------------------------------------------------------------------------------
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30m``, ``1h``, ``2d``, ``1w``, ``1h30m``, ``90s``, ``0`` or ``now``."""
    cleaned = text.strip().lower().replace(" ", "")
    if cleaned in ("0", "now"):
        return 0.0
    if not re.fullmatch(r"(\d+(\.\d+)?[smhdw])+", cleaned):
        raise ValueError(f"{text!r} is not a duration: write a number and a unit (s, m, h, d, w), such as 30m, "
                         "1h, 2d or 1h30m, or 0 for no grace period")
    return sum(float(number) * _UNITS[unit] for number, unit in re.findall(r"(\d+(?:\.\d+)?)([smhdw])", cleaned))


def format_duration(seconds: float) -> str:
    """The shortest of ``parse_duration``'s spellings for whole units: 3600 -> ``1h``, 5400 -> ``1h30m``."""
    if seconds <= 0:
        return "0s"
    parts, rest = [], round(seconds)
    for unit, size in (("w", _UNITS["w"]), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) or f"{seconds:g}s"


# what a tree holds -------------------------------------------------------------------------
@dataclass
class Tally:
    """A number of files and their bytes."""

    files: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.files += 1
        self.bytes += size


@dataclass
class _Inventory:
    """One listing of a cache tree (the store, a local root or a mirror), sorted by kind."""

    entries: dict[str, StoredFile] = field(default_factory=dict)  # relative name -> file
    sets: dict[str, StoredFile] = field(default_factory=dict)  # set id -> file
    pending: list[StoredFile] = field(default_factory=list)
    markers: list[StoredFile] = field(default_factory=list)
    temporaries: list[StoredFile] = field(default_factory=list)
    other: list[StoredFile] = field(default_factory=list)

    @property
    def total(self) -> Tally:
        return _total([*self.entries.values(), *self.sets.values(), *self.pending, *self.markers,
                       *self.temporaries, *self.other])


def _listing(folder: storage.Folder, relative: str = "") -> list[StoredFile]:
    try:
        return folder.stat_files(relative)
    except OSError as error:  # unreachable store, denied credentials, a file where a folder should be
        raise CacheError(f"cannot list {storage.shown(folder.uri(relative) if relative else folder.location)}: "
                         f"{error}") from error


def _inventory(folder: storage.Folder) -> _Inventory:
    inventory = _Inventory()
    for stored in _listing(folder):
        name, parts = stored.name, stored.name.split("/")
        if is_temporary(name):
            inventory.temporaries.append(stored)
        elif parse_entry_name(name):
            inventory.entries[name] = stored
        elif len(parts) == 2 and parts[0] == "sets" and name.endswith(".json"):
            inventory.sets[parts[1][:-len(".json")]] = stored
        elif len(parts) == 2 and parts[0] == PENDING and parts[1].startswith(EXTRACTION_PREFIX):
            inventory.pending.append(stored)
        elif len(parts) == 2 and parts[0] == PENDING and parts[1].startswith(PRUNE_PREFIX):
            inventory.markers.append(stored)
        else:
            inventory.other.append(stored)
    return inventory


@dataclass
class _References:
    """What the entries of a tree are needed for, as read at one moment (step P3)."""

    sets: dict[str, FeatureSet]  # id -> feature set
    from_sets: set[str]  # entry names some feature set names
    from_pending: set[str]  # entry names only a fresh pending reference names
    expired_pending: list[str]  # names of pending references too old to count
    names: set[str] = field(init=False)  # either

    def __post_init__(self) -> None:
        self.names = self.from_sets | self.from_pending


def _read_references(cache: FeatureCache, *, older_than: float, exclude_sets: Collection[str] = (),
                     heartbeat: Callable[[], None] = lambda: None) -> _References:
    """Fresh pending references first, then the feature sets, listed after them: an extraction
    whose pending reference vanished meanwhile has written its feature set before deleting it."""
    lifetime, now = max(older_than, PENDING_REFERENCE_SECONDS), time.time()
    pending: set[str] = set()
    expired = []
    for stored in _listing(cache.authority, PENDING):
        if not stored.name.rsplit("/", 1)[-1].startswith(EXTRACTION_PREFIX) or is_temporary(stored.name):
            continue
        if now - stored.mtime > lifetime:
            expired.append(stored.name)
            continue
        try:
            payload = json.loads(cache.authority.read_bytes(stored.name).decode("utf-8"))
        except FileNotFoundError:
            continue  # finished: its feature set is written, and listed below
        except ValueError as error:
            raise CacheError(f"pending reference unreadable: {storage.shown(cache.authority.uri(stored.name))} "
                             f"({error}); delete it if no extraction is running") from error
        pending.update(entry_name(kind, key) for kind in ENTRY_KINDS for key in payload.get(kind, ()))
        heartbeat()
    sets, named = {}, set()
    for set_id in cache.feature_set_ids():
        if set_id in exclude_sets:
            continue
        feature_set = cache.feature_set_by_id(set_id)
        if feature_set is None:
            continue  # dropped meanwhile by another prune
        sets[set_id] = feature_set
        named.update(_entry_names(feature_set))
        heartbeat()
    return _References(sets, named, pending - named, expired)


def _entry_names(feature_set: FeatureSet) -> set[str]:
    """Every entry ``feature_set`` names (timing entries only in sets written since they exist)."""
    return {entry_name(kind, document[kind]) for document in feature_set.documents.values()
            for kind in ENTRY_KINDS if kind in document}


def _header_encoder(path: Path) -> str:
    """The ``encoder`` a local entry's safetensors header records (the header alone is read)."""
    try:
        with safe_open(str(path), framework="numpy") as entry:
            return (entry.metadata() or {}).get("encoder", UNKNOWN_ENCODER)
    except (SafetensorError, OSError, ValueError):
        return UNKNOWN_ENCODER


# cache info --------------------------------------------------------------------------------
@dataclass
class EncoderUsage:
    """The entries of one modality that belong to one encoder."""

    modality: str
    encoder: str
    entries: int = 0
    bytes: int = 0
    unreferenced_entries: int = 0
    unreferenced_bytes: int = 0


@dataclass
class SetSummary:
    """One feature set: what it covers and how many bytes of entries it names (entries shared
    with other sets count in each)."""

    id: str
    manifest: str
    audio_encoder: str
    text_encoder: str
    documents: int
    created: float
    bytes: int
    missing_entries: int  # entries it names that the cache lacks: extract again
    # "current" (the manifest file still has the content it was made from), "changed" (edited
    # since: a set no run of it will read again, a candidate to drop) or "absent" (not on this machine)
    manifest_state: str


@dataclass
class CacheInfo:
    """What ``hilbert cache info`` shows; :meth:`to_json` is its ``--json``."""

    location: str  # the root, for messages (a URI without options or credentials)
    is_uri: bool
    exists: bool  # anything at all under the root
    mirror: str | None  # this node's mirror folder, for a URI root
    mirror_size: Tally | None
    modalities: dict[str, Tally]
    encoders: list[EncoderUsage]
    sets: list[SetSummary]
    unreferenced: Tally
    pending_references: Tally  # fresh ones (running extractions)
    prunes_in_progress: int
    temporaries: Tally
    stale_temporaries: Tally  # older than STALE_TEMPORARY_SECONDS: left by killed writers
    other: Tally  # fingerprints.json, splits/, anything else
    total: Tally

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cache_info(location: str | Path) -> CacheInfo:
    """Entries and bytes per modality and encoder, every feature set, unreferenced entries,
    pending references and leftover temporaries of the cache at ``location`` (a folder or a
    URI; for a URI also the size of this node's mirror). A missing cache is an empty one."""
    cache = FeatureCache(location)
    inventory = _inventory(cache.authority)
    references = _read_references(cache, older_than=0.0)
    now = time.time()
    fresh_pending = [p for p in inventory.pending if now - p.mtime <= PENDING_REFERENCE_SECONDS]
    expired_pending = [p for p in inventory.pending if now - p.mtime > PENDING_REFERENCE_SECONDS]
    return CacheInfo(
        location=cache.location_shown, is_uri=cache.store is not None, exists=bool(inventory.total.files),
        mirror=str(cache.root) if cache.store is not None else None,
        mirror_size=_inventory(storage.Folder(str(cache.root.resolve()))).total if cache.store is not None else None,
        modalities={kind: _total(stored for name, stored in inventory.entries.items()
                                 if name.startswith(f"entries/{kind}/")) for kind in ENTRY_KINDS},
        encoders=_encoder_usage(cache, inventory, references),
        sets=[_set_summary(feature_set, inventory) for feature_set in references.sets.values()],
        unreferenced=_total(stored for name, stored in inventory.entries.items() if name not in references.names),
        pending_references=_total(fresh_pending),
        prunes_in_progress=sum(now - marker.mtime <= PRUNE_MARKER_STALE_SECONDS for marker in inventory.markers),
        temporaries=_total(inventory.temporaries),
        stale_temporaries=_total(t for t in inventory.temporaries if now - t.mtime > STALE_TEMPORARY_SECONDS),
        other=_total([*inventory.other, *inventory.markers, *expired_pending]),
        total=inventory.total)


def _total(files: Iterable[StoredFile]) -> Tally:
    tally = Tally()
    for stored in files:
        tally.add(stored.size)
    return tally


def _encoder_usage(cache: FeatureCache, inventory: _Inventory, references: _References) -> list[EncoderUsage]:
    named_by: dict[str, str] = {}  # entry name -> encoder (the first alphabetically)
    for feature_set in references.sets.values():
        timing = timing_label(feature_set.timing)
        for document in feature_set.documents.values():
            for kind, encoder in (("audio", feature_set.audio_encoder), ("text", feature_set.text_encoder),
                                  (TIMING, timing)):
                if kind not in document:
                    continue  # a timing entry, in a set written before they existed
                name = entry_name(kind, document[kind])
                named_by[name] = min(encoder, named_by.get(name, encoder))
    usage: dict[tuple[str, str], EncoderUsage] = {}
    for name, stored in inventory.entries.items():
        modality = name.split("/")[1]
        encoder = named_by.get(name) or _local_encoder(cache, name)
        row = usage.setdefault((modality, encoder), EncoderUsage(modality, encoder))
        row.entries += 1
        row.bytes += stored.size
        if name not in references.names:
            row.unreferenced_entries += 1
            row.unreferenced_bytes += stored.size
    return [usage[key] for key in sorted(usage, key=lambda k: (ENTRY_KINDS.index(k[0]), k[1]))]


def _local_encoder(cache: FeatureCache, name: str) -> str:
    """The encoder in the header of a local copy of entry ``name`` (the local root's, or this
    node's mirror copy), if there is one."""
    path = cache.root / name
    return _header_encoder(path) if path.is_file() else UNKNOWN_ENCODER


def _manifest_state(feature_set: FeatureSet) -> str:
    path = Path(feature_set.manifest)
    if not path.is_file():
        return "absent"
    return "current" if file_sha256(path) == feature_set.manifest_sha256 else "changed"


def _set_summary(feature_set: FeatureSet, inventory: _Inventory) -> SetSummary:
    names = _entry_names(feature_set)
    return SetSummary(
        id=feature_set.id, manifest=feature_set.manifest, audio_encoder=feature_set.audio_encoder,
        text_encoder=feature_set.text_encoder, documents=len(feature_set.documents), created=feature_set.created,
        bytes=sum(inventory.entries[name].size for name in names if name in inventory.entries),
        missing_entries=sum(name not in inventory.entries for name in names),
        manifest_state=_manifest_state(feature_set))


# prune -------------------------------------------------------------------------------------
@dataclass
class PruneReport:
    """What one prune of one tree removed, or would remove (``dry_run``)."""

    location: str  # the cache, for messages
    tree: str  # "cache" (a local root), "store" (a URI root) or "mirror" (one node's mirror of it)
    path: str  # the tree pruned: the root, the store's URI, or the mirror folder
    dry_run: bool
    older_than: float
    removed: dict[str, Tally] = field(default_factory=lambda: {kind: Tally() for kind in KINDS})
    kept_young: Tally = field(default_factory=Tally)  # unreferenced entries within the grace period
    kept_pending: Tally = field(default_factory=Tally)  # entries only a running extraction names
    dropped_sets: list[str] = field(default_factory=list)
    node: str = ""  # the host, for a mirror
    error: str = ""  # why a node's mirror could not be pruned

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PruneReport":
        tallies = {name: Tally(**data[name]) for name in ("kept_young", "kept_pending")}
        return cls(**{**data, **tallies, "removed": {kind: Tally(**t) for kind, t in data["removed"].items()}})


def _kind_of(name: str) -> str:
    parsed = parse_entry_name(name)
    if parsed:
        return f"{parsed[0]} entries"
    if is_temporary(name):
        return "temporaries"
    if name.startswith("sets/"):
        return "feature sets"
    return "prune markers" if name.rsplit("/", 1)[-1].startswith(PRUNE_PREFIX) else "pending references"


@dataclass
class PrunePlan:
    """What a prune will delete, in order: dropped feature sets first, then everything else."""

    drop: list[str]  # relative names of the feature sets to drop
    delete: list[StoredFile]
    kept_young: Tally
    kept_pending: Tally


class Pruner:
    """One prune of a cache's authoritative tree (the local root, or the store of a URI root).

    Used as a context manager it lists the entries (P1) and writes its marker (P2) on entry and
    deletes the marker on exit; :meth:`plan` reads the references (P3) and :meth:`apply`
    deletes (P4); see the module docstring. A dry run writes no marker and deletes nothing.
    """

    def __init__(self, location: str | Path, *, older_than: float = DEFAULT_GRACE_SECONDS,
                 drop_sets: Iterable[str] = (), dry_run: bool = False):
        if older_than < 0:
            raise HousekeepingError(f"older_than must be 0 or more seconds, not {older_than}")
        self.cache = FeatureCache(location)
        self.older_than, self.dry_run = older_than, dry_run
        self.drop_sets = list(dict.fromkeys(drop_sets))
        self.marker = f"{PENDING}/{PRUNE_PREFIX}{int(time.time())}-{os.getpid()}-{os.urandom(4).hex()}.json"
        self._inventory: _Inventory | None = None
        self._marked, self._marker_written = False, 0.0

    def __enter__(self) -> "Pruner":
        self._inventory = _inventory(self.cache.authority)
        unknown = [set_id for set_id in self.drop_sets if set_id not in self._inventory.sets]
        if unknown:
            known = ", ".join(sorted(self._inventory.sets)) or "none"
            raise HousekeepingError(f"no feature set {', '.join(map(repr, unknown))} in {self.cache.location_shown} "
                                    f"(its feature sets: {known}; `hilbert cache info` lists them)")
        # Only entries listed now can be deleted: with none, no extraction needs to wait for us
        # (and looking at a missing cache does not create it).
        self._marked = not self.dry_run and bool(self._inventory.entries)
        if self._marked:
            self._write_marker()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._marked:
            self.cache.delete_authoritative(self.marker)

    def _write_marker(self) -> None:
        payload = {"host": socket.gethostname(), "pid": os.getpid(), "refreshed": time.time()}
        self.cache.write_authoritative(self.marker, json.dumps(payload).encode("utf-8"))
        self._marker_written = time.monotonic()

    def _heartbeat(self) -> None:
        """Keep the marker fresh while this prune works, so extractions keep waiting for it."""
        if self._marked and time.monotonic() - self._marker_written > PRUNE_MARKER_REFRESH_SECONDS:
            self._write_marker()

    def plan(self) -> PrunePlan:
        """Read the references now and decide what to delete."""
        assert self._inventory is not None, "use Pruner as a context manager"
        inventory, now = self._inventory, time.time()
        references = _read_references(self.cache, older_than=self.older_than, exclude_sets=self.drop_sets,
                                      heartbeat=self._heartbeat)
        delete: list[StoredFile] = []
        kept_young, kept_pending = Tally(), Tally()
        for name, stored in sorted(inventory.entries.items()):
            if name in references.from_sets:
                continue
            if name in references.from_pending:
                kept_pending.add(stored.size)
            elif now - stored.mtime <= self.older_than:
                kept_young.add(stored.size)
            else:
                delete.append(stored)
        writer_grace = max(self.older_than, STALE_TEMPORARY_SECONDS)
        delete += [t for t in inventory.temporaries if now - t.mtime > writer_grace]
        expired = set(references.expired_pending)
        delete += [p for p in inventory.pending if p.name in expired]
        delete += [m for m in inventory.markers if now - m.mtime > PRUNE_MARKER_STALE_SECONDS]
        return PrunePlan([f"sets/{set_id}.json" for set_id in self.drop_sets], delete, kept_young, kept_pending)

    def apply(self, plan: PrunePlan) -> PruneReport:
        """Delete what ``plan`` names (nothing in a dry run); returns what went."""
        assert self._inventory is not None, "use Pruner as a context manager"
        report = PruneReport(self.cache.location_shown, "store" if self.cache.store else "cache",
                             self.cache.location_shown, self.dry_run, self.older_than,
                             kept_young=plan.kept_young, kept_pending=plan.kept_pending,
                             dropped_sets=[name[len("sets/"):-len(".json")] for name in plan.drop])
        sizes = {name: self._inventory.sets[name[len("sets/"):-len(".json")]].size for name in plan.drop}
        for stored in [StoredFile(name, size, 0.0) for name, size in sizes.items()] + plan.delete:
            if self.dry_run or self.cache.delete_authoritative(stored.name):
                report.removed[_kind_of(stored.name)].add(stored.size)
            self._heartbeat()
        return report


def prune_cache(location: str | Path, *, older_than: float = DEFAULT_GRACE_SECONDS, drop_sets: Iterable[str] = (),
                dry_run: bool = False, mirror: bool = True, cluster_address: str | None = None) -> list[PruneReport]:
    """Prune the cache at ``location`` (see the module docstring): its report first, then, for a
    URI root and ``mirror``, a report per mirror pruned after it: this node's, or with
    ``cluster_address`` (``auto``, ``ray://head:10001``, ``local``) every alive node's."""
    if cluster_address is not None and mirror and not storage.is_uri(storage.absolute(location)):
        raise HousekeepingError(f"{location} is a local folder: only a URI root has node mirrors to prune "
                                "(leave out the Ray address)")
    with Pruner(location, older_than=older_than, drop_sets=drop_sets, dry_run=dry_run) as pruner:
        plan = pruner.plan()
        reports = [pruner.apply(plan)]
    if not mirror or pruner.cache.store is None:
        return reports
    gone = [*plan.drop, *(stored.name for stored in plan.delete)] if dry_run else []
    if cluster_address is None:
        return reports + [prune_mirror(location, older_than=older_than, dry_run=dry_run, assume_removed=gone)]
    return reports + prune_mirrors_on_cluster(pruner.cache.location, address=cluster_address, older_than=older_than,
                                              dry_run=dry_run, assume_removed=gone)


def prune_mirror(location: str | Path, *, older_than: float = DEFAULT_GRACE_SECONDS, dry_run: bool = False,
                 assume_removed: Collection[str] = ()) -> PruneReport:
    """Prune this node's mirror of the URI root ``location`` against its store: copies of what
    the store no longer holds, unreferenced copies older than ``older_than``, stale temporaries.

    ``assume_removed``: store files (relative names) to count as gone, so a dry run of a store
    prune shows what the mirror prune after it would remove.
    """
    cache = FeatureCache(location)
    if cache.store is None:
        raise HousekeepingError(f"{cache.location_shown} is a local folder: it has no mirror (only a URI root has one)")
    report = PruneReport(cache.location_shown, "mirror", str(cache.root), dry_run, older_than,
                         node=socket.gethostname())
    mirror = storage.Folder(str(cache.root.resolve()))
    local = _inventory(mirror)  # before the store: a copy listed here reached the store first
    gone = set(assume_removed)
    stored = {name for name in _inventory(cache.authority).entries if name not in gone}
    sets = {f"sets/{set_id}.json" for set_id in cache.feature_set_ids()} - gone
    dropped = [name[len("sets/"):-len(".json")] for name in gone if name.startswith("sets/")]
    references = _read_references(cache, older_than=older_than, exclude_sets=dropped)
    now, writer_grace = time.time(), max(older_than, STALE_TEMPORARY_SECONDS)
    delete = [copy for name, copy in local.entries.items() if name not in stored or (
        name not in references.names and now - copy.mtime > older_than)]
    delete += [copy for set_id, copy in local.sets.items() if f"sets/{set_id}.json" not in sets]
    delete += [copy for copy in local.temporaries if now - copy.mtime > writer_grace]
    for copy in delete:
        if dry_run or mirror.delete_file(copy.name):
            report.removed[_kind_of(copy.name)].add(copy.size)
    return report


def prune_mirrors_on_cluster(location: str, *, address: str | None, older_than: float = DEFAULT_GRACE_SECONDS,
                             dry_run: bool = False, assume_removed: Collection[str] = (),
                             timeout_seconds: float = 600.0) -> list[PruneReport]:
    """:func:`prune_mirror` on every alive node of the Ray cluster at ``address``: one task per
    node, pinned to it and taking no CPU, so it runs beside whatever the node is busy with. Each
    node's mirror folder is its own (its ``$HILBERT_CACHE_MIRROR``). A node that fails or does not
    answer within ``timeout_seconds`` gets a report with its error."""
    import ray  # only with --address: `hilbert cache` on one machine starts without Ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not storage.is_uri(location):
        raise HousekeepingError(f"{location} is a local folder: only a URI root has node mirrors to prune")
    connect(address)
    task = ray.remote(num_cpus=0, max_retries=0)(_prune_mirror_here)
    removed = ray.put(list(assume_removed))
    nodes = {node["NodeID"]: node.get("NodeManagerAddress", "?") for node in ray.nodes() if node.get("Alive")}
    asked = {node_id: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
        location, older_than, dry_run, removed) for node_id in nodes}
    ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=timeout_seconds)
    reports = []
    for node_id, reference in asked.items():
        where = f"{nodes[node_id]} ({node_id[:12]})"
        try:
            if reference not in ready:
                ray.cancel(reference, force=True)
                raise TimeoutError(f"no answer in {timeout_seconds:.0f} s")
            reports.append(PruneReport.from_json(ray.get(reference)))
        except Exception as error:  # a node that died, a store it cannot reach: report it, go on
            message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            reports.append(PruneReport(storage.shown(location), "mirror", "", dry_run, older_than, node=where,
                                       error=message))
    return reports


def _prune_mirror_here(location: str, older_than: float, dry_run: bool, assume_removed: list[str]) -> dict[str, Any]:
    """The Ray task: plain JSON back, no pickled objects."""
    return prune_mirror(location, older_than=older_than, dry_run=dry_run, assume_removed=assume_removed).to_json()
