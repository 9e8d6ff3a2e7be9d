"""The library's similarity index: one exact Hamming index per hash kind, following ``images``.

The index is level with the lake's ``images`` table at a version it records: each sync reads the
table's change feed since then and adds ONE segment holding the md5s that appeared (pHash, aHash
and dHash alike, with a file of the segment's md5 keys); md5s that left ``images`` are recorded as
removed and skipped by queries. Nothing is rebuilt from scratch. An id in the index is
``segment_number << 32 | row``; the key files map it back to an md5.

``segments.json`` is the one commit point: every other file is written once, under a name of its
own, and ``segments.json`` names them all (directly, or through the manifests it names). A sync
writes its new files, then replaces ``segments.json``; the files the replaced one named and the
new one does not are deleted after. For a library at an ``s3://`` home the files are written in
the machine's cache folder and uploaded there; ``segments.json`` is put only if the home still
holds the version this machine loaded (``If-Match``, or ``If-None-Match: *`` for the first), so
two machines that sync at once cannot overwrite each other: the one that loses deletes what it
uploaded, loads the winner's index and syncs again from it (:data:`PUBLISH_ATTEMPTS` times at
most, waiting longer each time). A file at the home that no ``segments.json`` names (another
machine's upload in flight) is never deleted. A machine that lacks the named files (or whose copy
is damaged) fetches them before it reads or syncs the index: a fresh machine never rebuilds the
index from the whole lake.

Layout under ``<library>/index/``::

    segments.json                  segments (number, rows, keys file), each kind's manifest,
                                   images version and lake version reached, removed md5s
    keys/<segment>-<id>.npy        (rows, 16) uint8: the md5 digests, in row order
    phash/ ahash/ dhash/           HammingIndex.save() directories: ``seg-*`` segment folders and
                                   ``manifest-<id>.json`` manifests
    near_duplicates.parquet        the near-duplicate groups (:mod:`asset_library.near_duplicates`)

An index saved before names were unique (``segments.json`` without ``manifests``: each kind's
``manifest.json``, replaced in place, and ``keys/<segment>.npy``) is read as it is; its next sync
writes the new layout, keeps its segment folders and key files, and deletes the old manifests.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
from deltalake import DeltaTable

from asset_library.index_files import (
    backoff,
    delete_at_home,
    drop_local,
    files_under,
    keys_name,
    manifest_names,
    named_files,
    pull_index,
    read_saved,
)
from asset_library.lake import IMAGES_APP, Lake, read_changes, row_count
from asset_library.lake.scan import lake_dataset
from asset_library.layout import LibraryLayout, atomic_path
from asset_library.search import HammingIndex, connected_groups
from asset_library.search.index import new_manifest_name
from asset_library.search.quality import CONFIRMING_HASH, confirmed
from asset_library.storage.remote import ConflictError

HASH_KINDS = ("phash", "ahash", "dhash")

logger = logging.getLogger(__name__)
_ROW_BITS = 32
#: How many times a sync publishes before it leaves the index to the machines that keep
#: replacing it (each lost attempt deletes what it uploaded and syncs again from theirs).
PUBLISH_ATTEMPTS = 6


class IndexNotReady(RuntimeError):
    """The similarity index is missing, or behind the lake's ``images``."""


class IndexPublishError(RuntimeError):
    """A sync lost every attempt to publish the index: other machines kept replacing it."""


@dataclass(frozen=True)
class SyncResult:
    added: list[str]
    removed: list[str]
    unchanged: int
    images: int


class SimilarityIndex:
    """Exact near-duplicate search over every image of a library."""

    def __init__(self, layout: LibraryLayout, *, mmap: bool = True) -> None:
        self.layout = layout
        self.directory = layout.index_dir
        self.manifest_path = layout.segments_manifest_path
        self.mmap = mmap
        self.segments: dict[str, dict] = {}
        self.images_version = -1
        self.lake_version = -1
        self.removed: set[str] = set()
        self.indexes: dict[str, HammingIndex] = {kind: HammingIndex() for kind in HASH_KINDS}
        #: Each hash kind's manifest, as ``segments.json`` names it.
        self.manifests: dict[str, str] = {}
        self._keys: dict[int, np.ndarray] = {}
        #: Why the saved files cannot be trusted (``None``: they can): the index is then
        #: rebuilt from ``images`` (:meth:`rebuild`).
        self.damage: str | None = None
        self.exists = False
        #: The version of ``segments.json`` loaded (its ETag at an S3 home; ``None``: the home
        #: had none, or none is known), and the files it names: what :meth:`publish` replaces.
        self._loaded_version: str | None = None
        self._named: set[str] = set()
        #: Whether :meth:`update` changed the index since it was loaded or published.
        self._changed = False
        self._open()

    def _open(self) -> None:
        """Load the index as the home holds it now (this machine's copy fetched first, and
        fetched whole again if it is damaged here)."""
        self._forget()
        self.damage = None
        self._changed = False
        pull_index(self.layout, HASH_KINDS)
        self._remember_loaded()
        self.exists = self.manifest_path.exists() or any(
            (self.directory / kind).exists() for kind in HASH_KINDS
        )
        if self.exists:
            self.damage = self._try_load()
            if self.damage is not None and self.layout.remote is not None:
                # This machine's copy is damaged; the home's may be whole.
                logger.warning("similarity index damaged here, fetched again: %s", self.damage)
                self._forget()
                shutil.rmtree(self.directory, ignore_errors=True)
                pull_index(self.layout, HASH_KINDS)
                self._remember_loaded()
                self.damage = self._try_load()
            if self.damage is not None:
                logger.warning(
                    "similarity index damaged, rebuilt from the images table: %s", self.damage
                )
                self._forget()

    def _remember_loaded(self) -> None:
        """Record the version of ``segments.json`` about to be read (read before the file, so
        a copy fetched in between fails the publish's condition rather than passing it) and the
        files it names."""
        self._loaded_version = self.layout.read_version(self.manifest_path)
        self._named = named_files(self.directory, read_saved(self.manifest_path), HASH_KINDS)

    def _try_load(self) -> str | None:
        """Load the saved index; why it cannot be trusted, or ``None``."""
        manifest = self.manifest_path
        try:
            self._load()
        except (OSError, ValueError, KeyError, TypeError, EOFError, StopIteration) as error:
            if str(self.directory) in str(error):
                return str(error)
            return f"{manifest}: {type(error).__name__}: {error}"
        return None

    def _load(self) -> None:
        """Read the saved index and check that its files agree with one another."""
        manifest = self.manifest_path
        saved = json.loads(manifest.read_text())
        self.segments = {str(k): dict(v) for k, v in saved["segments"].items()}
        self.images_version = int(saved["images_version"])
        self.lake_version = int(saved["lake_version"])
        self.removed = {str(m) for m in saved["removed"]}
        self.manifests = manifest_names(saved, HASH_KINDS)
        listed = {name: int(meta["rows"]) for name, meta in self.segments.items()}
        for kind in HASH_KINDS:
            path = self.directory / self.manifests[kind]
            index = HammingIndex.load(path.parent, mmap=self.mmap, manifest=path.name)
            if index.segments() != listed:
                raise ValueError(
                    f"{path}: segments {index.segments()} differ from {manifest}'s {listed}"
                )
            self.indexes[kind] = index
        for name, meta in self.segments.items():
            meta["keys"] = keys_name(name, meta)
            path = self._keys_path(name)
            try:
                shape = np.load(path, mmap_mode="r").shape
            except (OSError, ValueError, EOFError) as error:
                raise ValueError(f"{path}: {error}") from None
            if shape != (int(meta["rows"]), 16):
                raise ValueError(f"{path}: shape {shape}, not ({meta['rows']}, 16)")

    def _forget(self) -> None:
        """Back to an empty index, behind every version of ``images``."""
        self.segments, self.removed, self._keys, self.manifests = {}, set(), {}, {}
        self.images_version = self.lake_version = -1
        self.indexes = {kind: HammingIndex() for kind in HASH_KINDS}

    def rebuild(self, lake: Lake) -> None:
        """One segment of every md5 ``images`` holds, read from the table (not its change
        feed, which a vacuum may have cut short); in memory until :meth:`sync` saves it."""
        self._forget()
        images = lake.open("images")
        if images is None:
            return
        rows = lake_dataset(images, lake).to_table(columns=["md5", *HASH_KINDS])
        rows = rows.sort_by("md5")
        version = images.version()
        if rows.num_rows:
            self._add(
                f"v{version:010d}",
                {
                    name: rows[name].to_numpy(zero_copy_only=False).astype(str)
                    for name in rows.column_names
                },
            )
        merged = images.transaction_version(IMAGES_APP)
        self.images_version = version
        self.lake_version = -1 if merged is None else int(merged)
        self.exists = True
        self._changed = True

    def __len__(self) -> int:
        """Images the index answers for: its entries less the removed ones (each entry's md5
        is held once; a removed md5 keeps its entry until it comes back)."""
        return sum(int(s["rows"]) for s in self.segments.values()) - len(self.removed)

    def sync(self, lake: Lake) -> SyncResult:
        """Bring the index level with ``images`` and publish it (:meth:`update`, then
        :meth:`publish`). When another machine published first, sync again from the index it
        published, after a jittered wait that doubles each time; :class:`IndexPublishError`
        after :data:`PUBLISH_ATTEMPTS` lost attempts."""
        lost: ConflictError | None = None
        for attempt in range(PUBLISH_ATTEMPTS):
            synced = self.update(lake)
            try:
                self.publish()
            except ConflictError as error:
                logger.info("similarity index: %s; syncing again from it", error)
                lost = error
                if attempt + 1 < PUBLISH_ATTEMPTS:
                    time.sleep(backoff(attempt))
                continue
            return synced
        raise IndexPublishError(
            f"{self.layout.home_of(self.manifest_path)}: another machine published the "
            f"similarity index first {PUBLISH_ATTEMPTS} times in a row ({lost}); this sync "
            "published nothing: run refresh_library again"
        ) from lost

    def update(self, lake: Lake) -> SyncResult:
        """Bring the index level with ``images`` in memory and in this machine's files (one
        new segment for the md5s that appeared since the version it reached; md5s that left
        are recorded as removed), publishing nothing (:meth:`publish` does). A table older
        than the index (a view read before the index's version) changes nothing."""
        if self.damage is not None:
            self._clear_files()
            self.rebuild(lake)
            self._write()
            self.damage = None
            return SyncResult(list(self.segments), [], 0, len(self))
        images = lake.open("images")
        if images is None:
            return SyncResult([], [], len(self.segments), len(self))
        version = images.version()
        merged = images.transaction_version(IMAGES_APP)
        lake_version = -1 if merged is None else int(merged)
        added: list[str] = []
        gone: list[str] = []
        if version < self.images_version or (
            version == self.images_version and lake_version == self.lake_version and self.exists
        ):
            return SyncResult([], [], len(self.segments), len(self))
        if version > self.images_version:
            changes = read_changes(
                lake, images, self.images_version + 1, version, ["md5", "phash", "ahash", "dhash"]
            )
            with duckdb.connect() as connection:
                connection.register("changes", changes)
                # Per md5, its first and last change in the range (a delete before an insert
                # within one commit: a rewrite), and its hashes as last inserted.
                seen = connection.sql(
                    """
                    SELECT md5,
                           arg_min(_change_type, position) = 'delete' AS was_in,
                           arg_max(_change_type, position) = 'insert' AS is_in,
                           arg_max(phash, position) AS phash,
                           arg_max(ahash, position) AS ahash,
                           arg_max(dhash, position) AS dhash
                    FROM (SELECT *, _commit_version * 2
                                    + CASE _change_type WHEN 'delete' THEN 0 ELSE 1 END
                                    AS position
                          FROM changes WHERE _change_type IN ('insert', 'delete'))
                    GROUP BY md5 ORDER BY md5
                    """
                ).fetchnumpy()
            md5s = seen["md5"].astype(str)
            was_in, is_in = seen["was_in"].astype(bool), seen["is_in"].astype(bool)
            held = np.isin(md5s, sorted(self.removed)) if self.removed else np.zeros_like(is_in)
            # An md5 rewritten (compaction) or back after a removal keeps its entry: its hashes
            # are its bytes'. Only an md5 the index never held gets a new one.
            new = is_in & ~was_in & ~held
            if new.any():
                name = f"v{version:010d}"
                self._add(name, {"md5": md5s[new], **{k: seen[k][new] for k in HASH_KINDS}})
                added.append(name)
            gone = md5s[was_in & ~is_in].tolist()
            self.removed.difference_update(md5s[is_in & held].tolist())
            self.removed.update(gone)
        self.images_version = version
        self.lake_version = lake_version
        self._write(segments=bool(added))
        self.exists = True
        return SyncResult(added, gone, len(self.segments) - len(added), len(self))

    def publish(self) -> None:
        """Make what :meth:`update` wrote the library's index: the new files first (each under
        a name of its own), then ``segments.json``, which names them all (the one commit), then
        delete the files the replaced ``segments.json`` named and this one does not.

        At an ``s3://`` home ``segments.json`` is put only if the home still holds the version
        this index was loaded from. If another machine published since, what this attempt
        uploaded is deleted there and here, the index is loaded again as the home holds it
        now, and :class:`ConflictError` is raised (:meth:`sync` then updates again)."""
        if not self._changed:
            return
        saved = self._saved()
        named = named_files(self.directory, saved, HASH_KINDS)
        new = named - self._named
        remote = self.layout.remote
        uploaded: list[Path] = []
        try:
            for path in files_under(self.directory, new) if remote is not None else ():
                remote.publish(path)  # type: ignore[union-attr]
                uploaded.append(path)
            text = json.dumps(saved, indent=1, sort_keys=True)
            self.layout.publish_replacing(self.manifest_path, text, read=self._loaded_version)
        except BaseException as error:
            if remote is not None and uploaded:
                remote.delete(uploaded)
            if isinstance(error, ConflictError):
                drop_local(self.directory, new)
                self._open()
            raise
        replaced = self._named - named
        delete_at_home(self.layout, replaced)
        drop_local(self.directory, replaced)
        self._loaded_version = self.layout.read_version(self.manifest_path)
        self._named = named
        self._changed = False

    def check_level(self, lake: Lake, images: DeltaTable | None = None) -> None:
        """Raise :class:`IndexNotReady` if the index is missing or behind ``images`` (the table
        as given, else as of its latest commit)."""
        images = images if images is not None else lake.open("images")
        if images is None:
            return
        if not self.exists:
            if row_count(images) == 0:
                return
            raise IndexNotReady(
                f"the similarity index is missing ({self.directory}): run refresh_library"
            )
        merged = images.transaction_version(IMAGES_APP)
        merged = -1 if merged is None else int(merged)
        if images.version() > self.images_version and merged != self.lake_version:
            changes = read_changes(lake, images, self.images_version + 1, images.version(), ["md5"])
            with duckdb.connect() as connection:
                connection.register("changes", changes)
                behind = connection.sql(
                    "SELECT count(DISTINCT md5) FROM changes WHERE _change_type = 'insert'"
                ).fetchall()[0][0]
            raise IndexNotReady(
                f"the similarity index is behind the lake: {behind} images not indexed "
                "(run refresh_library)"
            )

    def query(
        self, hash_value: int, max_distance: int, *, kind: str = "phash", limit: int | None = None
    ) -> list[tuple[str, int]]:
        """(md5, distance) within ``max_distance``, nearest first; each md5 once."""
        found: dict[str, int] = {}
        for identifier, distance in self.indexes[_kind(kind)].query(hash_value, max_distance):
            md5 = self.md5_of(identifier)
            if md5 not in found and md5 not in self.removed:
                found[md5] = distance
        ordered = sorted(found.items(), key=lambda item: (item[1], item[0]))
        return ordered if limit is None else ordered[:limit]

    def groups(
        self,
        max_distance: int,
        *,
        kind: str = "phash",
        exclude: Iterable[str] = (),
        confirm: int | None = None,
    ) -> list[list[str]]:
        """Connected groups of distinct images within ``max_distance`` of a neighbour; md5s in
        ``exclude`` (e.g. low-information images) neither join a group nor link two. With
        ``confirm``, a pair links only when its second hash is within that many bits too, as
        :meth:`Library.similar` keeps a match (:mod:`asset_library.search.quality`)."""
        pairs = self.indexes[_kind(kind)].pairs_within(max_distance)
        if len(pairs) and confirm is not None:
            second = self.indexes[CONFIRMING_HASH[kind]]
            close = confirmed(second.hashes_of(pairs[:, 0]), second.hashes_of(pairs[:, 1]), confirm)
            pairs = pairs[close]
        if len(pairs) == 0:
            return []
        a = self.md5s_of(pairs[:, 0])
        b = self.md5s_of(pairs[:, 1])
        distinct = a != b
        left_out = self.removed | set(exclude)
        if left_out:
            gone = np.array(sorted(left_out), dtype="U32")
            distinct &= ~np.isin(a, gone) & ~np.isin(b, gone)
        names, codes = np.unique(np.concatenate([a[distinct], b[distinct]]), return_inverse=True)
        if len(names) == 0:
            return []
        half = len(codes) // 2
        edges = np.stack([codes[:half], codes[half:], np.zeros(half, np.int64)], axis=1)
        grouped = connected_groups(edges, np.arange(len(names)))
        return [sorted(names[group].tolist()) for group in grouped]

    def md5_of(self, identifier: int) -> str:
        return str(self.md5s_of(np.array([identifier], dtype=np.int64))[0])

    def md5s_of(self, identifiers: np.ndarray) -> np.ndarray:
        """md5 hex strings of index ids, vectorised per segment."""
        identifiers = np.asarray(identifiers, dtype=np.int64)
        numbers = identifiers >> _ROW_BITS
        rows = identifiers & ((1 << _ROW_BITS) - 1)
        digests = np.empty((len(identifiers), 16), dtype=np.uint8)
        for number in np.unique(numbers):
            where = numbers == number
            digests[where] = self._segment_keys(int(number))[rows[where]]
        hexed = digests.tobytes().hex()
        return np.array([hexed[i : i + 32] for i in range(0, len(hexed), 32)], dtype="U32")

    def _segment_keys(self, number: int) -> np.ndarray:
        keys = self._keys.get(number)
        if keys is None:
            shard = next(s for s, meta in self.segments.items() if meta["number"] == number)
            keys = np.load(self._keys_path(shard), mmap_mode="r")
            self._keys[number] = keys
        return keys

    def _add(self, name: str, rows: dict[str, np.ndarray]) -> None:
        number = self._next_number()
        count = len(rows["md5"])
        if count >= 1 << _ROW_BITS:
            raise ValueError(f"segment {name} has {count:,} images, over 2**32 per segment")
        ids = (np.int64(number) << _ROW_BITS) | np.arange(count, dtype=np.int64)
        digests = np.frombuffer(bytes.fromhex("".join(rows["md5"].tolist())), dtype=np.uint8)
        # In memory until :meth:`_write` saves it: a reader's rebuild writes nothing.
        self._keys[number] = digests.reshape(count, 16)
        keys = f"keys/{name}-{uuid.uuid4().hex[:12]}.npy"
        for kind in HASH_KINDS:
            hashes = np.frombuffer(bytes.fromhex("".join(rows[kind].tolist())), dtype=">u8").astype(
                np.uint64
            )
            self.indexes[kind].add_segment(name, ids, hashes)
        self.segments[name] = {"number": number, "rows": count, "keys": keys}

    def _write(self, *, segments: bool = True) -> None:
        """Save the index's new files here, each under a name of its own (the segments not
        saved yet and a manifest per kind, unless no segment changed); ``segments.json`` is
        :meth:`publish`'s."""
        self._changed = True
        for meta in self.segments.values():
            path = self.directory / meta["keys"]
            if not path.exists():
                digests = self._keys.pop(int(meta["number"]), None)
                if digests is None:
                    raise FileNotFoundError(f"{path}: a segment's keys file went missing here")
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp, tmp.open("wb") as out:
                    np.save(out, digests)
        if not segments and set(self.manifests) == set(HASH_KINDS):
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        unpublished = {m for m in self.manifests.values() if m not in self._named}
        for kind, index in self.indexes.items():
            name = new_manifest_name()
            index.save(self.directory / kind, manifest=name)
            self.manifests[kind] = f"{kind}/{name}"
        drop_local(self.directory, unpublished)  # an earlier update's, never published

    def _saved(self) -> dict:
        """What ``segments.json`` records."""
        return {
            "segments": self.segments,
            "manifests": self.manifests,
            "images_version": self.images_version,
            "lake_version": self.lake_version,
            "removed": sorted(self.removed),
        }

    def _clear_files(self) -> None:
        """Remove the damaged files, so the rebuilt index is saved from nothing."""
        for name in (*HASH_KINDS, "keys"):
            shutil.rmtree(self.directory / name, ignore_errors=True)
        self.manifest_path.unlink(missing_ok=True)

    def _next_number(self) -> int:
        return max((int(s["number"]) for s in self.segments.values()), default=-1) + 1

    def _keys_path(self, shard: str) -> Path:
        return self.directory / keys_name(shard, self.segments[shard])


def loaded_index(layout: LibraryLayout, lake: Lake) -> SimilarityIndex:
    """The index as last saved (memory-mapped), or rebuilt in memory from ``images`` when its
    files are damaged: what a reader answers from; the next sync saves it again."""
    index = SimilarityIndex(layout)
    if index.damage is not None:
        index.rebuild(lake)
    return index


def _kind(kind: str) -> str:
    if kind not in HASH_KINDS:
        raise ValueError(f"unknown hash {kind!r}: use one of {', '.join(HASH_KINDS)}")
    return kind
