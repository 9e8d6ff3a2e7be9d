"""The md5s ``images`` holds, kept on local disk as sorted 128-bit digests, so a merge asks
"which of these md5s are new?" with a binary search per md5 instead of reading the md5 column of
every bucket (the one cost of a merge that grew with the library: about 0.2 s per million
images, 200 s a merge at a billion).

A cache of the table, never a second truth. It records the table it describes (its Delta
table id) and the version it is level with; a merge trusts it only when every ``images``
commit since that version changed no row (compaction's rewrite, a vacuum). Otherwise the merge
reads the md5 column as before and rebuilds it from what it read. A merge that deletes md5s (a
shard replaced or emptied) clears it.

On disk: ``keys.json`` (table, version, runs) and one ``.npy`` per run, a ``(2, n)`` uint64
array of the md5s' high and low halves sorted by the high half. Each merge that adds md5s adds a
run; runs of equal size are merged (a binary counter), so a library of N md5s added M at a time
holds at most log2(N / M) + 1 runs, and each md5 is rewritten that many times in its life.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from asset_library.ids import is_md5
from asset_library.layout import atomic_path, atomic_write_text

MANIFEST = "keys.json"


def md5_text(md5s: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """md5 keys as a numpy ``S32`` array over Arrow's own buffer (no copy): each key's 32
    characters, which sort as the text does. ``ValueError`` names a key of another length."""
    text = md5s.cast(pa.string())
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
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
    text = md5_text(md5s)
    found = np.empty((2, len(text)), np.uint64)
    try:
        raw = bytes.fromhex(text.tobytes().decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raw = b""
    if len(raw) != 16 * len(text):  # fromhex also skips spaces: name the first bad key
        bad = next(
            key.decode("ascii", "replace") for key in text if not is_md5(key.decode("latin-1"))
        )
        raise ValueError(f"md5 key {bad!r}: not 32 hexadecimal digits")
    halves = np.frombuffer(raw, ">u8")
    found[0], found[1] = halves[0::2], halves[1::2]
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


@dataclass(frozen=True)
class _Run:
    file: str
    rows: int


@dataclass(frozen=True)
class CachedKeys:
    """The cache's runs as one merge found them."""

    directory: Path
    runs: list[_Run]

    def held(self, md5s: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Which of these md5s the table holds; ``FileNotFoundError`` if a run went missing
        (another merge rewrote the cache meanwhile: read the table instead)."""
        probe = digests(md5s)
        order = np.argsort(probe[0], kind="stable")  # sorted probes walk each run once
        ranked = probe[:, order]
        found = np.zeros(probe.shape[1], bool)
        for run in self.runs:
            found |= _in_run(np.load(self.directory / run.file, mmap_mode="r"), ranked)
        held = np.empty_like(found)
        held[order] = found
        return held


class ImageKeys:
    """The local key cache of one lake's ``images`` table (see the module's docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _manifest(self) -> dict | None:
        try:
            return json.loads((self.directory / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def level_with(
        self, table_id: str, version: int, rewrites: Callable[[int, int], set[int]]
    ) -> CachedKeys | None:
        """The cached md5s if they are exactly this table's at ``version``, else ``None``:
        ``rewrites(a, b)`` lists the versions in a..b that changed no row (a compaction's
        rewrite, a vacuum)."""
        manifest = self._manifest()
        if manifest is None or manifest.get("table") != table_id:
            return None
        cached = int(manifest.get("version", -1))
        if cached < 0 or cached > version:
            return None
        since = set(range(cached + 1, version + 1))
        if since and rewrites(cached + 1, version) != since:
            return None
        return CachedKeys(self.directory, self._runs(manifest))

    def _runs(self, manifest: dict | None = None) -> list[_Run]:
        manifest = manifest if manifest is not None else self._manifest() or {}
        return [_Run(r["file"], int(r["rows"])) for r in manifest.get("runs", [])]

    def rebuild(self, keys: np.ndarray, table_id: str, version: int) -> None:
        """Replace the cache with these digests, level with ``version`` of the table."""
        self._save(table_id, version, [self._write(_sorted(keys))], [r.file for r in self._runs()])

    def add(self, keys: np.ndarray, table_id: str, version: int) -> None:
        """Record md5s a merge appended (none of them cached yet), now level with ``version``."""
        runs = self._runs()
        made = [r.file for r in runs]  # every file this leaves behind if no run names it
        if keys.shape[1]:
            runs.append(self._write(_sorted(keys)))
            made.append(runs[-1].file)
        while len(runs) > 1 and runs[-2].rows <= runs[-1].rows:
            last, before = runs.pop(), runs.pop()
            joined = np.concatenate(
                [np.load(self.directory / r.file) for r in (before, last)], axis=1
            )
            runs.append(self._write(_sorted(joined)))
            made.append(runs[-1].file)
        kept = {r.file for r in runs}
        self._save(table_id, version, runs, [name for name in made if name not in kept])

    def clear(self) -> None:
        """Forget everything: the next merge reads the table and rebuilds the cache."""
        runs = [r.file for r in self._runs()]
        (self.directory / MANIFEST).unlink(missing_ok=True)
        for name in runs:
            (self.directory / name).unlink(missing_ok=True)

    def _write(self, keys: np.ndarray) -> _Run:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"run-{uuid.uuid4().hex}.npy"
        with atomic_path(self.directory / name) as tmp, tmp.open("wb") as out:
            np.save(out, np.ascontiguousarray(keys))
        return _Run(name, int(keys.shape[1]))

    def _save(self, table_id: str, version: int, runs: list[_Run], dropped: list[str]) -> None:
        manifest = {
            "table": table_id,
            "version": version,
            "runs": [{"file": r.file, "rows": r.rows} for r in runs],
        }
        atomic_write_text(self.directory / MANIFEST, json.dumps(manifest))
        for name in dropped:
            (self.directory / name).unlink(missing_ok=True)
