"""One segment on its own: constant bits, persistence, bad input, and the range arithmetic
its queries and self-join expand candidates with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from asset_library.search.ranges import budget_slices, expand
from asset_library.search.segment import Segment, constant_bits
from asset_library.search.selfjoin import self_pairs


def test_constant_bits():
    top = np.uint64(1) << np.uint64(63)
    hashes = np.array([top | np.uint64(0b1010), top | np.uint64(0b0011)], dtype=np.uint64)
    mask, value = constant_bits(hashes)
    assert mask == (2**64 - 1) ^ 0b1001 and value == 2**63 | 0b0010
    assert constant_bits(np.zeros(0, np.uint64)) == (2**64 - 1, 0)


def test_written_segment_reads_back_the_same(tmp_path: Path):
    rng = np.random.default_rng(2)
    hashes = rng.integers(0, 2**63, 20_000, dtype=np.uint64)  # top bit constant 0
    hashes[1] = hashes[0] ^ np.uint64(0b101)
    ids = rng.permutation(20_000).astype(np.int64) + 7
    seg = Segment.build(ids, hashes, 3, 8, 8.0)
    seg.write(tmp_path / "seg")
    for mmap in (True, False):
        back = Segment.read(tmp_path / "seg", mmap)
        assert (back.const_mask, back.const_value, back.widths) == (2**63, 0, [21, 21, 21])
        assert back.nbytes() == seg.nbytes() and isinstance(back.hashes, np.memmap) == mmap
        for d in (0, 2, 5):
            got, want = back.search(hashes[:50], d), seg.search(hashes[:50], d)
            assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
        a, b, dist = self_pairs(back, 3)
        pairs = {frozenset((int(back.ids[x]), int(back.ids[y]))) for x, y in zip(a, b, strict=True)}
        assert frozenset((int(ids[0]), int(ids[1]))) in pairs and dist.max() <= 3
    with pytest.raises(FileExistsError):
        seg.write(tmp_path / "seg")  # a segment directory is never overwritten in place


def test_bad_input_and_owned_arrays():
    hashes = np.arange(10, dtype=np.uint64)
    with pytest.raises(ValueError, match="ids and hashes differ in length: 9 != 10"):
        Segment.build(np.arange(9), hashes, None, 8, 8.0)
    with pytest.raises(ValueError, match="bands must be >= 0, got -1"):
        Segment.build(np.arange(10), hashes, -1, 8, 8.0)
    seg = Segment.build(np.arange(10), hashes, 0, 8, 8.0)  # scanned as given
    hashes[:] = 0
    assert seg.hashes.tolist() == list(range(10))  # the caller's array stays the caller's


def test_expand_and_budget_slices():
    starts, counts = np.array([5, 0, 100, 7]), np.array([3, 0, 2, 4])
    assert expand(starts, counts).tolist() == [5, 6, 7, 100, 101, 7, 8, 9, 10]
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 50, 1_000)
    pieces = budget_slices(counts, 500)
    assert pieces[0].start == 0 and pieces[-1].stop == counts.size
    assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:], strict=False))
    assert all(counts[p].sum() <= 500 + counts[p][-1] for p in pieces)
    assert budget_slices(np.zeros(0, np.int64), 10) == []
