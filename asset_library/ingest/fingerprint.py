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

A decode that stops short is found by the checks in :mod:`asset_library.ingest.truncation`,
called around the decode here: a partial decode is rejected as truncated, never hashed.
"""

from __future__ import annotations

import hashlib
import io
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import pillow_heif
import scipy.fftpack
from PIL import Image, UnidentifiedImageError
from PIL.TiffImagePlugin import TiffImageFile

from asset_library.ingest.truncation import (
    SCALABLE_JPEG_FRAMES,
    Rejected,
    cut_short,
    decode_tiff,
    describe,
    jpeg_frame_type,
    strict_jpeg_decode,
)

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
    message = f"{kind} cannot be decoded: {describe(error)}"
    if "truncated" in message.lower():
        return Fingerprint(md5, size, "rejected", "truncated", message, **header)
    cut = cut_short(data, kind)
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
        decode_tiff(data, image)
        return image
    if image.format not in ("JPEG", "MPO"):
        image.load()
        return image
    stored_w, stored_h = image.size
    scale = _draft_scale(stored_w, stored_h) if reduce else 1
    scalable = jpeg_frame_type(data) in SCALABLE_JPEG_FRAMES
    if scalable and scale >= 2 and image.mode in ("L", "RGB"):
        # The same libjpeg-turbo decode Pillow's draft("L") makes (the Y channel at 1/scale),
        # except that it stops on a premature end.
        pixels = strict_jpeg_decode(data, stored_w, stored_h, scale)
        if pixels is not None:
            return Image.fromarray(pixels.reshape(pixels.shape[:2]))
    elif scalable:
        strict_jpeg_decode(data, stored_w, stored_h, 8)  # a check only: the smallest decode
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
            cut = cut_short(data, kind)
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
