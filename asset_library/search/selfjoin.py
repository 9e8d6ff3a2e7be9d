"""All pairs of rows within a Hamming radius inside one segment (near-duplicate groups).

Rows whose band values are equal or within the band radius are compared, bucket against
bucket, then verified with an exact popcount and deduplicated across bands: the same
pigeonhole argument as a query (see :mod:`asset_library.search.cost`), applied to every row at
once. When the cost model says the bands would cost more than comparing all pairs, all pairs
are compared.
"""

from __future__ import annotations

import numpy as np

from asset_library.search.cost import assign_radii, join_cost, xor_masks
from asset_library.search.ranges import (
    CANDIDATE_CHUNK,
    PROBE_CHUNK,
    budget_slices,
    expand,
    no_matches,
)
from asset_library.search.segment import Segment


def self_pairs(
    seg: Segment, d: int, allow_scan: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row a, row b, distance), a < b, for all pairs of rows within ``d``."""
    if seg.n < 2:
        return no_matches()
    # Rows of one segment share its constant bits, so the free bits carry all the distance.
    scan = join_cost(seg.n, [], [], d)
    if not seg.widths or (allow_scan and join_cost(seg.n, seg.widths, seg.bucket, d) > scan):
        return _scan_pairs(seg, d)
    radii = assign_radii(seg.widths, seg.bucket, d)
    out = [_band_pairs(seg, b, r, d) for b, r in enumerate(radii) if r >= 0]
    ra, rb, dist = (np.concatenate(x) for x in zip(*out, strict=True))
    if sum(r >= 0 for r in radii) > 1 and ra.size:
        _, first = np.unique(ra * seg.n + rb, return_index=True)
        ra, rb, dist = ra[first], rb[first], dist[first]
    return ra, rb, dist


def _band_pairs(seg: Segment, b: int, r: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs whose band ``b`` values are within ``r``: each bucket with itself, and each pair
    of buckets ``(v, v ^ mask)`` once, from the side where the mask's top bit is 0 in ``v``
    (exactly when ``v < v ^ mask``). Works on non-empty buckets, not rows, so a dense table
    costs no more than a sparse one."""
    n, w = seg.n, seg.widths[b]
    table = seg.offsets[seg.obase[b] : seg.obase[b + 1]]  # a view: no O(2**w) copy
    row_of = np.arange(n, dtype=np.int64) if b == 0 else seg.perm[(b - 1) * n : b * n]
    # Hashes in this band's order: candidates then sit in a few contiguous runs, so they are
    # compared without random reads; only the survivors are mapped back to rows.
    hb = seg.hashes if b == 0 else seg.hashes[row_of]
    # Non-empty buckets from the sorted band values: O(n), not O(2**w).
    keys = seg.key(b, hb)
    first = np.flatnonzero(np.diff(keys, prepend=-1))
    full = keys[first]
    full_sizes = np.diff(first, append=n)
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    # Same bucket: each position with the positions after it.
    many = full_sizes > 1
    owner = expand(first[many], full_sizes[many])
    ends = np.repeat(first[many] + full_sizes[many], full_sizes[many])
    _verify(hb, row_of, owner, owner + 1, ends - owner - 1, d, out)
    masks = xor_masks(w, r)[1:]
    tops = np.left_shift(1, np.log2(np.maximum(masks, 1)).astype(np.int64))  # top bit
    step = max(1, PROBE_CHUNK // max(full.size, 1))  # (bucket, mask) pairs per round
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
        owner = expand(first[ui], cu)
        _verify(hb, row_of, owner, np.repeat(st, cu), np.repeat(ct, cu), d, out)
    if not out:
        return no_matches()
    ra, rb, dist = (np.concatenate(x) for x in zip(*out, strict=True))
    return ra, rb, dist


def _verify(
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
    for piece in budget_slices(counts, CANDIDATE_CHUNK):
        c = counts[piece]
        pb = expand(starts[piece], c)
        pa = np.repeat(owner[piece], c)
        dist = np.bitwise_count(hb[pa] ^ hb[pb])
        keep = np.flatnonzero(dist <= d)
        ra, rb = row_of[pa[keep]], row_of[pb[keep]]
        out.append((np.minimum(ra, rb), np.maximum(ra, rb), dist[keep]))


def _scan_pairs(seg: Segment, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compare all pairs, in blocks of rows against the rows after them (tiny or dense
    segments, where buckets would not narrow anything)."""
    out_a, out_b, out_d = [], [], []
    block = max(1, (1 << 22) // max(seg.n, 1))
    for i0 in range(0, seg.n - 1, block):
        a = seg.hashes[i0 : i0 + block]
        dist = np.bitwise_count(a[:, None] ^ seg.hashes[None, i0:])
        ia, jb = np.nonzero(dist <= d)
        jb = jb + i0
        ia = ia + i0
        keep = jb > ia
        out_a.append(ia[keep].astype(np.int64))
        out_b.append(jb[keep].astype(np.int64))
        out_d.append(dist[ia[keep] - i0, jb[keep] - i0])
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_d)
