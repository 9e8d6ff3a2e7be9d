"""The per-image step: bytes in; key, perceptual hashes and attributes out, or a clear rejection.

This runs once per image, billions of times, on whatever people throw at it, so it never raises
on bad input: an empty, truncated, corrupt, unsupported or oversized image comes back as a
``Fingerprint`` with ``status="rejected"``, its md5 and size, a ``reason`` code and a ``message``.

Fields of :class:`Fingerprint`:

========== ==================================================================================
md5        lower-case hex MD5 of the raw bytes: the image's key (``None`` only if unreadable)
size_bytes length of the raw bytes
status     ``"ok"`` or ``"rejected"``
reason     ``None`` when ok, else ``empty``, ``truncated``, ``corrupt``, ``unsupported``,
           ``too_large`` or ``unreadable`` (the bytes could not be read at all)
message    a sentence naming what was wrong, ``None`` when ok
format     canonical lower-case format: ``jpeg``, ``png``, ``webp``, ``gif``, ``bmp``, ``tiff``,
           ``pnm``, ``ico``, ``tga``, ``avif``, ``heif`` (HEIC and other HEIF files), ...
width      width as displayed, after EXIF orientation
height     height as displayed, after EXIF orientation
orientation the EXIF orientation tag (1..8); 1 when absent or invalid. HEIF stores its rotation
           and mirroring in the container (``irot``/``imir``), which the decoder applies, and
           pillow-heif resets the EXIF tag to 1 so that it is not applied twice: 1 for HEIF
frames     number of frames (1 for still images)
phash      64-bit perceptual hash, 16 lower-case hex digits (``None`` when rejected)
ahash      64-bit average hash, as above
dhash      64-bit difference hash, as above
quality    how much the pHash can tell this image apart from others, 0-100 (see
           :func:`information_score`; ``None`` when rejected): flat images (one colour, a
           gradient, a near-blank page) score low and their pHashes collide with each other
camera_make, camera_model, captured_at   EXIF Make, Model, DateTimeOriginal when present
========== ==================================================================================

The hashes are bit-compatible with ImageHash 4.3's ``phash``, ``average_hash`` and ``dhash``
(hash_size 8) computed on the image as displayed: EXIF orientation applied, first frame.
``mode="exact"`` reproduces ImageHash bit for bit; ``mode="fast"`` (the default) hashes a
reduced-size decode (JPEG DCT scaling, integer box reduction for other formats), which is several
times cheaper on photos and agrees within a couple of bits.

HEIF/HEIC (what phones save) is decoded by pillow-heif (libheif), registered with Pillow when
this module is imported, so every process that fingerprints (worker processes included) can
open it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import os
import re
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import pillow_heif
import scipy.fftpack
import simplejpeg
from PIL import Image, UnidentifiedImageError
from PIL.TiffImagePlugin import TiffImageFile

Mode = Literal["fast", "exact"]

#: Pillow's own decompression-bomb threshold (~179 megapixels); headers above it are rejected.
DEFAULT_MAX_PIXELS = 178_956_970

#: Smallest side a reduced decode keeps, in pixels. The pHash resize reads a 32x32 grid, so
#: a few times that keeps the Lanczos filter close to what it sees at full size.
FAST_MIN_SIDE = 128
#: The same for the integer box reduction of other formats, which aliases more than DCT scaling.
REDUCE_MIN_SIDE = 512

_HASH_SIZE = 8
_PHASH_SIZE = _HASH_SIZE * 4

# EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_EXIF_ORIENTATION = 0x0112
_EXIF_MAKE = 0x010F
_EXIF_MODEL = 0x0110
_EXIF_IFD = 0x8769
_EXIF_DATETIME_ORIGINAL = 0x9003

# Pillow format names mapped to the project's canonical lower-case names.
_CANONICAL_FORMAT = {
    "JPEG": "jpeg",
    "MPO": "jpeg",  # multi-picture JPEG (phones): the first picture is a plain JPEG
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "DIB": "bmp",
    "TIFF": "tiff",
    "PPM": "pnm",
    "ICO": "ico",
    "TGA": "tga",
    "AVIF": "avif",
    "HEIF": "heif",
    "JPEG2000": "jpeg2000",
}

# Signatures of image formats, so that a file Pillow cannot open is told apart as a corrupt
# image of a known kind or as something that is not a supported image at all.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"GIF87a", 0, "gif"),
    (b"GIF89a", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
    (b"WEBP", 8, "webp"),
)
# ISO-BMFF brands of HEIF files ("ftyp" box), told apart when pillow-heif cannot open one.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"}

# JPEG frame types (SOFn markers) libjpeg-turbo decodes at a reduced scale: baseline, extended and
# progressive DCT, Huffman or arithmetic coded. Lossless and hierarchical ones are left to Pillow:
# simplejpeg aborts the process when asked to scale a lossless JPEG.
_SCALABLE_JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})
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

# Worker processes are one per core: OpenCV's own thread pool would oversubscribe them.
cv2.setNumThreads(1)
# The pixel limit is enforced here, on the header, before any decode, and it is configurable
# (``max_pixels``), so Pillow's own fixed limit is lifted. Pillow's chatter about odd files is
# not the caller's concern either: the rejection says what was wrong.
Image.MAX_IMAGE_PIXELS = None
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
# HEIF through libheif, one decode thread per worker process like OpenCV above; embedded
# thumbnails are not read (a reduced decode would hash the thumbnail, not the picture).
pillow_heif.register_heif_opener(decode_threads=1, thumbnails=False)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Key, fingerprints and header attributes of one image, or why it was rejected."""

    md5: str | None
    size_bytes: int | None
    status: str
    reason: str | None = None
    message: str | None = None
    format: str | None = None
    width: int | None = None
    height: int | None = None
    orientation: int = 1
    frames: int | None = None
    phash: str | None = None
    ahash: str | None = None
    dhash: str | None = None
    quality: int | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    captured_at: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Rejected(Exception):
    """Internal signal: the image is bad for a stated reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def fingerprint(
    data: bytes, *, mode: Mode = "fast", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Fingerprint:
    """Fingerprint one image's bytes; never raises on bad image data."""
    return fingerprint_and_grey(data, mode=mode, max_pixels=max_pixels)[0]


def fingerprint_and_grey(
    data: bytes, *, mode: Mode = "fast", max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Fingerprint, Image.Image | None]:
    """:func:`fingerprint`, plus the greyscale image its hashes were computed from (as
    displayed; ``None`` when rejected), for what a query derives from the same decode."""
    md5 = hashlib.md5(data).hexdigest()
    size = len(data)
    header: dict[str, Any] = {}
    try:
        if size == 0:
            raise Rejected("empty", "the file is empty (0 bytes)")
        grey = _displayed_grey(data, mode, max_pixels, header)
        hashes = hashes_of_grey(grey)
    except Rejected as rejected:
        return Fingerprint(md5, size, "rejected", rejected.reason, str(rejected), **header), None
    except MemoryError:
        message = "ran out of memory decoding it"
        return Fingerprint(md5, size, "rejected", "too_large", message, **header), None
    except Exception as error:  # hostile input reaches code paths nobody planned for
        return _undecodable(data, md5, size, header, error), None
    return Fingerprint(md5, size, "ok", **header, **hashes), grey


def _undecodable(
    data: bytes, md5: str, size: int, header: dict[str, Any], error: Exception
) -> Fingerprint:
    """The rejection of an image whose decode raised: truncated when it shows it, else corrupt."""
    kind = header.get("format") or _sniff(data) or "image"
    message = f"{kind} cannot be decoded: {_describe(error)}"
    if "truncated" in message.lower():
        return Fingerprint(md5, size, "rejected", "truncated", message, **header)
    cut = _cut_short(data, kind)
    if cut:
        return Fingerprint(md5, size, "rejected", "truncated", f"{message}; {cut}", **header)
    return Fingerprint(md5, size, "rejected", "corrupt", message, **header)


def rejected_unreadable(message: str) -> Fingerprint:
    """A Fingerprint for a source whose bytes could not be read at all."""
    return Fingerprint(None, None, "rejected", "unreadable", message)


def _displayed_grey(
    data: bytes, mode: Mode, max_pixels: int, header: dict[str, Any]
) -> Image.Image:
    """Fill ``header`` as facts are learnt (so rejections keep them) and return the greyscale
    image as displayed, the one the hashes are computed from."""
    image = _open(data)
    _fail_loads_after_an_error(image)
    header["format"] = _CANONICAL_FORMAT.get(image.format or "", (image.format or "").lower())
    width, height = image.size
    if width * height > max_pixels:
        raise Rejected(
            "too_large",
            f"header declares {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,}",
        )
    exif = _read_exif(image)
    orientation = exif.get("orientation", 1)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    header.update(
        width=width,
        height=height,
        orientation=orientation,
        camera_make=exif.get("make"),
        camera_model=exif.get("model"),
        captured_at=exif.get("captured_at"),
    )
    header["frames"] = int(getattr(image, "n_frames", 1) or 1)
    if header["frames"] > 1 and header["format"] != "heif":
        image.seek(0)  # a HEIF file opens on its primary image, which need not be the first
    grey = None
    if mode == "fast" and header["format"] == "webp" and header["frames"] == 1:
        grey = _decode_grey_with_opencv(data)
    if grey is None:
        image = _decode(data, image, reduce=mode == "fast" and header["format"] == "jpeg")
        grey = image.getchannel("L") if image.mode == "LAB" else image.convert("L")
    if orientation != 1:
        grey = grey.transpose(_ORIENTATION_TRANSPOSE[orientation])
    if mode == "fast":
        factor = min(grey.size) // REDUCE_MIN_SIDE
        if factor >= 2:
            grey = grey.reduce(factor)
    return grey


def _fail_loads_after_an_error(image: Image.Image) -> None:
    """Make a decode that failed once fail every time it is asked for again.

    Pillow keeps the partially decoded pixels when ``load()`` raises, and a second ``load()``
    returns them without a word; Pillow's own callers may swallow the first error (``getexif``
    loads a PNG to look for its eXIf chunk, and broken EXIF must not reject an image). The
    instance attribute shadows the method for Pillow's internal ``self.load()`` calls too, so
    hashes are never computed from pixels whose decode raised anywhere. The override holds
    the class's method and a weak reference: holding the bound method would make a reference
    cycle, keeping the decoded pixels until a full garbage collection.
    """
    load = type(image).load
    this = weakref.ref(image)
    failures: list[Exception] = []

    def load_or_raise_again() -> Any:
        if failures:
            raise failures[0]
        try:
            target = this()
            if target is None:  # freed: nothing is left to load
                raise ReferenceError("the image was freed before its pixels were loaded")
            return load(target)
        except Exception as error:
            failures.append(error)
            raise

    image.load = load_or_raise_again  # type: ignore[method-assign]


def _decode_grey_with_opencv(data: bytes) -> Image.Image | None:
    """libwebp through OpenCV decodes WebP about twice as fast as Pillow (measured on the
    corpus: 0.81 s against 1.59 s of CPU for its 48 WebP files); None if it cannot, and then
    Pillow decodes it and names the problem."""
    pixels = cv2.imdecode(
        np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION
    )
    return None if pixels is None else Image.fromarray(pixels)


def _decode(data: bytes, image: Image.Image, *, reduce: bool) -> Image.Image:
    """Decode pixels, every JPEG checked for a premature end of its compressed data."""
    if image.format == "TIFF" and isinstance(image, TiffImageFile):
        _decode_tiff(data, image)
        return image
    if image.format not in ("JPEG", "MPO"):
        image.load()
        return image
    stored_w, stored_h = image.size
    scale = _draft_scale(stored_w, stored_h) if reduce else 1
    scalable = _jpeg_frame_type(data) in _SCALABLE_JPEG_FRAMES
    if scalable and scale >= 2 and image.mode in ("L", "RGB"):
        # The same libjpeg-turbo decode Pillow's draft("L") makes (the Y channel at 1/scale),
        # except that it stops on a premature end.
        pixels = _strict_jpeg_decode(data, stored_w, stored_h, scale)
        if pixels is not None:
            return Image.fromarray(pixels.reshape(pixels.shape[:2]))
    elif scalable:
        _strict_jpeg_decode(data, stored_w, stored_h, 8)  # a check only: the smallest decode
    if scale < 2:
        image.load()
        return image
    image.draft("L", (stored_w // scale, stored_h // scale))
    try:
        image.load()
    except Exception:
        # Some JPEG processes (lossless, arithmetic) refuse a scaled decode: decode in full.
        image = Image.open(io.BytesIO(data))
        image.load()
    return image


def _draft_scale(width: int, height: int) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow's ``draft`` picks for the reduced decode: the largest
    that keeps the shorter side at ``FAST_MIN_SIDE`` or more."""
    wanted = min(width, height) // FAST_MIN_SIDE
    if wanted < 2:
        return 1
    fits = min(width // (width // wanted), height // (height // wanted))
    return next(scale for scale in (8, 4, 2, 1) if fits >= scale)


def _jpeg_frame_type(data: bytes) -> int | None:
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


def _strict_jpeg_decode(
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
                f"{what} cannot be decoded: {_describe(error)}; its compressed data ends before "
                "its pixels do",
            ) from None
        return None


def _decode_tiff(data: bytes, image: TiffImageFile) -> None:
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
        message = f"tiff cannot be decoded: {_describe(error)}"
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
            _strict_jpeg_decode(prefix + chunk[2:], 0, 0, 8, what=f"tiff {kind} {index}")


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


def hashes_of_grey(grey: Image.Image) -> dict[str, Any]:
    """The three ImageHash-compatible hashes of a greyscale image, and its quality score."""
    lanczos = Image.Resampling.LANCZOS
    small = phash_pixels(grey)
    phash = phash_of_block(phash_block(small))
    avg = np.asarray(grey.resize((_HASH_SIZE, _HASH_SIZE), lanczos))
    ahash = avg > avg.mean()
    return {
        "phash": phash,
        "ahash": bits_to_hex(ahash),
        "dhash": dhash_of_grid(dhash_grid(grey)),
        "quality": information_score(small),
    }


def dhash_grid(grey: Image.Image) -> np.ndarray:
    """The 9x8 greyscale grid (uint8, 8 rows of 9) that dHash compares, as ImageHash resizes."""
    return np.asarray(grey.resize((_HASH_SIZE + 1, _HASH_SIZE), Image.Resampling.LANCZOS))


def dhash_of_grid(grid: np.ndarray) -> str:
    """ImageHash's dHash: a bit per pair of horizontal neighbours, set when the right one is
    brighter."""
    diff = grid.astype(np.int16)
    return bits_to_hex(diff[:, 1:] > diff[:, :-1])


def phash_pixels(grey: Image.Image) -> np.ndarray:
    """The 32x32 greyscale grid (uint8) that pHash transforms, as ImageHash resizes it."""
    return np.asarray(grey.resize((_PHASH_SIZE, _PHASH_SIZE), Image.Resampling.LANCZOS))


def phash_block(pixels: np.ndarray) -> np.ndarray:
    """The 8x8 low-frequency block of the 32x32 grid's DCT (rows: vertical frequency)."""
    # The same DCT routine as ImageHash: flat and symmetric images put coefficients at the
    # median, and only the same floating-point path breaks those ties the same way.
    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)
    return dct[:_HASH_SIZE, :_HASH_SIZE]


def phash_of_block(block: np.ndarray) -> str:
    """pHash from a DCT block: a bit per coefficient, set when it is above the block's median."""
    return bits_to_hex(block > np.median(block))


def information_score(pixels: np.ndarray) -> int:
    """How much detail the 32x32 pHash grid holds, 0-100: the curvature of its grey levels.

    pHash compares DCT coefficients with their median; a flat image (one colour, a gradient, a
    near-blank page) has almost no energy beyond a ramp, so most of its bits come from rounding
    and its hash collides with every other flat image's. A gradient is steep but straight, so
    the sum of the steps between neighbours (PDQ's quality metric) passes a full-range ramp and
    hides a smooth photograph; the Laplacian (each pixel against its four neighbours) is zero
    on any ramp and on one colour, and a photograph keeps some of it blurred, dark, hazy or at
    a quarter of its contrast. The score is its mean in grey levels times 16, so the default
    cut of 40 falls at 2.5 levels: on ``asset_library_tests/data/photos.txt`` and its derived
    versions the lowest photograph is at 2.9 and the highest flat image (a noisy near-blank
    page at 255 px) at 2.2. Computed from the grid pHash already made.
    """
    grid = pixels.astype(np.int32)
    curvature = 4 * grid[1:-1, 1:-1] - grid[:-2, 1:-1] - grid[2:, 1:-1]
    curvature -= grid[1:-1, :-2] + grid[1:-1, 2:]
    return min(100, int(np.abs(curvature).sum()) // 56)


def bits_to_hex(bits: np.ndarray) -> str:
    """ImageHash's hex convention: row-major bits, the first bit most significant."""
    value = 0
    for bit in bits.flatten():
        value = (value << 1) | int(bit)
    return f"{value:0{(bits.size + 3) // 4}x}"


def hamming(a: str | int, b: str | int) -> int:
    """Bits that differ between two hashes given as hex strings or integers."""
    x = (int(a, 16) if isinstance(a, str) else a) ^ (int(b, 16) if isinstance(b, str) else b)
    return x.bit_count()


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise Rejected("too_large", f"header declares too many pixels: {error}") from None
    except UnidentifiedImageError:
        kind = _sniff(data)
        if kind:
            cut = _cut_short(data, kind)
            if cut:
                raise Rejected("truncated", f"{kind} header is unreadable: {cut}") from None
            raise Rejected("corrupt", f"{kind} signature but the header is unreadable") from None
        raise Rejected("unsupported", "not a recognised image format") from None


def _sniff(data: bytes) -> str | None:
    for magic, offset, kind in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return kind
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "heif"
    return None


def _cut_short(data: bytes, kind: str) -> str | None:
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


def _read_exif(image: Image.Image) -> dict[str, Any]:
    """Orientation and camera facts; broken EXIF is common and must not reject the image."""
    try:
        exif = image.getexif()
    except Exception:
        return {}
    found: dict[str, Any] = {}
    orientation = exif.get(_EXIF_ORIENTATION)
    if isinstance(orientation, int) and 1 <= orientation <= 8:
        found["orientation"] = orientation
    for tag, name in ((_EXIF_MAKE, "make"), (_EXIF_MODEL, "model")):
        text = _clean_text(exif.get(tag))
        if text:
            found[name] = text
    try:
        captured = _clean_text(exif.get_ifd(_EXIF_IFD).get(_EXIF_DATETIME_ORIGINAL))
    except Exception:
        captured = None
    if captured:
        found["captured_at"] = captured
    return found


def _clean_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value[:200] or None


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text[:300]
