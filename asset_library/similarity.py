"""The library's similarity index: one exact Hamming index per hash kind, one segment per shard.

Each shard's accepted images become a segment of a :class:`~asset_library.search.HammingIndex`
(for pHash, aHash and dHash alike) plus a file of the segment's md5 keys, so a new shard adds a
segment and a re-run shard replaces only its own: nothing is rebuilt from scratch. An id in the
index is ``segment_number << 32 | row``; the key files map it back to an md5.

Layout under ``<library>/index/``::

    segments.json                  shard -> {number, rows, signature}
    keys/<shard>.npy               (rows, 16) uint8: the md5 digests, in row order
    phash/ ahash/ dhash/           HammingIndex.save() directories
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np

from asset_library.layout import LibraryLayout
from asset_library.search import HammingIndex, connected_groups

HASH_KINDS = ("phash", "ahash", "dhash")
_ROW_BITS = 32


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
        self.segments: dict[str, dict] = {}
        self.indexes: dict[str, HammingIndex] = {kind: HammingIndex() for kind in HASH_KINDS}
        manifest = self.directory / "segments.json"
        if manifest.exists():
            self.segments = json.loads(manifest.read_text())
            for kind in HASH_KINDS:
                if (self.directory / kind).exists():
                    self.indexes[kind] = HammingIndex.load(self.directory / kind, mmap=mmap)
        self._keys: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sum(int(s["rows"]) for s in self.segments.values())

    def sync(self) -> SyncResult:
        """Bring the index level with the lake: add new or re-run shards, drop vanished ones."""
        on_disk = _shard_signatures(self.layout)
        removed = [s for s in self.segments if s not in on_disk]
        changed = [s for s, sig in on_disk.items() if self.segments.get(s, {}).get("sig") != sig]
        for shard in removed:
            self._remove(shard)
        for shard in changed:
            self._add(shard, on_disk[shard])
        if removed or changed:
            self._save()
        return SyncResult(changed, removed, len(on_disk) - len(changed), len(self))

    def query(
        self, hash_value: int, max_distance: int, *, kind: str = "phash", limit: int | None = None
    ) -> list[tuple[str, int]]:
        """(md5, distance) within ``max_distance``, nearest first; each md5 once."""
        found: dict[str, int] = {}
        for identifier, distance in self.indexes[_kind(kind)].query(hash_value, max_distance):
            md5 = self.md5_of(identifier)
            if md5 not in found:
                found[md5] = distance
        ordered = sorted(found.items(), key=lambda item: (item[1], item[0]))
        return ordered if limit is None else ordered[:limit]

    def groups(self, max_distance: int, *, kind: str = "phash") -> list[list[str]]:
        """Connected groups of distinct images within ``max_distance`` of a neighbour."""
        pairs = self.indexes[_kind(kind)].pairs_within(max_distance)
        if len(pairs) == 0:
            return []
        a = self.md5s_of(pairs[:, 0])
        b = self.md5s_of(pairs[:, 1])
        distinct = a != b
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

    def _add(self, shard: str, signature: str) -> None:
        with duckdb.connect() as connection:
            rows = connection.execute(
                "SELECT md5, phash_int, ahash_int, dhash_int FROM read_parquet($files) "
                "ORDER BY md5",
                {"files": [str(p) for p in _shard_files(self.layout, shard)]},
            ).fetchnumpy()
        previous = self.segments.get(shard)
        number = previous["number"] if previous else self._next_number()
        count = len(rows["md5"])
        if count >= 1 << _ROW_BITS:
            raise ValueError(f"shard {shard} has {count:,} images, over 2**32 per segment")
        ids = (np.int64(number) << _ROW_BITS) | np.arange(count, dtype=np.int64)
        digests = np.frombuffer(bytes.fromhex("".join(rows["md5"])), dtype=np.uint8)
        keys_path = self._keys_path(shard)
        keys_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = keys_path.with_name(f".{keys_path.stem}.{uuid.uuid4().hex[:8]}.npy")
        np.save(tmp, digests.reshape(count, 16))
        tmp.replace(keys_path)
        self._keys.pop(number, None)
        for kind in HASH_KINDS:
            hashes = np.asarray(rows[f"{kind}_int"], dtype=np.uint64)
            self.indexes[kind].add_segment(shard, ids, hashes)
        self.segments[shard] = {"number": number, "rows": count, "sig": signature}

    def _remove(self, shard: str) -> None:
        for index in self.indexes.values():
            if shard in index.segments():
                index.remove_segment(shard)
        self._keys.pop(self.segments[shard]["number"], None)
        self._keys_path(shard).unlink(missing_ok=True)
        del self.segments[shard]

    def _save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for kind, index in self.indexes.items():
            index.save(self.directory / kind)
        manifest = self.directory / "segments.json"
        tmp = manifest.with_name(f".segments.{uuid.uuid4().hex[:8]}.json")
        tmp.write_text(json.dumps(self.segments, indent=1, sort_keys=True))
        tmp.replace(manifest)

    def _next_number(self) -> int:
        return max((int(s["number"]) for s in self.segments.values()), default=-1) + 1

    def _keys_path(self, shard: str) -> Path:
        return self.directory / "keys" / f"{shard}.npy"


def _kind(kind: str) -> str:
    if kind not in HASH_KINDS:
        raise ValueError(f"unknown hash {kind!r}: use one of {', '.join(HASH_KINDS)}")
    return kind


def _shard_files(layout: LibraryLayout, shard: str) -> list[Path]:
    return sorted(layout.table_dir("base").glob(f"bucket=*/{shard}.parquet"))


def _shard_signatures(layout: LibraryLayout) -> dict[str, str]:
    """Shard -> a signature of its base files (names, sizes, mtimes): changes when it re-runs."""
    parts: dict[str, list[str]] = {}
    for path in _iter_base_files(layout):
        stat = path.stat()
        parts.setdefault(path.stem, []).append(
            f"{path.parent.name}:{stat.st_size}:{stat.st_mtime_ns}"
        )
    return {shard: "|".join(sorted(items)) for shard, items in parts.items()}


def _iter_base_files(layout: LibraryLayout) -> Iterable[Path]:
    for path in layout.table_dir("base").glob("bucket=*/*.parquet"):
        if not path.name.startswith("_"):
            yield path
