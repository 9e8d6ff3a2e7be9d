"""pHashes of an image's eight rotations and mirror images, from the image's own DCT.

pHash finds re-encodes, resizes and blurred copies, but a copy turned by 90 degrees or mirrored
is as far from the original as an unrelated picture. A query that also searches for the hashes
its seven transformed versions would have finds them, with no change to what is stored.

The transforms act on the DCT's low-frequency block by sign flips and a transpose: mirroring
left-right negates the odd horizontal frequencies (columns of the block), flipping top-bottom
the odd vertical ones (rows), and transposing the image transposes the block; the rotations are
compositions of these. The sign flips move the block's median, so each variant's bits are
recomputed from its own transformed coefficients, never from the stored hash.

Mirroring is exact: Pillow's Lanczos resize to the 32x32 grid is symmetric, so the flipped
grid's DCT is the sign-flipped DCT and the hashes are bit-identical to those of the flipped
image. Transposing is not: Pillow resizes in two passes, horizontal first, rounding to 8 bits
in between, so the grid of the transposed image differs from the transposed grid by up to 12
grey levels (on 80 corpus JPEGs, a pair of bits differed in 18 of the 320 transposing
variants). So the grid of the
transposed image is made once more (one more resize and DCT, 0.1-2.5 ms on a reduced decode)
and the four transposing variants come from its block by the same sign flips.

A match is confirmed by a second hash (:mod:`asset_library.search.quality`), so a query also
has the dHashes of its eight variants (:func:`dhash_variants`): a rotated copy's dHash is far
from the query's own, close to that of the query turned the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from asset_library.ingest.fingerprint import (
    DEFAULT_MAX_PIXELS,
    Fingerprint,
    Mode,
    dhash_grid,
    dhash_of_grid,
    fingerprint_and_grey,
    phash_block,
    phash_of_block,
    phash_pixels,
)

#: The eight variants, by the name of the Pillow transpose that makes each from the image
#: (``rot90`` is Pillow's ``ROTATE_90``, counter-clockwise; ``flip_h`` mirrors left-right).
VARIANTS: dict[str, Image.Transpose | None] = {
    "identity": None,
    "rot90": Image.Transpose.ROTATE_90,
    "rot180": Image.Transpose.ROTATE_180,
    "rot270": Image.Transpose.ROTATE_270,
    "flip_h": Image.Transpose.FLIP_LEFT_RIGHT,
    "flip_v": Image.Transpose.FLIP_TOP_BOTTOM,
    "transpose": Image.Transpose.TRANSPOSE,
    "transverse": Image.Transpose.TRANSVERSE,
}

_ODD = (-1.0) ** np.arange(8)
_ROWS = _ODD[:, None]  # negates odd vertical frequencies: a top-bottom flip
_COLUMNS = _ODD[None, :]  # negates odd horizontal frequencies: a left-right mirror

# Each variant as (made from the transposed image's block?, sign flips on that block).
# rot90 = top-bottom flip of the transpose, rot270 = left-right mirror of it, transverse = the
# transpose turned by 180 degrees.
_FROM_BLOCK: dict[str, tuple[bool, Callable[[np.ndarray], np.ndarray]]] = {
    "identity": (False, lambda b: b),
    "flip_h": (False, lambda b: b * _COLUMNS),
    "flip_v": (False, lambda b: b * _ROWS),
    "rot180": (False, lambda b: b * _ROWS * _COLUMNS),
    "transpose": (True, lambda b: b),
    "rot90": (True, lambda b: b * _ROWS),
    "rot270": (True, lambda b: b * _COLUMNS),
    "transverse": (True, lambda b: b * _ROWS * _COLUMNS),
}


# The variants that flip the rows (top-bottom) or the columns (left-right) of their grid, as
# the sign flips of _FROM_BLOCK do to the DCT block.
_FLIPS_ROWS = {"flip_v", "rot180", "rot90", "transverse"}
_FLIPS_COLUMNS = {"flip_h", "rot180", "rot270", "transverse"}


class QueryImageError(ValueError):
    """A query image that cannot be fingerprinted; says which image and why."""

    def __init__(self, fp: Fingerprint) -> None:
        super().__init__(f"query image (md5 {fp.md5}) was rejected as {fp.reason}: {fp.message}")
        self.fingerprint = fp


def variants_of_blocks(block: np.ndarray, transposed_block: np.ndarray) -> dict[str, str]:
    """The eight pHashes from the DCT block of an image and that of its transpose.

    Given ``transposed_block=block.T`` this is the pure coefficient form: exact for the four
    non-transposing variants, within a pair of bits for the others (see the module docstring).
    """
    out = {}
    for name, (transposed, flip) in _FROM_BLOCK.items():
        out[name] = phash_of_block(flip(transposed_block if transposed else block))
    return out


def phash_variants(grey: Image.Image) -> dict[str, str]:
    """The pHashes of a greyscale image's eight rotations and mirror images, by name, each
    bit-identical to the pHash of the image transformed by that Pillow transpose."""
    block = phash_block(phash_pixels(grey))
    transposed = phash_block(phash_pixels(grey.transpose(Image.Transpose.TRANSPOSE)))
    return variants_of_blocks(block, transposed)


def dhash_variants(grey: Image.Image) -> dict[str, str]:
    """The dHashes of a greyscale image's eight rotations and mirror images, by name: what
    confirms a match of the pHash variant of the same name. dHash compares horizontal
    neighbours on a 9x8 grid; the grid of a mirrored image is the mirrored grid (the resize is
    symmetric), so the eight come from two grids, the image's and its transpose's, by the same
    flips as the pHash variants."""
    grids = {False: dhash_grid(grey), True: dhash_grid(grey.transpose(Image.Transpose.TRANSPOSE))}
    out = {}
    for name, (transposed, _) in _FROM_BLOCK.items():
        grid = grids[transposed]
        if name in _FLIPS_ROWS:
            grid = grid[::-1, :]
        if name in _FLIPS_COLUMNS:
            grid = grid[:, ::-1]
        out[name] = dhash_of_grid(grid)
    return out


def query_fingerprint(
    data: bytes, *, mode: Mode = "fast", max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Fingerprint, dict[str, str], dict[str, str]]:
    """A query image's fingerprint and its eight pHash and eight dHash variants, from one
    decode. Never raises on bad image data: a rejected image comes back with its reason and
    no variants."""
    fp, grey = fingerprint_and_grey(data, mode=mode, max_pixels=max_pixels)
    if grey is None:
        return fp, {}, {}
    return fp, phash_variants(grey), dhash_variants(grey)


def fingerprint_variants(
    data: bytes, *, mode: Mode = "fast", max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, str]:
    """The eight pHash variants of an image given as bytes (a file, or the stored bytes of an
    md5); ``identity`` is its own pHash. Raises :class:`QueryImageError` if it is rejected."""
    fp, variants, _ = query_fingerprint(data, mode=mode, max_pixels=max_pixels)
    if not fp.ok:
        raise QueryImageError(fp)
    return variants
