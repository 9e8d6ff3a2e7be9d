"""Finding partial decodes: an image whose data ends before its pixels do is rejected as
truncated, and is never hashed as if it were whole.

A cut file often decodes without an error. libjpeg fills the missing rows with grey and says so
only in a warning ("premature end of data segment"), which Pillow drops; libtiff does the same
for a cut JPEG strip, and writes what it says about the others to stderr; Pillow reads an
uncompressed TIFF strip on into the bytes that follow it; and neither Pillow nor OpenCV says why
a WebP decode failed. A partial decode accepted would put a half-grey image's hashes in the
library under the cut file's md5, so each format's own decoder is asked instead:

* JPEG: :func:`strict_jpeg_decode`, libjpeg-turbo through simplejpeg stopping on its first
  warning, for the frame types it decodes at a reduced scale (:func:`jpeg_frame_type`).
* TIFF: :func:`decode_tiff`, with libtiff's error handler (installed through ctypes) collecting
  its messages into the rejection, each uncompressed strip's byte count checked against its rows
  and each JPEG strip through the strict decode.
* Once a decode has failed, :func:`cut_short` tells a cut file from a corrupt one: a WebP's RIFF
  size and libwebp's incremental decoder, a PNG's chunk lengths.

The C libraries are the copies Pillow itself loaded, found through ``/proc/self/maps``.
:mod:`asset_library.ingest.fingerprint` calls these checks around its decode and turns the
:class:`Rejected` they raise into the image's rejection.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
from typing import Any

import numpy as np
import simplejpeg
from PIL.TiffImagePlugin import TiffImageFile

# JPEG frame types (SOFn markers) libjpeg-turbo decodes at a reduced scale: baseline, extended and
# progressive DCT, Huffman or arithmetic coded. Lossless and hierarchical ones are left to Pillow:
# simplejpeg aborts the process when asked to scale a lossless JPEG.
SCALABLE_JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})
# libjpeg's warnings that the entropy-coded data stopped before the pixels did: it ran into a
# marker (an end-of-image marker appended to a cut file, say) or the end of the bytes, or found
# another marker where the next restart marker belongs. libjpeg fills what is missing with grey
# and goes on, and Pillow drops its warnings, so only a decoder that stops on them can tell.
_PREMATURE_END = re.compile(
    r"premature end|found marker 0x(?!d[0-7])[0-9a-f]{2} instead of RST", re.IGNORECASE
)

# libtiff's words for a strip or tile whose data stops before its pixels do: the codec ran out of
# input (LZW, PackBits; deflate's "no progress possible" comes with no text from zlib), or the
# strip lies past the end of the file. Anything else it says makes the file corrupt.
_TIFF_CUT = re.compile(
    r"not enough data|not terminated with EOI|premature end|read error on (strip|tile)"
    r"|invalid read at loc|ZLib error: \.$",
    re.IGNORECASE,
)
# TIFF tags and Compression values read before a decode.
_TIFF_COMPRESSION, _TIFF_NONE, _TIFF_JPEG, _TIFF_JPEG_TABLES = 259, 1, 7, 347
_TIFF_STRIPS = (273, 279)  # StripOffsets, StripByteCounts
_TIFF_TILES = (324, 325)  # TileOffsets, TileByteCounts
#: Most libtiff messages kept for one image: a hostile file can make it repeat itself.
_TIFF_MESSAGES_KEPT = 20


class Rejected(Exception):
    """Internal signal: the image is bad for a stated reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def describe(error: BaseException) -> str:
    """The error's own words, cut to a length a rejection's message can hold."""
    text = str(error).strip() or type(error).__name__
    return text[:300]


def jpeg_frame_type(data: bytes) -> int | None:
    """The SOFn marker's second byte (0xC0 baseline, 0xC2 progressive, ...), None if not found:
    walk the marker segments after SOI up to the frame header."""
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame
            return None
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


def strict_jpeg_decode(
    data: bytes, width: int, height: int, scale: int, *, what: str = "jpeg"
) -> np.ndarray | None:
    """The greyscale pixels at 1/``scale`` (``height x width x 1``) from a libjpeg-turbo decode
    that stops on its first warning. Raises ``Rejected("truncated")`` when that warning says
    the compressed data ended before the pixels did; None when it stopped for another reason
    (an unsupported colour conversion, a harmless oddity such as bytes before a marker), and
    then Pillow decodes the image as before."""
    try:
        return simplejpeg.decode_jpeg(
            data,
            "GRAY",
            min_height=-(-height // scale),
            min_width=-(-width // scale),
            min_factor=scale,
            strict=True,
        )
    except ValueError as error:
        if _PREMATURE_END.search(str(error)):
            raise Rejected(
                "truncated",
                f"{what} cannot be decoded: {describe(error)}; its compressed data ends before "
                "its pixels do",
            ) from None
        return None


def decode_tiff(data: bytes, image: TiffImageFile) -> None:
    """Decode a TIFF's first image, rejected as truncated when a strip or tile ends before its
    pixels do. libtiff says so in its error messages, collected here instead of written to
    stderr; Pillow reads an uncompressed strip past its byte count and silences libtiff's
    warnings (where libjpeg's premature end goes), so those two are checked here."""
    short = _tiff_raw_chunk_short(image)
    if short:
        raise Rejected("truncated", f"tiff cannot be decoded: {short}")
    said = _libtiff_messages()
    try:
        image.load()
    except Exception as error:
        message = f"tiff cannot be decoded: {describe(error)}"
        if said:
            message += "; the decoder reported: " + "; ".join(dict.fromkeys(said))[:500]
        cut = "truncated" in message.lower() or any(_TIFF_CUT.search(text) for text in said)
        raise Rejected("truncated" if cut else "corrupt", message) from None
    finally:
        _tiff_said.messages = None
    if image.tag_v2.get(_TIFF_COMPRESSION) == _TIFF_JPEG:
        _check_tiff_jpeg_chunks(data, image)


def _tiff_chunks(image: TiffImageFile) -> tuple[str, list[int], list[int]]:
    """``("strip" or "tile", offsets, byte counts)`` of the TIFF's current image."""
    tags = image.tag_v2
    kind, (offsets, counts) = (
        ("tile", _TIFF_TILES) if _TIFF_TILES[0] in tags else ("strip", _TIFF_STRIPS)
    )
    return kind, list(tags.get(offsets) or ()), list(tags.get(counts) or ())


def _tiff_raw_chunk_short(image: TiffImageFile) -> str | None:
    """Which uncompressed strip or tile declares fewer bytes than its rows take, if one does.

    Pillow reads such a strip on into whatever follows it (the next strip, the directory), so
    its pixels would come from bytes that are not its own; libtiff refuses it ("Not enough
    data for scanline"). A single strip is read to the end of its rows, as libtiff does (it
    takes a short count there for a bogus one): only a file that ends first is cut, which the
    decoder reports. Subsampled YCbCr, laid out in blocks, is left to the decoder.
    """
    tags = image.tag_v2
    if tags.get(_TIFF_COMPRESSION, _TIFF_NONE) != _TIFF_NONE or tags.get(262) == 6:
        return None
    kind, _, counts = _tiff_chunks(image)
    if len(counts) < 2:
        return None
    width, height = image.size
    bits = tuple(tags.get(258) or (1,))
    samples = int(tags.get(277) or 1)
    separate = tags.get(284) == 2
    pixel_bits = bits[0] if separate else (sum(bits) if len(bits) == samples else bits[0] * samples)
    if kind == "tile":
        chunk_width, rows = int(tags.get(322) or 0), int(tags.get(323) or 0)
    else:
        chunk_width, rows = width, min(int(tags.get(278) or height), height) or height
    per_plane = -(-height // rows) if kind == "strip" and rows else 0
    row_bytes = (chunk_width * pixel_bits + 7) // 8
    for index, count in enumerate(counts):
        chunk_rows = min(rows, height - (index % per_plane) * rows) if per_plane else rows
        if count < chunk_rows * row_bytes:
            return (
                f"its {kind} {index} holds {count:,} bytes of the {chunk_rows * row_bytes:,} "
                "its pixels take"
            )
    return None


def _check_tiff_jpeg_chunks(data: bytes, image: TiffImageFile) -> None:
    """Each JPEG strip or tile (its tables from the JPEGTables tag) through the strict
    libjpeg-turbo decode at 1/8 scale, a check only: libtiff fills a cut one with grey."""
    tables = image.tag_v2.get(_TIFF_JPEG_TABLES)
    prefix = (
        tables[:-2] if isinstance(tables, bytes) and tables.endswith(b"\xff\xd9") else b"\xff\xd8"
    )
    kind, offsets, counts = _tiff_chunks(image)
    for index, (offset, count) in enumerate(zip(offsets, counts, strict=False)):
        chunk = data[offset : offset + count]
        if chunk[:2] == b"\xff\xd8":
            strict_jpeg_decode(prefix + chunk[2:], 0, 0, 8, what=f"tiff {kind} {index}")


_tiff_said = threading.local()


def _libtiff_messages() -> list[str]:
    """A fresh list that collects what libtiff says on this thread until the decode ends; it
    stays empty if the handler cannot be installed, and libtiff writes to stderr as before."""
    said: list[str] = []
    _tiff_said.messages = said if _libtiff_error_handler() is not None else None
    return said


_kept_alive: list[Any] = []
_TIFF_ERROR_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)


@functools.cache
def _libtiff_error_handler() -> Any:
    """Install libtiff's error handler for this process, once: during a TIFF decode its
    messages go to that decode's list, elsewhere to stderr in libtiff's own form."""
    libtiff = _loaded_library("libtiff", "TIFFSetErrorHandler")  # linked into PIL._imaging
    if libtiff is None:
        return None
    libc = ctypes.CDLL(None)
    libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

    def on_error(module: bytes | None, fmt: bytes, args: int) -> None:
        text = ctypes.create_string_buffer(512)
        libc.vsnprintf(text, len(text), fmt, args)
        line = text.value.decode("utf-8", "replace")
        if module:
            line = f"{module.decode('utf-8', 'replace')}: {line}"
        said = getattr(_tiff_said, "messages", None)
        if said is None:
            os.write(2, f"{line}.\n".encode())
        elif len(said) < _TIFF_MESSAGES_KEPT:
            said.append(f"{line}.")

    handler = _TIFF_ERROR_HANDLER(on_error)
    _kept_alive.append(handler)  # libtiff calls it for as long as the process runs
    libtiff.TIFFSetErrorHandler.argtypes = [_TIFF_ERROR_HANDLER]
    libtiff.TIFFSetErrorHandler.restype = ctypes.c_void_p
    libtiff.TIFFSetErrorHandler(handler)
    return handler


def cut_short(data: bytes, kind: str) -> str | None:
    """How a file of ``kind`` shows that it ends early, if it does; None when it looks whole.

    Only consulted once a decode has failed, to tell a cut-short file from a corrupt one.
    Pillow names a cut JPEG or GIF itself ("image file is truncated"); a WebP says so in its
    RIFF size and a PNG in its chunk lengths.
    """
    if kind == "webp" and data[:4] == b"RIFF" and len(data) >= 8:
        declared = int.from_bytes(data[4:8], "little") + 8
        if len(data) < declared:
            return f"its RIFF header declares {declared:,} bytes but the file has {len(data):,}"
        if _webp_waits_for_more(data):
            return "its bitstream ends before its pixels do"
    elif kind == "png":
        return _png_cut_short(data)
    return None


# libwebp's VP8StatusCode: the incremental decoder, given every byte, wants more.
_VP8_STATUS_SUSPENDED = 5


def _webp_waits_for_more(data: bytes) -> bool:
    """Whether libwebp's incremental decoder, fed the whole file with its bitstream chunk
    declared longer than it is, waits for more data: the VP8 or VP8L bitstream ran out before
    the pixels did (a file cut inside chunks whose sizes were made to agree), where a corrupt
    one is an error. Neither Pillow nor OpenCV says why a WebP decode failed."""
    libwebp = _libwebp()
    position = 12
    while libwebp is not None and position + 8 <= len(data):
        kind, size = (
            data[position : position + 4],
            int.from_bytes(data[position + 4 : position + 8], "little"),
        )
        if kind in (b"VP8 ", b"VP8L"):
            room = (size + (1 << 20)).to_bytes(4, "little")
            riff = (len(data) - 8 + (1 << 20)).to_bytes(4, "little")
            stretched = b"RIFF" + riff + data[8 : position + 4] + room + data[position + 8 :]
            decoder = libwebp.WebPINewRGB(0, None, 0, 0)  # MODE_RGB, buffer from libwebp
            if not decoder:
                return False
            try:
                status = libwebp.WebPIAppend(decoder, stretched, len(stretched))
            finally:
                libwebp.WebPIDelete(decoder)
            return status == _VP8_STATUS_SUSPENDED
        position += 8 + size + (size & 1)
    return False


@functools.cache
def _libwebp() -> ctypes.CDLL | None:
    """The libwebp Pillow's WebP module loaded (the wheel's own copy, or the system's)."""
    from PIL import _webp  # noqa: F401  (loads libwebp into this process)

    libwebp = _loaded_library("libwebp", "WebPIAppend")
    if libwebp is not None:
        libwebp.WebPINewRGB.restype = ctypes.c_void_p
        libwebp.WebPINewRGB.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
        ]
        libwebp.WebPIAppend.restype = ctypes.c_int
        libwebp.WebPIAppend.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        libwebp.WebPIDelete.argtypes = [ctypes.c_void_p]
    return libwebp


def _png_cut_short(data: bytes) -> str | None:
    """Walk the PNG chunks: cut short if one runs past the end or the file stops before IEND."""
    position = 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if not kind.isalpha():
            return None  # garbage, not a cut: the file is corrupt
        if kind == b"IEND":
            return None
        if position + 12 + length > len(data):
            return f"its {kind.decode('ascii')} chunk runs past the end of the file"
        position += 12 + length
    return "it ends before the PNG end chunk, IEND"


def _loaded_library(name: str, symbol: str) -> ctypes.CDLL | None:
    """The copy of library ``name`` (``libwebp``, ``libtiff``) this process has loaded that
    exports ``symbol``: the one Pillow's modules use, whether the wheel's own or the system's."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if f"/{name}" in line}
    except OSError:
        return None
    for path in sorted(paths):
        file = path.rsplit("/", 1)[-1]
        if not (file.startswith(f"{name}-") or file.startswith(f"{name}.so")):
            continue
        library = ctypes.CDLL(path)
        if hasattr(library, symbol):
            return library
    return None
