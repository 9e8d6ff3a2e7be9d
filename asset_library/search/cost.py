"""How a segment is laid out and probed: the number of bands, each band's probe radius, and
when a plain scan is cheaper than probing.

Pigeonhole: split the free bits into ``m`` bands. Write ``d = m * s + a`` (``0 <= a < m``); if
``dist(h, q) <= d`` then some band among ``a + 1`` chosen bands is within ``s`` bits, or some
other band is within ``s - 1`` bits (otherwise the total is at least
``(a + 1)(s + 1) + (m - a - 1)s = d + 1``). Probing every band value within its radius thus
finds a superset of the answer, which an exact popcount then verifies: recall is exact by
construction, and this module only decides what is cheapest.

Costs are in nanoseconds, measured on the project's 2-core machine (``benchmarks/search.py``).
Only their ratios matter.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np

#: Widest band: its table has 2**w + 1 offsets, so 24 bits is 64 MB of int32 per band.
MAX_BAND_BITS = 24
#: Most XOR masks one band may be probed with before a scan is preferred regardless of cost.
_MAX_MASKS = 300_000
#: Most bands considered: past 16, bands of 4 bits or fewer no longer narrow the candidates.
_MAX_BANDS = 16

_NS_QUERY_FIXED = 10_000.0  # numpy calls of one probed segment query
_NS_PER_BAND = 4_000.0  # key extraction and concatenation per probed band
_NS_PER_PROBE = 35.0  # one offsets lookup pair (random reads into the tables)
_NS_PER_CANDIDATE = 15.0  # gather, XOR, popcount of one candidate
_NS_SCAN_FIXED = 10_000.0
_NS_SCAN_PER_ROW = 2.0  # np.bitwise_count(db ^ q) per row, 10M rows (0.9 ns in cache at 1M)
_NS_JOIN_BUCKET = 30.0  # one (bucket, mask) step of a self-join
_NS_JOIN_PAIR = 18.0  # one candidate pair of a self-join
_NS_BUILD_PER_ROW_BAND = 120.0  # key, sort and table per row and band (for pairs_within)


@functools.lru_cache(maxsize=256)
def xor_masks(width: int, radius: int) -> np.ndarray:
    """XOR masks of ``width`` bits with at most ``radius`` ones, fewest ones first: the band
    values to probe around a query's value. Cached and read-only, shared by all segments."""
    out = [0]
    for k in range(1, min(radius, width) + 1):
        out.extend(sum(1 << i for i in c) for c in itertools.combinations(range(width), k))
    masks = np.array(out, dtype=np.int64)
    masks.setflags(write=False)
    return masks


def n_masks(width: int, radius: int) -> int:
    """``len(xor_masks(width, radius))`` without building them (0 for a negative radius)."""
    if radius < 0:
        return 0
    return sum(math.comb(width, k) for k in range(0, min(radius, width) + 1))


def split_bits(n_bits: int, m: int) -> list[int]:
    """Near-equal band widths, wider bands first."""
    q, r = divmod(n_bits, m)
    return [q + 1] * r + [q] * (m - r)


def assign_radii(widths: Sequence[int], bucket: Sequence[float], d: int) -> tuple[int, ...]:
    """Per-band probe radii for distance ``d`` (sharpened pigeonhole): the ``a + 1`` bands
    probed at ``s`` are those where the extra radius costs least; -1 means not probed."""
    m = len(widths)
    s, a = divmod(d, m)

    def cost(b: int, r: int) -> float:
        return n_masks(widths[b], r) * (_NS_PER_PROBE + bucket[b] * _NS_PER_CANDIDATE)

    extra = sorted(range(m), key=lambda b: (cost(b, s) - cost(b, s - 1), b))[: a + 1]
    return tuple(s if b in extra else s - 1 for b in range(m))


def probe_cost(widths: Sequence[int], bucket: Sequence[float], radii: Sequence[int]) -> float:
    """Estimated ns of one probed query; inf when the masks would not fit."""
    total = _NS_QUERY_FIXED
    for w, e, r in zip(widths, bucket, radii, strict=True):
        if r < 0:
            continue
        n = n_masks(w, r)
        if n > _MAX_MASKS:
            return math.inf
        total += _NS_PER_BAND + n * (_NS_PER_PROBE + e * _NS_PER_CANDIDATE)
    return total


def scan_cost(n: int) -> float:
    """Estimated ns of one query answered by popcounting all ``n`` rows."""
    return _NS_SCAN_FIXED + _NS_SCAN_PER_ROW * n


def choose_bands(n: int, n_free: int, design_radius: int, table_bytes_per_row: float) -> int:
    """Number of bands minimising estimated query cost at ``design_radius`` (0 = scan).

    The offsets tables must fit ``table_bytes_per_row`` (amortised), so a small shard does not
    carry a 2**21-entry table per band; a tiny segment is cheaper to scan than to probe.
    """
    if n_free == 0 or n == 0:
        return 0
    best_m, best = 0, scan_cost(n)
    budget = max(table_bytes_per_row * n, 4.0 * (1 << 16))
    for m in range(1, min(n_free, _MAX_BANDS) + 1):
        widths = split_bits(n_free, m)
        if widths[0] > MAX_BAND_BITS or 4.0 * sum((1 << w) + 1 for w in widths) > budget:
            continue
        bucket = [n / (1 << w) for w in widths]
        cost = probe_cost(widths, bucket, assign_radii(widths, bucket, design_radius))
        if cost < best:
            best_m, best = m, cost
    return best_m


def join_cost(n: int, widths: Sequence[int], bucket: Sequence[float], d: int) -> float:
    """Estimated ns of a self-join within ``d`` over ``n`` rows with these bands (none: all
    pairs compared)."""
    if not widths:
        return _NS_SCAN_PER_ROW * n * n / 2.0
    total = 0.0
    for w, e, r in zip(widths, bucket, assign_radii(widths, bucket, d), strict=True):
        if r < 0:
            continue
        k = n_masks(w, r)
        if k > _MAX_MASKS:
            return math.inf
        buckets = (1 << w) * -math.expm1(-n / (1 << w))  # expected non-empty buckets
        total += (k - 1) * buckets * _NS_JOIN_BUCKET + n * e * k / 2.0 * _NS_JOIN_PAIR
    return total


def best_join_bands(n: int, n_free: int, d: int) -> tuple[int, float]:
    """Bands of a transient segment built for a self-join within ``d`` (0 = compare all
    pairs), and its estimated cost in ns including the build."""
    best_m, best = 0, join_cost(n, [], [], d)
    for m in range(1, min(n_free, _MAX_BANDS) + 1):
        widths = split_bits(n_free, m)
        if widths[0] > MAX_BAND_BITS or sum(1 << w for w in widths) > 16 * n + (1 << 16):
            continue
        bucket = [n / (1 << w) for w in widths]
        cost = join_cost(n, widths, bucket, d) + _NS_BUILD_PER_ROW_BAND * n * m
        if cost < best:
            best_m, best = m, cost
    return best_m, best
