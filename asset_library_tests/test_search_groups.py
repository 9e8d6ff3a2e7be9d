"""Near-duplicate groups: connected components of pairs, against a plain union-find."""

from __future__ import annotations

import numpy as np
import pytest

from asset_library.search import connected_groups


def test_groups_are_components_largest_first():
    # 7-3-5 is a chain (3 and 7 are linked only through 5); 10-11 and 20-21 tie in size.
    pairs = np.array([[20, 21, 4], [5, 7, 1], [10, 11, 0], [3, 5, 2]], dtype=np.int64)
    groups = connected_groups(pairs)
    assert [g.tolist() for g in groups] == [[3, 5, 7], [10, 11], [20, 21]]
    assert [g.tolist() for g in connected_groups(pairs[:, :2])] == [[3, 5, 7], [10, 11], [20, 21]]
    assert connected_groups(np.zeros((0, 3), np.int64), np.arange(3)) == []


def test_bad_pairs_are_named():
    pairs = np.array([[1, 2, 0], [2, 9, 1]], dtype=np.int64)
    with pytest.raises(ValueError, match="1 ids not in ids, first 9"):
        connected_groups(pairs, np.arange(5))
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        connected_groups(np.array([1, 2, 3]))


def test_connected_groups_union_find():
    rng = np.random.default_rng(9)
    # A long chain in shuffled order needs several hooking rounds; plus small random groups.
    chain = rng.permutation(5_000)[:300]
    edges = [(int(a), int(b)) for a, b in zip(chain, chain[1:], strict=False)]
    edges += [(int(a), int(b)) for a, b in rng.integers(5_000, 6_000, (400, 2)) if a != b]
    rng.shuffle(edges)
    pairs = np.array([(min(e), max(e), 1) for e in edges], dtype=np.int64)
    groups = connected_groups(pairs, np.arange(6_000))
    # Reference: plain union-find in Python.
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        parent[find(a)] = find(b)
    expected: dict[int, list[int]] = {}
    for x in list(parent):
        expected.setdefault(find(x), []).append(x)
    assert sorted(tuple(g.tolist()) for g in groups) == sorted(
        tuple(sorted(g)) for g in expected.values() if len(g) >= 2
    )
    sizes = [g.size for g in groups]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 300
    assert connected_groups(np.zeros((0, 3), np.int64), np.arange(3)) == []
    with pytest.raises(ValueError):
        connected_groups(pairs, np.arange(10))
