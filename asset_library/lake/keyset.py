"""The md5s ``images`` holds, kept on local disk as sorted 128-bit digests, so a merge asks
"which of these md5s are new?" with a binary search per md5 instead of reading the md5 column of
every bucket (the one cost of a merge that grew with the library: about 0.2 s per million
images, 200 s a merge at a billion).

A cache of the table, never a second truth. For a library at an ``s3://`` home the cache is kept
beside the lake there too (published after each merge, fetched by a machine that lacks it or
whose copy is damaged), so a merge on a fresh machine does not read every bucket first. It
records the table it describes (its Delta table id), the version it is level with and the merge
that made that version; a merge trusts it only while that commit is there as that merge made it
and every ``images`` commit since changed no row (compaction's rewrite, a vacuum). Otherwise the
merge reads the md5 column of every bucket, batch by batch, and rebuilds it from what it read. A
merge that deletes md5s (a shard replaced or emptied) clears it.

On disk: ``keys.json`` (table, version, the total of md5s, runs) and one ``.npy`` per run, a
``(2, n)`` uint64 array of the md5s' high and low halves sorted by the high half. Each run is
listed with its md5s, its size in bytes and its CRC-32, and the total must be the table's row
count: a manifest or run damaged in any way (cut, emptied, overwritten, a run dropped from the
list) is found before the merge believes it, logged naming the file, and the cache is cleared,
so that merge reads the table and rebuilds it. Checking the CRCs reads every run once a merge
(about 0.4 s per 100M md5s at 2.5 GB/s). Each merge that adds md5s adds a
run; runs of equal size are merged (a binary counter), so a library of N md5s added M at a time
holds at most log2(N / M) + 1 runs, and each md5 is rewritten that many times in its life.
"""

from __future__ import annotations

import json
import logging
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from asset_library.ids import is_md5
from asset_library.layout import LibraryLayout, atomic_path, atomic_write_text

MANIFEST = "keys.json"
_CHUNK = 1 << 26

logger = logging.getLogger(__name__)


class KeyCacheError(OSError):
    """A run of the key cache could not be read: the merge reads the table instead."""


def md5_text(md5s: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """md5 keys as a numpy ``S32`` array (over Arrow's own buffer when there is one chunk):
    each key's 32 characters, which sort as the text does. ``ValueError`` names a key of
    another length."""
    texts = [_chunk_text(chunk) for chunk in _chunks(md5s)]
    if len(texts) == 1:
        return texts[0]
    return np.concatenate(texts) if texts else np.empty(0, "S32")


def _chunks(md5s: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    """One chunk at a time: joined, a column past 2 GB of text overflows its offsets."""
    return list(md5s.chunks) if isinstance(md5s, pa.ChunkedArray) else [md5s]


def _chunk_text(chunk: pa.Array) -> np.ndarray:
    text = chunk.cast(pa.string())
    if not len(text):
        return np.empty(0, "S32")
    if text.null_count:
        raise ValueError("md5 keys: a null md5")
    offsets = np.frombuffer(text.buffers()[1], np.int32)[text.offset : text.offset + len(text) + 1]
    lengths = np.diff(offsets)
    if (lengths != 32).any():
        bad = text[int(np.flatnonzero(lengths != 32)[0])].as_py()
        raise ValueError(f"md5 key {bad!r}: not 32 hexadecimal digits")
    return np.frombuffer(text.buffers()[2], "S32", len(text), int(offsets[0]))


def digests(md5s: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """md5 keys (32 hex digits each) as a ``(2, n)`` uint64 array: the high and low halves of
    each digest, so comparing (high, low) orders them as their text."""
    found = np.empty((2, len(md5s)), np.uint64)
    at = 0
    for chunk in _chunks(md5s):
        text = _chunk_text(chunk)
        try:
            raw = bytes.fromhex(text.tobytes().decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raw = b""
        if len(raw) != 16 * len(text):  # fromhex also skips spaces: name the first bad key
            bad = next(k.decode("latin-1") for k in text if not is_md5(k.decode("latin-1")))
            raise ValueError(f"md5 key {bad!r}: not 32 hexadecimal digits")
        halves = np.frombuffer(raw, ">u8")
        found[0, at : at + len(text)] = halves[0::2]
        found[1, at : at + len(text)] = halves[1::2]
        at += len(text)
    return found


def _sorted(keys: np.ndarray) -> np.ndarray:
    """The digests by high half (a stable sort: two sorted runs merge in linear time)."""
    return keys[:, np.argsort(keys[0], kind="stable")]


def _in_run(run: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """Which of the probe digests the run holds (the run sorted by high half)."""
    high, low = run[0], run[1]
    left = np.searchsorted(high, probe[0], "left")
    found = np.zeros(probe.shape[1], bool)
    at = left < len(high)
    candidates = np.flatnonzero(at)
    same = high[left[candidates]] == probe[0][candidates]
    candidates = candidates[same]
    found[candidates] = low[left[candidates]] == probe[1][candidates]
    # Two md5s sharing a high half (one pair in 10^10 at a billion): look along the run.
    after = np.minimum(left[candidates] + 1, len(high) - 1)
    shared = candidates[(after > left[candidates]) & (high[after] == probe[0][candidates])]
    for i in shared:
        end = int(np.searchsorted(high, probe[0][i], "right"))
        found[i] = bool((low[left[i] : end] == probe[1][i]).any())
    return found


def _merged(before: np.ndarray, after: np.ndarray, out: np.ndarray) -> None:
    """Two runs sorted by high half into ``out`` (a file mapped in memory): each md5 of
    ``after`` goes after the ``before`` ones it does not precede, in one pass."""
    at = np.searchsorted(before[0], after[0], "right") + np.arange(after.shape[1])
    placed = np.zeros(out.shape[1], bool)
    placed[at] = True
    for half in (0, 1):
        out[half, at] = after[half]
        out[half, ~placed] = before[half]


@dataclass(frozen=True)
class _Run:
    file: str
    rows: int
    size: int = 0
    crc32: int = 0

    def as_json(self) -> dict:
        return {"file": self.file, "rows": self.rows, "bytes": self.size, "crc32": self.crc32}


def _file_crc(path: Path) -> int:
    """The CRC-32 of a file, read in chunks."""
    crc = 0
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _damage(directory: Path, manifest: dict) -> str | None:
    """Why the manifest or a run it lists is not what was written (``None``: intact)."""
    try:
        runs = [
            _Run(str(r["file"]), int(r["rows"]), int(r["bytes"]), int(r["crc32"]))
            for r in manifest["runs"]
        ]
        total = int(manifest["total"])
    except (KeyError, TypeError, ValueError) as error:
        return f"{directory / MANIFEST}: malformed ({type(error).__name__}: {error})"
    if sum(r.rows for r in runs) != total:
        return f"{directory / MANIFEST}: runs hold {sum(r.rows for r in runs)} md5s, not {total}"
    for run in runs:
        path = directory / run.file
        if "/" in run.file or not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != run.size:
            return f"{path}: {path.stat().st_size} bytes, not {run.size}"
        if _file_crc(path) != run.crc32:
            return f"{path}: CRC-32 differs from the one written"
        try:
            shape = np.load(path, mmap_mode="r").shape
        except (OSError, ValueError, EOFError) as error:
            return f"{path}: unreadable ({error})"
        if shape != (2, run.rows):
            return f"{path}: shape {shape}, not (2, {run.rows})"
    return None


@dataclass(frozen=True)
class CachedKeys:
    """The cache's runs as one merge found them."""

    directory: Path
    runs: list[_Run]

    def held(self, md5s: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Which of these md5s the table holds; ``KeyCacheError`` naming a run that went
        missing or cannot be read (another merge rewrote the cache meanwhile, or it was
        damaged: read the table instead)."""
        probe = digests(md5s)
        order = np.argsort(probe[0], kind="stable")  # sorted probes walk each run once
        ranked = probe[:, order]
        found = np.zeros(probe.shape[1], bool)
        for run in self.runs:
            path = self.directory / run.file
            try:
                keys = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as error:
                raise KeyCacheError(f"images key cache run {path}: {error}") from error
            if keys.shape != (2, run.rows):
                raise KeyCacheError(f"images key cache run {path}: shape {keys.shape}")
            found |= _in_run(keys, ranked)
        held = np.empty_like(found)
        held[order] = found
        return held


class ImageKeys:
    """The key cache of one lake's ``images`` table (see the module's docstring), in
    ``directory``; with a ``layout`` whose home is S3, published there too."""

    def __init__(self, directory: Path, layout: LibraryLayout | None = None) -> None:
        self.directory = directory
        self.layout = layout if layout is not None and layout.remote is not None else None
        #: Files fetched from the home by this handle (a test or a log reads it).
        self.fetched = 0

    def _fetch(self, *, again: bool = False) -> None:
        """Bring the local copy level with the home: its manifest, then the runs it lists
        that are missing here (``again``: every run, the local copies being damaged)."""
        if self.layout is None:
            return
        if again:
            (self.directory / MANIFEST).unlink(missing_ok=True)
        if not self.layout.fetch(self.directory / MANIFEST):
            return
        for run in self._runs():
            path = self.directory / run.file
            if "/" in run.file:
                continue
            if again:
                path.unlink(missing_ok=True)
            if not path.exists():
                self.fetched += int(self.layout.fetch(path, immutable=True))

    def _publish(self, gone: Iterable[str]) -> None:
        """Publish the runs the manifest names, then the manifest; remove at the home the
        runs in ``gone`` (the replaced manifest named them, this one does not: a run nothing
        names yet may be another machine's, on its way)."""
        if self.layout is not None:
            self.layout.push(
                self.directory,
                order=lambda path: int(path.name == MANIFEST),
                gone=[self.directory / name for name in gone],
            )

    def _manifest(self) -> dict | None:
        try:
            return json.loads((self.directory / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def level_with(
        self, table_id: str, version: int, check: Callable[[int, str], bool], rows: int
    ) -> CachedKeys | None:
        """The cached md5s if they are exactly this table's at ``version`` (holding ``rows``
        rows), else ``None``: ``check(cached, merge)`` says whether the commit at the cached
        version is still the one that merge made and every commit since changed no row. A
        damaged cache is logged, naming the file, and cleared."""
        path = self.directory / MANIFEST
        self._fetch()
        if not path.exists():
            return None
        manifest = self._manifest()
        if not isinstance(manifest, dict):
            return self._damaged(f"{path}: not a JSON object")
        if manifest.get("table") != table_id:
            return None
        try:
            cached = int(manifest.get("version", -1))
        except (TypeError, ValueError):
            return self._damaged(f"{path}: version {manifest.get('version')!r}")
        if not 0 <= cached <= version or not check(cached, str(manifest.get("merge"))):
            return None
        why = _damage(self.directory, manifest)
        if why is not None and self.layout is not None:  # the home's copy may be whole
            logger.warning("images key cache damaged here, fetched again: %s", why)
            self._fetch(again=True)
            manifest = self._manifest() or {}
            why = _damage(self.directory, manifest)
        if why is None and int(manifest["total"]) != rows:
            why = f"{path}: lists {manifest['total']} md5s, the table holds {rows}"
        if why is not None:
            return self._damaged(why)
        return CachedKeys(self.directory, self._runs(manifest))

    def _damaged(self, why: str) -> CachedKeys | None:
        """Log the damage and clear the cache: nothing cached is trusted (always ``None``)."""
        logger.warning("images key cache damaged, rebuilt from the table: %s", why)
        self.clear()
        return None

    def _runs(self, manifest: dict | None = None) -> list[_Run]:
        manifest = manifest if manifest is not None else self._manifest() or {}
        return [
            _Run(r["file"], int(r["rows"]), int(r.get("bytes", 0)), int(r.get("crc32", 0)))
            for r in manifest.get("runs", [])
        ]

    def rebuild(self, keys: np.ndarray, table_id: str, version: int, merge: str) -> None:
        """Replace the cache with these digests, level with ``version`` (made by ``merge``)."""
        replaced = [r.file for r in self._runs()]
        self._save(table_id, version, merge, [self._write(_sorted(keys))])
        self._remove_unnamed()
        self._publish(replaced)

    def add(self, keys: np.ndarray, table_id: str, version: int, merge: str) -> None:
        """Record md5s a merge appended (none of them cached yet), now level with ``version``
        (made by ``merge``)."""
        runs = self._runs()
        made = [r.file for r in runs]  # every file this leaves behind if no run names it
        if keys.shape[1]:
            runs.append(self._write(_sorted(keys)))
            made.append(runs[-1].file)
        while len(runs) > 1 and runs[-2].rows <= runs[-1].rows:
            last, before = runs.pop(), runs.pop()
            runs.append(self._write_merged(before, last))
            made.append(runs[-1].file)
        self._save(table_id, version, merge, runs)
        kept = {r.file for r in runs}
        dropped = [name for name in made if name not in kept]
        for name in dropped:
            (self.directory / name).unlink(missing_ok=True)
        self._publish(dropped)

    def clear(self) -> None:
        """Forget everything: the next merge reads the table and rebuilds the cache."""
        try:  # the runs to delete at the home: as many as a damaged manifest still names
            replaced = [r.file for r in self._runs()]
        except (AttributeError, KeyError, TypeError, ValueError):
            replaced = []
        if self.layout is not None:
            self.layout.remove(self.directory / MANIFEST)
        (self.directory / MANIFEST).unlink(missing_ok=True)
        self._remove_unnamed()
        self._publish(replaced)

    def _remove_unnamed(self) -> None:
        """Delete run files (and half-written files) the manifest does not name: what a merge
        killed while it kept the cache left behind."""
        named = {r.file for r in self._runs()} | {MANIFEST}
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name not in named:
                    path.unlink(missing_ok=True)

    def _write(self, keys: np.ndarray) -> _Run:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"run-{uuid.uuid4().hex}.npy"
        with atomic_path(self.directory / name) as tmp, tmp.open("wb") as out:
            np.save(out, np.ascontiguousarray(keys))
        return self._listed(name, int(keys.shape[1]))

    def _listed(self, name: str, rows: int) -> _Run:
        """A written run as the manifest lists it: its size and CRC-32 as they are on disk."""
        path = self.directory / name
        return _Run(name, rows, path.stat().st_size, _file_crc(path))

    def _write_merged(self, before: _Run, after: _Run) -> _Run:
        """Two runs as one, merged through memory-mapped files (memory for the positions)."""
        name = f"run-{uuid.uuid4().hex}.npy"
        first, second = (np.load(self.directory / r.file, mmap_mode="r") for r in (before, after))
        with atomic_path(self.directory / name) as tmp:
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.uint64, shape=(2, before.rows + after.rows)
            )
            _merged(first, second, out)
            out.flush()
            del out
        return self._listed(name, before.rows + after.rows)

    def _save(self, table_id: str, version: int, merge: str, runs: list[_Run]) -> None:
        manifest = {
            "table": table_id,
            "version": version,
            "merge": merge,
            "total": sum(r.rows for r in runs),
            "runs": [r.as_json() for r in runs],
        }
        atomic_write_text(self.directory / MANIFEST, json.dumps(manifest))
