"""Which near-duplicate results a quality cut-off keeps.

A flat image's pHash (one colour, a smooth gradient) is made of rounding noise, so it lies
within the threshold of every other flat image's: on the corpus, 27 flat files answered each
other, 31 unrelated results per query. Results below the cut-off are left out. A query that is
itself below it keeps none: its hash cannot tell its own copies from other flat images, so any
match would be a guess (byte-identical copies are found by md5, not by hash).
"""

from __future__ import annotations

import numpy as np

from asset_library.ingest.fingerprint import DEFAULT_MIN_QUALITY


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
