"""Thumbnails: a small JPEG of each image, made once and kept in the service's own cache.

The cache is a folder the service owns (never inside the library): ``<cache>/thumbs/<size>/
<first two hex digits>/<md5>.jpg``, each written atomically, so concurrent requests for one image
at worst both make it and a reader never sees half a file.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps

from asset_library.ingest.fingerprint import DEFAULT_MAX_PIXELS  # registers the HEIF opener
from asset_library.layout import atomic_path

#: The quality of the cached JPEGs: small files, no visible blocking at 256 px.
JPEG_QUALITY = 82


class ThumbnailCache:
    """Thumbnails of at most ``size`` pixels on their longest side, by md5."""

    def __init__(self, folder: Path, size: int = 256) -> None:
        self.folder = folder / str(size)
        self.size = size

    def path(self, md5: str) -> Path:
        return self.folder / md5[:2] / f"{md5}.jpg"

    def cached(self, md5: str) -> Path | None:
        path = self.path(md5)
        return path if path.exists() else None

    def make(self, md5: str, data: bytes) -> Path:
        """Make (or remake) the thumbnail of an image given its bytes; its path."""
        path = self.path(md5)
        thumb = thumbnail(data, self.size)
        with atomic_path(path) as temp:
            temp.write_bytes(thumb)
        return path


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
    with Image.open(io.BytesIO(data)) as image:
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
