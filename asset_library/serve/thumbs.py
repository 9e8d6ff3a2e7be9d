"""Thumbnails: a small JPEG of each image, made once and kept in the service's own cache.

The cache is a folder the service owns (never inside the library): ``<cache>/thumbs/<size>/
<first two hex digits>/<md5>.jpg``, each written atomically, so concurrent requests for one image
at worst both make it and a reader never sees half a file. Each carries the CRC-32 of its other
bytes in a JPEG comment: a cached file whose bytes disagree with it (cut, overwritten, emptied)
is logged by name and made again, never served.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageOps

from asset_library.ingest.fingerprint import DEFAULT_MAX_PIXELS  # registers the HEIF opener
from asset_library.layout import atomic_path

#: The quality of the cached JPEGs: small files, no visible blocking at 256 px.
JPEG_QUALITY = 82

#: The comment that seals a cached thumbnail, followed by the CRC-32 (8 hex digits) of the
#: JPEG without it.
SEAL = b"asset-library crc32 "
_SEAL_SEGMENT = b"\xff\xfe" + struct.pack(">H", 2 + len(SEAL) + 8) + SEAL

logger = logging.getLogger(__name__)


class ThumbnailCache:
    """Thumbnails of at most ``size`` pixels on their longest side, by md5."""

    def __init__(self, folder: Path, size: int = 256) -> None:
        self.folder = folder / str(size)
        self.size = size

    def path(self, md5: str) -> Path:
        return self.folder / md5[:2] / f"{md5}.jpg"

    def cached(self, md5: str) -> bytes | None:
        """The cached thumbnail's bytes, if there is one and they are whole (else ``None``:
        to be made again)."""
        path = self.path(md5)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if unsealed(data) is None:
            logger.warning("thumbnail cache damaged, made again: %s", path)
            return None
        return data

    def make(self, md5: str, data: bytes) -> bytes:
        """Make (or remake) the thumbnail of an image given its bytes, and cache it sealed."""
        thumb = sealed(thumbnail(data, self.size))
        with atomic_path(self.path(md5)) as temp:
            temp.write_bytes(thumb)
        return thumb


def sealed(jpeg: bytes) -> bytes:
    """The JPEG with a comment holding the CRC-32 of its bytes, right after its start marker."""
    return jpeg[:2] + _SEAL_SEGMENT + b"%08x" % zlib.crc32(jpeg) + jpeg[2:]


def unsealed(data: bytes) -> bytes | None:
    """The JPEG a :func:`sealed` file holds, or ``None`` if its bytes disagree with its seal."""
    head = 2 + len(_SEAL_SEGMENT)
    if data[2:head] != _SEAL_SEGMENT:
        return None
    jpeg = data[:2] + data[head + 8 :]
    return jpeg if data[head : head + 8] == b"%08x" % zlib.crc32(jpeg) else None


class ThumbnailError(ValueError):
    """Stored bytes that give no thumbnail: too many pixels, or a decode that failed."""


def thumbnail(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """A JPEG of the image's first frame as displayed (EXIF orientation applied), at most
    ``size`` pixels on its longest side, transparency flattened onto white. Refuses, as the
    fingerprint does, a header over ``max_pixels`` before decoding anything."""
    try:
        return _thumbnail(data, size, max_pixels)
    except ThumbnailError:
        raise
    except Exception as error:  # whatever Pillow raises on bytes it cannot decode
        raise ThumbnailError(f"cannot be decoded: {error}") from None


def _thumbnail(data: bytes, size: int, max_pixels: int) -> bytes:
    with Image.open(io.BytesIO(data)) as opened:
        image: Image.Image = opened
        if image.width * image.height > max_pixels:
            raise ThumbnailError(
                f"{image.width}x{image.height} pixels, over the limit of {max_pixels:,}"
            )
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")
            flat = Image.new("RGB", image.size, "white")
            flat.paste(image, mask=image.getchannel("A"))
            image = flat
        elif image.mode != "RGB":
            image = image.convert("RGB")
        out = io.BytesIO()
        image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()
