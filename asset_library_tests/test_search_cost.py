"""The cost model: band layouts per segment size, probe radii that keep recall exact, and the
scan chosen where probing would cost more."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from asset_library.search.cost import (
    assign_radii,
    best_join_bands,
    choose_bands,
    join_cost,
    n_masks,
    probe_cost,
    scan_cost,
    split_bits,
    xor_masks,
)
from asset_library.search.segment import Segment


@pytest.mark.parametrize(("width", "radius"), [(4, 0), (4, 2), (8, 3), (13, 2), (5, 9)])
def test_masks_are_the_hamming_ball_fewest_ones_first(width, radius):
    masks = xor_masks(width, radius)
    ones = np.bitwise_count(masks.astype(np.uint64))
    assert masks.size == n_masks(width, radius) == len(set(masks.tolist()))
    assert ones.max() == min(radius, width) and np.all(np.diff(ones) >= 0)
    assert np.all(masks < (1 << width)) and not masks.flags.writeable
    assert n_masks(width, -1) == 0


def test_radii_cover_the_pigeonhole_bound():
    """Two hashes within d of each other differ by more than r_b bits on every band only if
    sum(r_b + 1) > d: the radii must add up to exactly d + 1 (no miss, no waste)."""
    for m, d in itertools.product(range(1, 8), range(0, 20)):
        widths = split_bits(63, m)
        assert sum(widths) == 63 and max(widths) - min(widths) <= 1
        radii = assign_radii(widths, [1_000_000 / (1 << w) for w in widths], d)
        assert sum(r + 1 for r in radii) == d + 1, (m, d, radii)
        assert max(radii) - min(radii) <= 1, (m, d, radii)


def test_layout_follows_the_segment_size():
    assert choose_bands(100, 64, 8, 8.0) == 0  # a tiny segment is scanned
    assert choose_bands(10_000, 0, 8, 8.0) == 0  # no free bit: nothing to bucket on
    assert split_bits(64, choose_bands(10_000_000, 64, 8, 8.0)) == [22, 21, 21]
    small, big = choose_bands(30_000, 64, 8, 8.0), choose_bands(10_000_000, 64, 8, 8.0)
    assert small > big  # small shards: more, narrower bands so the tables stay small
    assert 4 * sum((1 << w) + 1 for w in split_bits(64, small)) <= 8 * 30_000


def test_a_radius_too_large_for_probing_is_scanned():
    widths = split_bits(64, 3)
    bucket = [10_000_000 / (1 << w) for w in widths]
    assert probe_cost(widths, bucket, assign_radii(widths, bucket, 8)) < scan_cost(10**7) / 100
    assert probe_cost(widths, bucket, assign_radii(widths, bucket, 16)) < scan_cost(10**7)
    assert probe_cost(widths, bucket, assign_radii(widths, bucket, 24)) == math.inf
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**64, 50_000, dtype=np.uint64)
    seg = Segment.build(np.arange(hashes.size), hashes, 4, 8, 8.0)
    assert sum(r + 1 for r in seg.plan(4).radii) == 5
    assert seg.plan(40).radii is None  # the exact scan instead of ~10**7 probes


def test_self_join_layout():
    assert best_join_bands(100, 64, 4)[0] == 0  # compare all 4,950 pairs
    m, cost = best_join_bands(1_000_000, 64, 4)
    assert m >= 2 and cost < join_cost(1_000_000, [], [], 4) / 100  # far below all pairs
