"""Near-duplicate groups: the connected components of the pairs a self-join found."""

from __future__ import annotations

import numpy as np


def connected_groups(pairs: np.ndarray, ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Groups of ids linked by pairs (near-duplicate clusters), size >= 2, largest first.

    Vectorised union-find: every round hooks the larger root of each pair under the smaller,
    then compresses paths by pointer jumping, until all pairs share a root. ``ids``, when given,
    is the set of known ids; pairs naming any other id are an error.
    """
    pairs = np.asarray(pairs)
    if pairs.size == 0:
        return []
    if pairs.ndim != 2 or pairs.shape[1] < 2:
        raise ValueError(f"pairs must be rows of (id_a, id_b, ...), got shape {pairs.shape}")
    ends = pairs[:, :2].astype(np.int64)
    nodes = np.unique(ends)
    if ids is not None:
        known = np.unique(np.asarray(ids, dtype=np.int64))
        unknown = nodes[~np.isin(nodes, known)]
        if unknown.size:
            raise ValueError(f"pairs name {unknown.size} ids not in ids, first {int(unknown[0])}")
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
