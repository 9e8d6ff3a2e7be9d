"""Which near-duplicate results are kept: a quality cut-off, and confirmation by a second hash.

A flat image's pHash (one colour, a smooth gradient) is made of rounding noise, so it lies
within the threshold of every other flat image's: on the corpus, 27 flat files answered each
other, 31 unrelated results per query. Results below the cut-off are left out. A query that is
itself below it keeps none: its hash cannot tell its own copies from other flat images, so any
match would be a guess (byte-identical copies are found by md5, not by hash).

A match is also confirmed by a second hash, a common way to combine perceptual hashes: a pHash
match is kept only when the dHash is close too. The two hashes read different things (pHash the
low DCT frequencies against their median, dHash the sign of horizontal steps), so a chance
pHash collision between unrelated pictures is rarely a dHash one, while a real copy moves both
hashes a little. On the corpus the one unrelated pHash match (a flag in three horizontal
bands, 3 bits from a grey gradient in vertical bands) is 64 dHash bits away.
"""

from __future__ import annotations

import numpy as np

from asset_library.search.thresholds import DEFAULT_CONFIRM_DISTANCE, DEFAULT_MIN_QUALITY

#: The hash that confirms a match of each kind: dHash for pHash and aHash searches, pHash for a
#: dHash search.
CONFIRMING_HASH = {"phash": "dhash", "ahash": "dhash", "dhash": "phash"}


def informative(
    query_quality: int | None,
    result_qualities: np.ndarray,
    min_quality: int = DEFAULT_MIN_QUALITY,
) -> np.ndarray:
    """A mask over results: True where a result is kept. ``None`` (a quality not recorded, as
    in rows ingested before it was) counts as passing, so old rows are not silently dropped."""
    qualities = np.asarray(result_qualities, dtype=np.float64)  # NaN: not recorded
    if query_quality is not None and query_quality < min_quality:
        return np.zeros(qualities.shape, dtype=bool)
    return ~(qualities < min_quality)


def confirmed(
    query_hashes: int | np.ndarray,
    result_hashes: np.ndarray,
    max_distance: int = DEFAULT_CONFIRM_DISTANCE,
) -> np.ndarray:
    """A mask over results: True where a result's second hash (uint64; see
    :data:`CONFIRMING_HASH`) is within ``max_distance`` bits of the query's (one hash, or one
    per result, as for the pairs of a self-join)."""
    query = np.asarray(query_hashes, dtype=np.uint64)
    return np.bitwise_count(np.asarray(result_hashes, dtype=np.uint64) ^ query) <= max_distance
