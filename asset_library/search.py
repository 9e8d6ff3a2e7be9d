"""Exact Hamming-radius search over 64-bit perceptual hashes (pHash, aHash, dHash).

Near-duplicate search asks for every stored hash within ``d`` bits of a query. A brute-force
scan is exact but reads every hash (16-40 ms per query at 10M on this machine); this module
answers the same question exactly in well under a millisecond for ``d <= 8`` by multi-index
hashing (Norouzi, Punjani and Fleet, 2012).

Pigeonhole argument
-------------------
Split the 64 bits into ``m`` disjoint bands. The Hamming distance is the sum of the per-band
distances, so if ``dist(h, q) <= d`` then at least one band is within ``floor(d / m)`` bits:
otherwise every band differs by ``floor(d / m) + 1`` or more and the total exceeds ``d``. The
bound is sharpened with ``d = m * s + a`` (``0 <= a < m``): some band among ``a + 1`` chosen
bands is within ``s`` bits, or some other band is within ``s - 1`` bits (if not, the total is at
least ``(a + 1)(s + 1) + (m - a - 1)s = d + 1``). So probing each band's bucket table at every
value within its radius finds a superset of the answer; candidates are then verified with an
exact popcount of the XOR and deduplicated. Recall is exact by construction, not by tuning.

Structure
---------
An index is a set of named immutable *segments* (one per ingested shard): adding, replacing or
removing a shard touches only its segment, and a query searches every segment. A segment holds

* ``hashes`` (uint64) and ``ids`` (int64, the caller's row numbers), both sorted by band 0;
* its *constant bits*: bits equal in every row of the segment (the first bit of an
  ImageHash-style pHash is always 1). They carry no information for bucketing, so they are left
  out of the bands; a query differing from them in ``c`` bits searches the free bits within
  ``d - c``, which keeps the answer exact;
* ``m`` bands over the remaining free bits, each a dense CSR table: ``offsets`` (``2**w + 1``
  entries per band of width ``w``; all bands concatenated, in a position space where band ``b``
  covers ``[b*N, (b+1)*N)``) and ``perm`` (position -> row) for bands 1.., since band 0's order
  is the storage order.

Memory is ``8 (hash) + 8 (id) + 4 * (m - 1) (perm) + 4 * sum(2**w) / N`` bytes per image:
about 26.5 bytes at 10M with 3 bands of 21 bits. The layout of each segment is chosen from its
size by a cost model calibrated on this machine (``benchmarks/search.py`` compares layouts):
3 bands of 21-22 bits at 10M, more and narrower bands for small shards (the tables must stay
small next to the data), and no bands at all (a plain scan) for tiny segments. When the probe
count for a large ``d`` would cost more than a scan, that segment is scanned instead (still
exact).

Files (``save``/``load``): one directory per segment with ``.npy`` arrays and ``meta.json``,
written to a temporary directory and renamed into place, plus ``manifest.json`` replaced
atomically last. Saving again writes only new segments; ``load`` memory-maps the arrays, so a
loaded index lives in the page cache.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "HammingIndex",
    "connected_groups",
    "hex_to_uint64",
    "uint64_to_hex",
]

_ALL = (1 << 64) - 1
_U64 = np.uint64
_MANIFEST = "manifest.json"
_FORMAT = "asset-library/hamming-index/1"

#: Widest band: its table has 2**w + 1 offsets, so 24 bits is 64 MB of int32 per band.
MAX_BAND_BITS = 24
#: Most XOR masks one band may be probed with before a scan is preferred regardless of cost.
MAX_MASKS = 300_000
#: Probes expanded at once in a batch (bounds temporary memory to a few tens of MB).
_PROBE_CHUNK = 1 << 21
#: Candidates verified at once.
_CANDIDATE_CHUNK = 1 << 22

# Cost model, in nanoseconds, measured on the project's 2-core machine (benchmarks/search.py).
# Only ratios matter: they decide band layouts and when a scan beats probing.
_NS_QUERY_FIXED = 10_000.0  # numpy calls of one probed segment query
_NS_PER_BAND = 4_000.0  # key extraction and concatenation per probed band
_NS_PER_PROBE = 35.0  # one offsets lookup pair (random reads into the tables)
_NS_PER_CANDIDATE = 15.0  # gather, XOR, popcount of one candidate
_NS_SCAN_FIXED = 10_000.0
_NS_SCAN_PER_ROW = 2.0  # np.bitwise_count(db ^ q) per row, 10M rows (0.9 ns in cache at 1M)
_NS_JOIN_BUCKET = 30.0  # one (bucket, mask) step of a self-join
_NS_JOIN_PAIR = 18.0  # one candidate pair of a self-join
_NS_BUILD_PER_ROW_BAND = 120.0  # key, sort and table per row and band (for pairs_within)


# ----------------------------------------------------------------------------- hex conversion

_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate("0123456789abcdef"):
    _HEX_LUT[ord(_c)] = _i
    _HEX_LUT[ord(_c.upper())] = _i


def hex_to_uint64(values: Iterable[str] | np.ndarray) -> np.ndarray:
    """Parse 16-digit hex hashes (as stored in tables and Parquet) without a Python loop.

    Accepts a list, a numpy array of str/bytes, or anything with ``to_numpy`` (a pyarrow array
    or a pandas Series)."""
    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):
        values = values.to_numpy(zero_copy_only=False) if _is_arrow(values) else values.to_numpy()
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values))
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.uint64)
    if arr.dtype.kind == "O":
        if any(not isinstance(v, str) for v in arr.ravel()):
            raise ValueError("hex_to_uint64: every value must be a 16-character hex string")
        arr = arr.astype(str)
    if arr.dtype.kind == "U":
        if not np.all(np.strings.str_len(arr) == 16):
            raise ValueError("hex_to_uint64: every value must be exactly 16 hex characters")
        try:
            arr = arr.astype("S16")
        except UnicodeEncodeError as error:
            raise ValueError("hex_to_uint64: non-ASCII character in a hash") from error
    elif arr.dtype.kind == "S":
        if arr.dtype.itemsize != 16 or not np.all(np.strings.str_len(arr) == 16):
            raise ValueError("hex_to_uint64: every value must be exactly 16 hex characters")
    else:
        raise TypeError(f"hex_to_uint64: expected strings, got dtype {arr.dtype}")
    shape = arr.shape
    nibbles = _HEX_LUT[np.ascontiguousarray(arr).reshape(-1).view(np.uint8)].reshape(-1, 16)
    if np.any(nibbles == 255):
        raise ValueError("hex_to_uint64: invalid hex digit")
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return np.ascontiguousarray(packed).view(">u8").reshape(shape).astype(np.uint64)


def _is_arrow(values: object) -> bool:
    return type(values).__module__.startswith("pyarrow")


def uint64_to_hex(values: np.ndarray) -> np.ndarray:
    """Format hashes back to the 16-digit lower-case hex used elsewhere in the library."""
    arr = _as_uint64(values)
    shape = arr.shape
    big = np.ascontiguousarray(arr.reshape(-1).astype(">u8")).view(np.uint8).reshape(-1, 8)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    out = np.empty((big.shape[0], 16), dtype=np.uint8)
    out[:, 0::2] = digits[big >> 4]
    out[:, 1::2] = digits[big & 15]
    return out.view("S16").reshape(shape).astype("U16")


def _as_uint64(values: np.ndarray | Sequence[int]) -> np.ndarray:
    """Accept uint64, or int64 as stored by engines without unsigned types (same bits)."""
    arr = np.asarray(values)
    if arr.dtype == np.uint64:
        return arr
    if arr.dtype == np.int64:
        return arr.view(np.uint64)
    if arr.dtype.kind in "US":
        return hex_to_uint64(arr)
    if arr.dtype.kind in "iu":
        if arr.size and (arr.min() < 0):
            return arr.astype(np.int64).view(np.uint64)
        return arr.astype(np.uint64)
    if arr.dtype.kind == "O":
        return np.array([_hash_int(v) for v in arr.ravel()], dtype=np.uint64).reshape(arr.shape)
    raise TypeError(f"expected 64-bit hashes, got dtype {arr.dtype}")


def _hash_int(value: int | str | np.integer) -> int:
    """One hash as a Python int in [0, 2**64); negative int64 values are reinterpreted."""
    if isinstance(value, str):
        return int(hex_to_uint64([value])[0])
    value = int(value)
    if not -(1 << 63) <= value < (1 << 64):
        raise ValueError(f"hash out of 64-bit range: {value}")
    return value & _ALL


# ----------------------------------------------------------------------------- cost model


@functools.lru_cache(maxsize=256)
def _masks(width: int, radius: int) -> np.ndarray:
    """XOR masks of ``width`` bits with at most ``radius`` ones, fewest ones first."""
    out = [0]
    for k in range(1, min(radius, width) + 1):
        out.extend(sum(1 << i for i in c) for c in itertools.combinations(range(width), k))
    masks = np.array(out, dtype=np.int64)
    masks.setflags(write=False)
    return masks


def _n_masks(width: int, radius: int) -> int:
    return sum(math.comb(width, k) for k in range(0, min(radius, width) + 1)) if radius >= 0 else 0


def _split(n_bits: int, m: int) -> list[int]:
    """Near-equal band widths, wider bands first."""
    q, r = divmod(n_bits, m)
    return [q + 1] * r + [q] * (m - r)


def _assign_radii(widths: Sequence[int], bucket: Sequence[float], d: int) -> tuple[int, ...]:
    """Per-band probe radii for distance ``d`` (sharpened pigeonhole), cheapest bands widest."""
    m = len(widths)
    s, a = divmod(d, m)

    def cost(b: int, r: int) -> float:
        n = _n_masks(widths[b], r)
        return n * (_NS_PER_PROBE + bucket[b] * _NS_PER_CANDIDATE)

    extra = sorted(range(m), key=lambda b: (cost(b, s) - cost(b, s - 1), b))[: a + 1]
    return tuple(s if b in extra else s - 1 for b in range(m))


def _probe_cost(widths: Sequence[int], bucket: Sequence[float], radii: Sequence[int]) -> float:
    """Estimated ns of one probed query; inf when the masks would not fit."""
    total = _NS_QUERY_FIXED
    for w, e, r in zip(widths, bucket, radii, strict=True):
        if r < 0:
            continue
        n = _n_masks(w, r)
        if n > MAX_MASKS:
            return math.inf
        total += _NS_PER_BAND + n * (_NS_PER_PROBE + e * _NS_PER_CANDIDATE)
    return total


def _scan_cost(n: int) -> float:
    return _NS_SCAN_FIXED + _NS_SCAN_PER_ROW * n


def _choose_bands(n: int, n_free: int, design_radius: int, table_bytes_per_row: float) -> int:
    """Number of bands minimising estimated query cost at ``design_radius`` (0 = scan).

    The offsets tables must fit ``table_bytes_per_row`` (amortised), so a small shard does not
    carry a 2**21-entry table per band; a tiny segment is cheaper to scan than to probe.
    """
    best_m, best = 0, _scan_cost(n)
    if n_free == 0 or n == 0:
        return 0
    budget = max(table_bytes_per_row * n, 4.0 * (1 << 16))
    for m in range(1, min(n_free, 16) + 1):
        widths = _split(n_free, m)
        if widths[0] > MAX_BAND_BITS or 4.0 * sum((1 << w) + 1 for w in widths) > budget:
            continue
        bucket = [n / (1 << w) for w in widths]
        cost = _probe_cost(widths, bucket, _assign_radii(widths, bucket, design_radius))
        if cost < best:
            best_m, best = m, cost
    return best_m


def _join_cost(n: int, widths: Sequence[int], bucket: Sequence[float], d: int) -> float:
    """Estimated ns of a self-join within ``d`` over n rows with these bands."""
    if not widths:
        return _NS_SCAN_PER_ROW * n * n / 2.0
    radii = _assign_radii(widths, bucket, d)
    total = 0.0
    for w, e, r in zip(widths, bucket, radii, strict=True):
        if r < 0:
            continue
        k = _n_masks(w, r)
        if k > MAX_MASKS:
            return math.inf
        buckets = (1 << w) * -math.expm1(-n / (1 << w))  # expected non-empty buckets
        total += (k - 1) * buckets * _NS_JOIN_BUCKET + n * e * k / 2.0 * _NS_JOIN_PAIR
    return total


# ----------------------------------------------------------------------------- segments


def _runs(bits: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """Compile a band's bit positions (MSB first) into (source shift, length, dest shift) runs."""
    runs: list[tuple[int, int, int]] = []
    w = len(bits)
    i = 0
    while i < w:
        j = i
        while j + 1 < w and bits[j + 1] == bits[j] - 1:
            j += 1
        length = j - i + 1
        runs.append((bits[j], length, w - 1 - j))
        i = j + 1
    return tuple(runs)


@dataclass(frozen=True)
class _Plan:
    """How a segment answers one effective radius: probe radii per band, or a scan."""

    radii: tuple[int, ...] | None
    masks: np.ndarray  # (P,) XOR masks of all probed bands, concatenated
    col_band: np.ndarray  # (P,) band of each mask
    base: np.ndarray  # (P,) start of that band's table in the concatenated offsets
    used: tuple[int, ...] = ()  # probed bands, ascending
    n_first: int = 0  # masks of band 0 (its positions are rows; later bands go through perm)


def _expand(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate the ranges [start, start + count) without a Python loop."""
    total = int(counts.sum())
    ends = np.cumsum(counts)
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - counts), counts)


def _argsort_key(keys: np.ndarray, width: int) -> np.ndarray:
    """Stable argsort of band values by sorting ``value << 32 | row`` as plain uint64: numpy's
    vectorised integer sort is about twice as fast as an argsort of the same 10M keys."""
    n = keys.size
    if n >= (1 << 32) or width > 32:
        return np.argsort(keys, kind="stable")
    packed = keys.astype(np.uint64) << _U64(32)
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    return (packed & _U64(0xFFFFFFFF)).astype(np.int32 if n < (1 << 31) else np.int64)


def _budget_slices(counts: np.ndarray, budget: int) -> list[slice]:
    """Cut a run of ranges into pieces expanding to about ``budget`` items each."""
    if counts.size == 0:
        return []
    cum = np.cumsum(counts)
    total = int(cum[-1])
    if total <= budget:
        return [slice(0, counts.size)]
    cuts = np.searchsorted(cum, np.arange(budget, total, budget), side="left") + 1
    edges = np.unique(np.concatenate(([0], cuts, [counts.size])))
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]


class _Segment:
    """One immutable shard of the index (see the module docstring for the layout)."""

    def __init__(
        self,
        ids: np.ndarray,
        hashes: np.ndarray,
        const_mask: int,
        const_value: int,
        bands: list[tuple[int, ...]],
        offsets: np.ndarray,
        perm: np.ndarray,
        bucket: list[float],
    ) -> None:
        self.ids = ids
        self.hashes = hashes
        self.n = int(hashes.shape[0])
        self.const_mask = const_mask
        self.const_value = const_value
        self.bands = bands
        self.widths = [len(b) for b in bands]
        self.runs = [_runs(b) for b in bands]
        self.offsets = offsets
        self.perm = perm
        self.bucket = bucket
        self.obase = np.concatenate(([0], np.cumsum([(1 << w) + 1 for w in self.widths])))
        self._plans: dict[int, _Plan] = {}
        self.stored: dict[str, str] = {}  # resolved save directory -> segment sub-directory

    # -- construction

    @classmethod
    def build(
        cls,
        ids: np.ndarray,
        hashes: np.ndarray,
        bands: int | None,
        design_radius: int,
        table_bytes_per_row: float,
    ) -> _Segment:
        h = np.ascontiguousarray(_as_uint64(hashes)).reshape(-1)
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64)).reshape(-1)
        if ids.shape != h.shape:
            raise ValueError(f"ids and hashes differ in length: {ids.shape[0]} != {h.shape[0]}")
        n = h.shape[0]
        if n:
            and_all = int(np.bitwise_and.reduce(h))
            or_all = int(np.bitwise_or.reduce(h))
        else:
            and_all = or_all = 0
        varying = and_all ^ or_all
        const_mask = ~varying & _ALL
        const_value = and_all & const_mask
        free = [bit for bit in range(63, -1, -1) if varying >> bit & 1]
        if bands is None:
            m = _choose_bands(n, len(free), design_radius, table_bytes_per_row)
        else:
            m = min(int(bands), len(free))
            if m < 0:
                raise ValueError("bands must be >= 0")
        widths = _split(len(free), m) if m else []
        if widths and widths[0] > MAX_BAND_BITS:
            raise ValueError(f"{m} bands over {len(free)} free bits exceed {MAX_BAND_BITS} bits")
        band_bits: list[tuple[int, ...]] = []
        start = 0
        for w in widths:
            band_bits.append(tuple(free[start : start + w]))
            start += w
        seg = cls(
            ids,
            h,
            const_mask,
            const_value,
            band_bits,
            np.zeros(0, np.int32),
            np.zeros(0, np.int32),
            [],
        )
        if not m:
            # Scanned as stored: copy so that the caller's arrays stay theirs to change.
            seg.ids, seg.hashes = ids.copy(), h.copy()
            return seg
        pos_dtype = np.int32 if m * n < (1 << 31) else np.int64
        k0 = seg.key(0, h)
        order = _argsort_key(k0, widths[0])
        seg.hashes = h = h[order]
        seg.ids = ids[order]
        offsets = np.empty(int(seg.obase[-1]), dtype=pos_dtype)
        perm = np.empty((m - 1) * n, dtype=pos_dtype)
        bucket = []
        for b in range(m):
            kb = k0[order] if b == 0 else seg.key(b, h)
            if b:
                perm[(b - 1) * n : b * n] = _argsort_key(kb, widths[b])
            counts = np.bincount(kb, minlength=1 << widths[b])
            table = offsets[seg.obase[b] : seg.obase[b + 1]]
            table[0] = b * n
            table[1:] = np.cumsum(counts) + b * n
            bucket.append(float(np.dot(counts.astype(np.float64), counts)) / max(n, 1))
        seg.offsets, seg.perm, seg.bucket = offsets, perm, bucket
        return seg

    def key(self, b: int, h: np.ndarray) -> np.ndarray:
        """Band ``b`` of each hash, as int64 (bits gathered from their runs)."""
        out = np.zeros(h.shape, dtype=np.uint64)
        for src, length, dst in self.runs[b]:
            part = (h >> _U64(src)) & _U64((1 << length) - 1)
            out |= part << _U64(dst) if dst else part
        return out.view(np.int64)

    # -- planning

    def plan(self, d: int) -> _Plan:
        """Probe radii for effective radius ``d`` on the free bits, or a scan if cheaper."""
        plan = self._plans.get(d)
        if plan is not None:
            return plan
        empty = np.zeros(0, np.int64)
        radii: tuple[int, ...] | None = None
        if self.widths and d < 64:
            candidate = _assign_radii(self.widths, self.bucket, d)
            if _probe_cost(self.widths, self.bucket, candidate) < _scan_cost(self.n):
                radii = candidate
        if radii is None:
            plan = _Plan(None, empty, empty, empty)
        else:
            used = [(b, r) for b, r in enumerate(radii) if r >= 0]
            masks = [_masks(self.widths[b], r) for b, r in used]
            bands = np.concatenate(
                [np.full(len(x), b) for (b, _), x in zip(used, masks, strict=True)]
            )
            plan = _Plan(
                radii,
                np.concatenate(masks),
                bands,
                self.obase[bands],
                tuple(b for b, _ in used),
                len(masks[0]) if used[0][0] == 0 else 0,
            )
        self._plans[d] = plan
        return plan

    # -- search

    def rows_of(self, pos: np.ndarray) -> np.ndarray:
        """Map positions in the concatenated band orders to rows."""
        rows = pos.copy()
        far = pos >= self.n
        if far.any():
            rows[far] = self.perm[pos[far] - self.n]
        return rows

    def key_int(self, b: int, h: int) -> int:
        """Band ``b`` of one hash, in Python ints (cheaper than numpy for a single value)."""
        out = 0
        for src, length, dst in self.runs[b]:
            out |= ((h >> src) & ((1 << length) - 1)) << dst
        return out

    def search_one(self, q: int, d: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, distances) within ``d`` of one query: the latency path, fewest numpy calls."""
        if self.n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.uint8)
        c = ((q ^ self.const_value) & self.const_mask).bit_count()
        if c > d:
            return np.zeros(0, np.int64), np.zeros(0, np.uint8)
        plan = self.plan(d - c)
        qv = _U64(q)
        if plan.radii is None:
            dist = np.bitwise_count(self.hashes ^ qv)
            rows = np.flatnonzero(dist <= d)
            return rows, dist[rows]
        keys = np.array(
            [self.key_int(b, q) if b in plan.used else 0 for b in range(len(self.widths))],
            dtype=np.int64,
        )
        probes = (keys[plan.col_band] ^ plan.masks) + plan.base
        starts = self.offsets[probes].astype(np.int64)
        counts = self.offsets[probes + 1] - starts
        ends = np.cumsum(counts)
        total = int(ends[-1])
        pos = np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - counts), counts)
        if plan.n_first == 0:
            rows = self.perm[pos - self.n]
        else:
            split = int(ends[plan.n_first - 1])
            if split == total:
                rows = pos
            else:
                rows = np.concatenate((pos[:split], self.perm[pos[split:] - self.n]))
        dist = np.bitwise_count(self.hashes[rows] ^ qv)
        keep = np.flatnonzero(dist <= d)
        rows, dist = rows[keep], dist[keep]
        if len(plan.used) > 1 and rows.size > 1:
            rows, first = np.unique(rows, return_index=True)
            dist = dist[first]
        return rows, dist

    def search(self, q: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query index, row, distance) for all rows within ``d`` of each query in ``q``."""
        if self.n == 0 or q.size == 0:
            return _empty3()
        c = np.bitwise_count((q ^ _U64(self.const_value)) & _U64(self.const_mask)).astype(int)
        out = []
        for c_value in np.unique(c):
            if c_value > d:
                continue
            sel = np.flatnonzero(c == c_value)
            plan = self.plan(d - int(c_value))
            scan = plan.radii is None
            part = self._scan(q[sel], d) if scan else self._probe(q[sel], d, plan)
            out.append((sel[part[0]], part[1], part[2]))
        if not out:
            return _empty3()
        qi, rows, dist = (np.concatenate(x) for x in zip(*out, strict=True))
        return qi, rows, dist

    def _scan(self, q: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qi, rows, dist = [], [], []
        for i, value in enumerate(q):
            dd = np.bitwise_count(self.hashes ^ value)
            hit = np.flatnonzero(dd <= d)
            qi.append(np.full(hit.size, i, np.int64))
            rows.append(hit)
            dist.append(dd[hit])
        return np.concatenate(qi), np.concatenate(rows).astype(np.int64), np.concatenate(dist)

    def _probe(
        self, q: np.ndarray, d: int, plan: _Plan
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        used = plan.used
        n_probes = plan.masks.size
        step = max(1, _PROBE_CHUNK // n_probes)
        out_q, out_r, out_d = [], [], []
        for q0 in range(0, q.size, step):
            qc = q[q0 : q0 + step]
            keys = np.zeros((qc.size, len(self.widths)), dtype=np.int64)
            for b in used:
                keys[:, b] = self.key(b, qc)
            probes = (keys[:, plan.col_band] ^ plan.masks) + plan.base
            starts = self.offsets[probes].ravel().astype(np.int64)
            counts = self.offsets[probes + 1].ravel() - starts
            nz = np.flatnonzero(counts)
            starts, counts, owner = starts[nz], counts[nz], nz // n_probes
            for piece in _budget_slices(counts, _CANDIDATE_CHUNK):
                c = counts[piece]
                rows = self.rows_of(_expand(starts[piece], c))
                who = np.repeat(owner[piece], c)
                dist = np.bitwise_count(self.hashes[rows] ^ qc[who])
                keep = np.flatnonzero(dist <= d)
                out_q.append(who[keep] + q0)
                out_r.append(rows[keep])
                out_d.append(dist[keep])
        if not out_q:
            return _empty3()
        qi, rows, dist = np.concatenate(out_q), np.concatenate(out_r), np.concatenate(out_d)
        if len(used) > 1 and qi.size:
            _, first = np.unique(qi * max(self.n, 1) + rows, return_index=True)
            qi, rows, dist = qi[first], rows[first], dist[first]
        return qi, rows, dist

    # -- self-join

    def self_pairs(
        self, d: int, allow_scan: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row a, row b, distance), a < b, for all pairs of rows within ``d``."""
        if self.n < 2:
            return _empty3()
        # Rows of one segment share its constant bits, so the free bits carry all the distance.
        scan = _join_cost(self.n, [], [], d)
        if not self.widths or (
            allow_scan and _join_cost(self.n, self.widths, self.bucket, d) > scan
        ):
            return self._scan_pairs(d)
        radii = _assign_radii(self.widths, self.bucket, d)
        out = [self._band_pairs(b, r, d) for b, r in enumerate(radii) if r >= 0]
        ra, rb, dist = (np.concatenate(x) for x in zip(*out, strict=True))
        if sum(r >= 0 for r in radii) > 1 and ra.size:
            _, first = np.unique(ra * self.n + rb, return_index=True)
            ra, rb, dist = ra[first], rb[first], dist[first]
        return ra, rb, dist

    def _band_pairs(self, b: int, r: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pairs whose band ``b`` values are within ``r``: each bucket with itself, and each pair
        of buckets ``(v, v ^ mask)`` once, from the side where the mask's top bit is 0 in ``v``
        (exactly when ``v < v ^ mask``). Works on non-empty buckets, not rows, so a dense table
        costs no more than a sparse one."""
        n, w = self.n, self.widths[b]
        table = self.offsets[self.obase[b] : self.obase[b + 1]]  # a view: no O(2**w) copy
        row_of = np.arange(n, dtype=np.int64) if b == 0 else self.perm[(b - 1) * n : b * n]
        # Hashes in this band's order: candidates then sit in a few contiguous runs, so they are
        # compared without random reads; only the survivors are mapped back to rows.
        hb = self.hashes if b == 0 else self.hashes[row_of]
        # Non-empty buckets from the sorted band values: O(n), not O(2**w).
        keys = self.key(b, hb)
        first = np.flatnonzero(np.diff(keys, prepend=-1))
        full = keys[first]
        full_sizes = np.diff(first, append=n)
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        # Same bucket: each position with the positions after it.
        many = full_sizes > 1
        owner = _expand(first[many], full_sizes[many])
        ends = np.repeat(first[many] + full_sizes[many], full_sizes[many])
        self._verify(hb, row_of, owner, owner + 1, ends - owner - 1, d, out)
        masks = _masks(w, r)[1:]
        tops = np.left_shift(1, np.log2(np.maximum(masks, 1)).astype(np.int64))  # top bit
        step = max(1, _PROBE_CHUNK // max(full.size, 1))  # (bucket, mask) pairs per round
        for m0 in range(0, masks.size, step):
            mk, tp = masks[m0 : m0 + step], tops[m0 : m0 + step]
            ui, mi = np.nonzero((full[:, None] & tp) == 0)
            t = full[ui] ^ mk[mi]
            st = table[t].astype(np.int64)
            ct = table[t + 1] - st
            st -= b * n
            hit = np.flatnonzero(ct)
            ui, st, ct = ui[hit], st[hit], ct[hit]
            cu = full_sizes[ui]
            owner = _expand(first[ui], cu)
            self._verify(hb, row_of, owner, np.repeat(st, cu), np.repeat(ct, cu), d, out)
        if not out:
            return _empty3()
        ra, rb, dist = (np.concatenate(x) for x in zip(*out, strict=True))
        return ra, rb, dist

    def _verify(
        self,
        hb: np.ndarray,
        row_of: np.ndarray,
        owner: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        d: int,
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ) -> None:
        """Compare each owner position with its range of positions; keep pairs within ``d``."""
        hit = np.flatnonzero(counts > 0)
        owner, starts, counts = owner[hit], starts[hit], counts[hit]
        for piece in _budget_slices(counts, _CANDIDATE_CHUNK):
            c = counts[piece]
            pb = _expand(starts[piece], c)
            pa = np.repeat(owner[piece], c)
            dist = np.bitwise_count(hb[pa] ^ hb[pb])
            keep = np.flatnonzero(dist <= d)
            ra, rb = row_of[pa[keep]], row_of[pb[keep]]
            out.append((np.minimum(ra, rb), np.maximum(ra, rb), dist[keep]))

    def _scan_pairs(self, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out_a, out_b, out_d = [], [], []
        block = max(1, (1 << 22) // max(self.n, 1))
        for i0 in range(0, self.n - 1, block):
            a = self.hashes[i0 : i0 + block]
            dist = np.bitwise_count(a[:, None] ^ self.hashes[None, i0:])
            ia, jb = np.nonzero(dist <= d)
            jb = jb + i0
            ia = ia + i0
            keep = jb > ia
            out_a.append(ia[keep].astype(np.int64))
            out_b.append(jb[keep].astype(np.int64))
            out_d.append(dist[ia[keep] - i0, jb[keep] - i0])
        return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_d)

    # -- persistence

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.ids, self.hashes, self.offsets, self.perm))

    def meta(self) -> dict:
        return {
            "n": self.n,
            "const_mask": f"{self.const_mask:016x}",
            "const_value": f"{self.const_value:016x}",
            "bands": [list(b) for b in self.bands],
            "bucket": self.bucket,
        }

    def write(self, directory: Path) -> None:
        directory.mkdir()
        for field in ("ids", "hashes", "offsets", "perm"):
            with open(directory / f"{field}.npy", "wb") as f:
                np.save(f, getattr(self, field))
                f.flush()
                os.fsync(f.fileno())
        (directory / "meta.json").write_text(json.dumps(self.meta()))

    @classmethod
    def read(cls, directory: Path, mmap: bool) -> _Segment:
        meta = json.loads((directory / "meta.json").read_text())
        arrays = {
            f: _load_npy(directory / f"{f}.npy", mmap) for f in ("ids", "hashes", "offsets", "perm")
        }
        return cls(
            arrays["ids"],
            arrays["hashes"],
            int(meta["const_mask"], 16),
            int(meta["const_value"], 16),
            [tuple(b) for b in meta["bands"]],
            arrays["offsets"],
            arrays["perm"],
            [float(x) for x in meta["bucket"]],
        )


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    if mmap:
        try:
            return np.load(path, mmap_mode="r")
        except ValueError:  # an empty array cannot be memory-mapped
            pass
    return np.load(path)


def _empty3() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "segment"


# ----------------------------------------------------------------------------- the index


class HammingIndex:
    """Exact search within a Hamming radius over 64-bit hashes, made of named segments.

    ``ids`` must be unique across segments: they are the caller's row numbers, mapped back to
    md5 keys outside this module. ``bands`` forces the number of bands of every segment built
    (``None`` picks it from the segment size); ``design_radius`` is the radius that choice
    optimises for.
    """

    def __init__(
        self,
        ids: np.ndarray | None = None,
        hashes: np.ndarray | None = None,
        *,
        name: str = "main",
        bands: int | None = None,
        design_radius: int = 8,
        table_bytes_per_row: float = 8.0,
    ) -> None:
        self.bands = bands
        self.design_radius = design_radius
        self.table_bytes_per_row = table_bytes_per_row
        self._segments: dict[str, _Segment] = {}
        if hashes is not None:
            if ids is None:
                ids = np.arange(len(hashes), dtype=np.int64)
            self.add_segment(name, ids, hashes)

    # -- segments

    def add_segment(self, name: str, ids: np.ndarray, hashes: np.ndarray) -> None:
        """Build one segment; a segment of the same name (a re-ingested shard) is replaced."""
        self._segments[name] = _Segment.build(
            ids, hashes, self.bands, self.design_radius, self.table_bytes_per_row
        )

    def remove_segment(self, name: str) -> None:
        """Drop a segment (KeyError if absent); other segments are untouched."""
        del self._segments[name]

    def compact(self, name: str = "main") -> None:
        """Merge all segments into one, so a query pays one segment's fixed cost."""
        if not self._segments:
            return
        ids = np.concatenate([s.ids for s in self._segments.values()])
        hashes = np.concatenate([s.hashes for s in self._segments.values()])
        merged = _Segment.build(
            ids, hashes, self.bands, self.design_radius, self.table_bytes_per_row
        )
        self._segments = {name: merged}

    def segments(self) -> dict[str, int]:
        """Segment name -> rows."""
        return {name: seg.n for name, seg in self._segments.items()}

    def __len__(self) -> int:
        return sum(seg.n for seg in self._segments.values())

    def nbytes(self) -> int:
        """Bytes of all arrays (hashes, ids, tables): the index's memory or page-cache size."""
        return sum(seg.nbytes() for seg in self._segments.values())

    def describe(self, max_distance: int | None = None) -> dict[str, dict]:
        """Per segment: rows, band widths, constant bits and, for a radius, the probe plan
        (radii per band, or ``None`` for a scan) -- for benchmarks and tests."""
        out = {}
        for name, seg in self._segments.items():
            info: dict = {
                "rows": seg.n,
                "widths": seg.widths,
                "constant_bits": seg.const_mask.bit_count(),
            }
            if max_distance is not None:
                info["radii"] = seg.plan(max_distance).radii
            out[name] = info
        return out

    # -- queries

    def query(
        self, hash: int | str, max_distance: int, limit: int | None = None
    ) -> list[tuple[int, int]]:
        """(id, distance) of every hash within ``max_distance``, nearest first, then by id."""
        q = _hash_int(hash)
        d = _check_distance(max_distance)
        parts = []
        for seg in self._segments.values():
            rows, dist = seg.search_one(q, d)
            if rows.size:
                parts.append((np.asarray(seg.ids[rows]), dist))
        if not parts:
            return []
        ids, dist = parts[0] if len(parts) == 1 else map(np.concatenate, zip(*parts, strict=True))
        order = np.lexsort((ids, dist))
        pairs = list(zip(ids[order].tolist(), dist[order].tolist(), strict=True))
        return pairs if limit is None else pairs[:limit]

    def query_many(
        self, hashes: np.ndarray | Sequence[int], max_distance: int, limit: int | None = None
    ) -> list[list[tuple[int, int]]]:
        """``query`` for many hashes, probing all of them per segment in one batch."""
        q = _as_uint64(hashes).reshape(-1)
        qi, ids, dist = self.query_arrays(q, max_distance)
        bounds = np.searchsorted(qi, np.arange(q.size + 1))
        ids_l, dist_l = ids.tolist(), dist.tolist()
        out = []
        for i in range(q.size):
            a, b = int(bounds[i]), int(bounds[i + 1])
            if limit is not None:
                b = min(b, a + limit)
            out.append(list(zip(ids_l[a:b], dist_l[a:b], strict=True)))
        return out

    def query_arrays(
        self, hashes: np.ndarray, max_distance: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Columnar answer for a batch: (query index, id, distance), sorted by query, distance,
        id. The form to feed a table or a join without building Python tuples."""
        d = _check_distance(max_distance)
        q = _as_uint64(hashes).reshape(-1)
        parts = []
        for seg in self._segments.values():
            qi, rows, dist = seg.search(q, d)
            parts.append((qi, np.asarray(seg.ids[rows]), dist))
        if not parts:
            return _empty3()
        qi, ids, dist = (np.concatenate(x) for x in zip(*parts, strict=True))
        order = np.lexsort((ids, dist, qi))
        return qi[order], ids[order], dist[order].astype(np.int64)

    def pairs_within(self, max_distance: int, bands: int | None = None) -> np.ndarray:
        """All pairs (id_a, id_b, distance), id_a < id_b, within ``max_distance`` across all
        segments, sorted by (id_a, id_b).

        Pairs are found by band buckets: rows whose band values are equal or within the band
        radius are compared, then deduplicated. The bands of the stored segments are laid out
        for queries; when another layout makes the join clearly cheaper, or when there are
        several segments (pairs cross them), a transient segment over all rows is built with
        the layout the join cost model prefers. ``bands`` forces the number of bands of the join
        (0: compare all pairs), for benchmarks and tests.
        """
        d = _check_distance(max_distance)
        segs = [s for s in self._segments.values() if s.n]
        n = sum(s.n for s in segs)
        if n < 2:
            return np.zeros((0, 3), dtype=np.int64)
        if bands is not None:
            if len(segs) == 1 and len(segs[0].widths) == bands:
                seg = segs[0]
            else:
                ids = np.concatenate([s.ids for s in segs])
                hashes = np.concatenate([s.hashes for s in segs])
                seg = _Segment.build(ids, hashes, bands, d, math.inf)
        elif len(segs) == 1:
            seg = segs[0]
            best_m, best = _best_join_bands(n, 64 - seg.const_mask.bit_count(), d)
            stored = _join_cost(n, seg.widths, seg.bucket, d)
            if best < 0.7 * stored:  # the transient must win by more than the model error
                seg = _Segment.build(seg.ids, seg.hashes, best_m, d, math.inf)
        else:
            ids = np.concatenate([s.ids for s in segs])
            hashes = np.concatenate([s.hashes for s in segs])
            m, _ = _best_join_bands(n, 64 - _constant_mask(hashes).bit_count(), d)
            seg = _Segment.build(ids, hashes, m, d, math.inf)
        ra, rb, dist = seg.self_pairs(d, allow_scan=bands is None)
        a, b = np.asarray(seg.ids[ra]), np.asarray(seg.ids[rb])
        out = np.stack([np.minimum(a, b), np.maximum(a, b), dist.astype(np.int64)], axis=1)
        return out[np.lexsort((out[:, 1], out[:, 0]))]

    # -- persistence

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write new segments and the manifest; segments already in ``directory`` are kept.

        Each segment is written to a temporary directory and renamed; the manifest is replaced
        last, so a reader sees the old index or the new one. Directories of segments no longer
        in the index are removed after the manifest is replaced.
        """
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        key = str(root.resolve())
        old = _read_manifest(root)
        entries = []
        for name, seg in self._segments.items():
            sub = seg.stored.get(key)
            if sub is None or not (root / sub).is_dir():
                sub = f"seg-{_safe(name)}-{uuid.uuid4().hex[:12]}"
                tmp = root / f".tmp-{sub}"
                seg.write(tmp)
                os.replace(tmp, root / sub)
                seg.stored[key] = sub
            entries.append({"name": name, "dir": sub, "rows": seg.n})
        manifest = {
            "format": _FORMAT,
            "bands": self.bands,
            "design_radius": self.design_radius,
            "table_bytes_per_row": self.table_bytes_per_row,
            "segments": entries,
        }
        fd, tmp_name = tempfile.mkstemp(prefix=".manifest-", dir=root)
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, root / _MANIFEST)
        keep = {e["dir"] for e in entries}
        for entry in old.get("segments", []):
            if entry["dir"] not in keep:
                shutil.rmtree(root / entry["dir"], ignore_errors=True)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], mmap: bool = True) -> HammingIndex:
        """Open a saved index; arrays are memory-mapped read-only unless ``mmap=False``."""
        root = Path(directory)
        manifest = _read_manifest(root)
        if manifest.get("format") != _FORMAT:
            raise ValueError(
                f"{root}: not a Hamming index (manifest format {manifest.get('format')!r})"
            )
        index = cls(
            bands=manifest["bands"],
            design_radius=manifest["design_radius"],
            table_bytes_per_row=manifest["table_bytes_per_row"],
        )
        key = str(root.resolve())
        for entry in manifest["segments"]:
            seg = _Segment.read(root / entry["dir"], mmap)
            seg.stored[key] = entry["dir"]
            index._segments[entry["name"]] = seg
        return index


def _constant_mask(hashes: np.ndarray) -> int:
    varying = int(np.bitwise_and.reduce(hashes)) ^ int(np.bitwise_or.reduce(hashes))
    return ~varying & _ALL


def _best_join_bands(n: int, n_free: int, d: int) -> tuple[int, float]:
    """Bands for a self-join within ``d`` (0 = scan), and its estimated cost in ns."""
    best_m, best = 0, _join_cost(n, [], [], d)
    for m in range(1, min(n_free, 16) + 1):
        widths = _split(n_free, m)
        if widths[0] > MAX_BAND_BITS or sum(1 << w for w in widths) > 16 * n + (1 << 16):
            continue
        bucket = [n / (1 << w) for w in widths]
        cost = _join_cost(n, widths, bucket, d) + _NS_BUILD_PER_ROW_BAND * n * m
        if cost < best:
            best_m, best = m, cost
    return best_m, best


def _read_manifest(root: Path) -> dict:
    path = root / _MANIFEST
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def _check_distance(max_distance: int) -> int:
    d = int(max_distance)
    if d != max_distance or d < 0:
        raise ValueError(f"max_distance must be a non-negative integer, got {max_distance!r}")
    return min(d, 64)


# ----------------------------------------------------------------------------- grouping


def connected_groups(pairs: np.ndarray, ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Groups of ids linked by pairs (near-duplicate clusters), size >= 2, largest first.

    Vectorised union-find: every round hooks the larger root of each pair under the smaller,
    then compresses paths by pointer jumping, until all pairs share a root. ``ids``, when given,
    is the set of known ids; pairs naming any other id are an error.
    """
    pairs = np.asarray(pairs)
    if pairs.size == 0:
        return []
    ends = pairs[:, :2].astype(np.int64)
    nodes = np.unique(ends)
    if ids is not None:
        known = np.unique(np.asarray(ids, dtype=np.int64))
        if not np.all(np.isin(nodes, known)):
            raise ValueError("pairs name ids that are not in ids")
    a = np.searchsorted(nodes, ends[:, 0])
    b = np.searchsorted(nodes, ends[:, 1])
    parent = np.arange(nodes.size, dtype=np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        lo, hi = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    roots, inverse, sizes = np.unique(parent, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    groups = np.split(nodes[order], np.cumsum(sizes)[:-1])
    groups = [g for g in groups if g.size >= 2]
    groups.sort(key=lambda g: (-g.size, int(g[0])))
    return groups
