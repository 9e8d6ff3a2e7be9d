"""Vectorised range arithmetic shared by queries and the self-join.

A probe yields a range of positions in a bucket table; many probes yield many ranges. These
functions expand them without a Python loop, in pieces small enough that the temporary arrays
stay at a few tens of MB whatever the segment size.
"""

from __future__ import annotations

import itertools

import numpy as np

#: Probes expanded at once in a batch (bounds temporary memory to a few tens of MB).
PROBE_CHUNK = 1 << 21
#: Candidates verified at once.
CANDIDATE_CHUNK = 1 << 22


def expand(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate the ranges ``[start, start + count)``."""
    total = int(counts.sum())
    ends = np.cumsum(counts)
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - counts), counts)


def budget_slices(counts: np.ndarray, budget: int) -> list[slice]:
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


def no_matches() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The empty columnar answer: (index, index, distance)."""
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
