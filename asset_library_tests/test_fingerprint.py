"""The fingerprint core against the real corpus: keys, attributes, rejections and hashes."""

from __future__ import annotations

import csv
import hashlib
import io
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import imagehash
import pytest
from PIL import Image, ImageOps, TiffImagePlugin

from asset_library.ingest.fingerprint import DEFAULT_MAX_PIXELS, Fingerprint, fingerprint, hamming
from asset_library.ingest.pool import fingerprint_many
from asset_library.search.thresholds import DEFAULT_PHASH_THRESHOLD

HASHES = ("phash", "ahash", "dhash")
NEAR_LABELS = {"exact", "reencode", "resize", "exif-orientation"}


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.fixture(scope="session")
def manifest(corpus_dir: Path) -> dict[str, dict[str, str]]:
    return {row["path"]: row for row in _read_tsv(corpus_dir / "MANIFEST.tsv")}


@pytest.fixture(scope="session")
def details(corpus_dir: Path) -> dict[str, dict[str, str]]:
    return {row["path"]: row for row in _read_tsv(corpus_dir / "DETAILS.tsv")}


@pytest.fixture(scope="session")
def fast(corpus_dir: Path, manifest) -> dict[str, Fingerprint]:
    paths = list(manifest)
    results = fingerprint_many([corpus_dir / p for p in paths], workers=2)
    return dict(zip(paths, results, strict=True))


@pytest.fixture(scope="session")
def exact(corpus_dir: Path, manifest) -> dict[str, Fingerprint]:
    paths = list(manifest)
    results = fingerprint_many([corpus_dir / p for p in paths], workers=2, mode="exact")
    return dict(zip(paths, results, strict=True))


def _imagehash_reference(path: Path) -> dict[str, str] | None:
    """ImageHash on the image as displayed: first frame, EXIF orientation applied."""
    try:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(path.read_bytes())))
        return {
            "phash": str(imagehash.phash(image)),
            "ahash": str(imagehash.average_hash(image)),
            "dhash": str(imagehash.dhash(image)),
        }
    except Exception:
        return None


@pytest.fixture(scope="session")
def reference(corpus_dir: Path, exact) -> dict[str, dict[str, str]]:
    decodable = [p for p, fp in exact.items() if fp.ok]
    with ProcessPoolExecutor(2) as pool:
        refs = pool.map(_imagehash_reference, [corpus_dir / p for p in decodable], chunksize=4)
        return {p: ref for p, ref in zip(decodable, refs, strict=True) if ref is not None}


def test_md5_and_size_match_the_manifest_for_every_file(manifest, fast):
    for path, row in manifest.items():
        assert fast[path].md5 == row["md5"], path
        assert fast[path].size_bytes == int(row["bytes"]), path


def test_format_and_dimensions_match_for_every_decodable_file(manifest, fast):
    checked = 0
    for path, fp in fast.items():
        if not fp.ok:
            continue
        row = manifest[path]
        assert fp.format == row["format"].lower(), path
        stored = (fp.height, fp.width) if fp.orientation in (5, 6, 7, 8) else (fp.width, fp.height)
        assert stored == (int(row["width"]), int(row["height"])), path
        checked += 1
    assert checked > 300


def test_every_file_pillow_cannot_decode_is_rejected_with_a_reason(details, fast, exact):
    undecodable = [p for p, row in details.items() if row["decode"] != "ok"]
    assert len(undecodable) >= 10
    for path in undecodable:
        for fp in (fast[path], exact[path]):
            assert fp.status == "rejected", path
            assert fp.reason in {"truncated", "corrupt", "unsupported", "too_large"}, path
            assert fp.message and fp.phash is None, path
    reasons = Counter(fast[p].reason for p in undecodable)
    print(f"\nrejections of Pillow-undecodable files: {dict(reasons)}")
    assert reasons["truncated"] >= 3 and reasons["corrupt"] >= 3


#: Rejected although DETAILS.tsv says Pillow decodes them: a header over the pixel limit, and a
#: PNG whose last chunk is cut short (Pillow 13's load() raises on it).
REJECTED_DECODABLE = {
    "github_lovell_sharp/giant-image.jpg",
    "github_python-pillow_Pillow/truncated_end_chunk.png",
}


def test_both_modes_reject_exactly_the_undecodable_files(details, fast, exact):
    undecodable = {p for p, row in details.items() if row["decode"] != "ok"}
    for results in (fast, exact):
        rejected = {path for path, fp in results.items() if not fp.ok}
        assert rejected == undecodable | REJECTED_DECODABLE
    assert sum(fp.ok for fp in fast.values()) == len(fast) - len(undecodable) - 2 == 336


def test_rejections_keep_the_md5_and_name_what_was_wrong(fast, manifest):
    giant = fast["github_lovell_sharp/giant-image.jpg"]
    assert giant.reason == "too_large" and "20000x14000" in giant.message
    bomb = fast["github_python-pillow_Pillow/decompression_bomb.gif"]
    assert bomb.reason == "too_large"
    for path, fp in fast.items():
        if not fp.ok:
            assert fp.md5 == manifest[path]["md5"] and fp.size_bytes == int(manifest[path]["bytes"])
    assert all(fp.ok == (fp.reason is None) for fp in fast.values())


def test_exact_mode_equals_imagehash_bit_for_bit(exact, reference):
    assert len(reference) > 300
    mismatches = [
        (path, name, getattr(exact[path], name), ref[name])
        for path, ref in reference.items()
        for name in HASHES
        if getattr(exact[path], name) != ref[name]
    ]
    assert mismatches == []


def test_fast_mode_stays_close_to_imagehash(fast, reference):
    print()
    for name in HASHES:
        distances = [
            hamming(getattr(fast[path], name), ref[name]) for path, ref in reference.items()
        ]
        n = len(distances)
        exact_rate = sum(d == 0 for d in distances) / n
        within_2 = sum(d <= 2 for d in distances) / n
        worst = max(distances)
        print(f"fast {name}: exact {exact_rate:.1%}, within 2 bits {within_2:.1%}, max {worst}")
        assert within_2 >= 0.97, name
        assert max(distances) <= 8, name


def test_near_duplicates_are_within_the_recommended_threshold(corpus_dir, fast):
    pairs = [r for r in _read_tsv(corpus_dir / "near_dups.tsv") if r["relation"] in NEAR_LABELS]
    distances: dict[str, list[int]] = {}
    for row in pairs:
        a, b = fast[row["path_a"]], fast[row["path_b"]]
        assert a.ok and b.ok, row
        distances.setdefault(row["relation"], []).append(hamming(a.phash, b.phash))
    print()
    for relation, found in sorted(distances.items()):
        histogram = dict(sorted(Counter(found).items()))
        print(f"{relation}: {len(found)} pairs, pHash distances {histogram}")
    assert all(d <= DEFAULT_PHASH_THRESHOLD for found in distances.values() for d in found)
    assert all(d == 0 for d in distances["exact"])


def test_exif_orientation_is_applied_before_hashing(corpus_dir, fast):
    family = sorted((corpus_dir / "github_recurser_exif-orientation-examples").glob("*.jpg"))
    oriented = [fast[str(p.relative_to(corpus_dir))] for p in family]
    assert {fp.orientation for fp in oriented} >= {1, 6, 8}
    assert {(fp.width, fp.height) for fp in oriented if fp.orientation != 1} <= {
        (fp.width, fp.height) for fp in oriented if fp.orientation == 1
    }
    anchor = oriented[0]
    assert all(hamming(anchor.phash, fp.phash) <= 4 for fp in oriented)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"hello, this is not an image at all" * 10, "unsupported"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "corrupt"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00" + b"\x00" * 64, "corrupt"),
    ],
)
def test_hostile_bytes_are_rejected_not_raised(data: bytes, reason: str):
    fp = fingerprint(data)
    assert fp.status == "rejected" and fp.reason == reason
    assert fp.size_bytes == len(data) and len(fp.md5) == 32


def test_a_cut_short_photo_is_rejected_as_truncated(corpus_dir):
    data = (corpus_dir / "github_recurser_exif-orientation-examples/Landscape_1.jpg").read_bytes()
    for mode in ("fast", "exact"):
        fp = fingerprint(data[: len(data) // 2], mode=mode)
        assert (fp.status, fp.reason, fp.format) == ("rejected", "truncated", "jpeg")


def test_the_pixel_limit_is_configurable(corpus_dir):
    data = (corpus_dir / "github_recurser_exif-orientation-examples/Landscape_1.jpg").read_bytes()
    assert fingerprint(data).ok
    small = fingerprint(data, max_pixels=1000)
    assert small.reason == "too_large" and "1,000" in small.message
    assert DEFAULT_MAX_PIXELS == 178_956_970  # Pillow's own default


def test_fingerprint_many_keeps_input_order_and_reports_unreadable_paths(corpus_dir, tmp_path):
    files = sorted(corpus_dir.glob("github_jenssegers_imagehash/*/*"))[:5]
    missing = tmp_path / "gone.jpg"
    items: list = [files[0], missing, files[1].read_bytes(), *files[2:]]
    for workers in (0, 2):
        results = list(fingerprint_many(items, workers=workers, chunksize=2))
        assert [r.md5 for r in results] == [
            fingerprint(f.read_bytes()).md5 if f != missing else None
            for f in [files[0], missing, files[1], *files[2:]]
        ]
        assert results[1].reason == "unreadable" and str(missing) in results[1].message


def _png_with_broken_idat(data: bytes, *, fix_crc: bool) -> bytes:
    """The PNG with 16 bytes flipped inside its first IDAT zlib stream, the chunk CRC optionally
    recomputed so that only the pixel data is wrong."""
    position = 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        if data[position + 4 : position + 8] == b"IDAT":
            broken = bytearray(data)
            middle = position + 8 + length // 2
            for index in range(middle, min(middle + 16, position + 8 + length)):
                broken[index] ^= 0xFF
            if fix_crc:
                crc = zlib.crc32(bytes(broken[position + 4 : position + 8 + length]))
                broken[position + 8 + length : position + 12 + length] = crc.to_bytes(4, "big")
            return bytes(broken)
        position += 12 + length
    raise AssertionError("no IDAT chunk")


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("fix_crc", [True, False], ids=["crc-valid", "crc-broken"])
@pytest.mark.parametrize(
    "name",
    [
        "github_python-pillow_Pillow/hopper.png",
        "debian_desktop-base/homeworld-theme/grub/grub-16x9.png",
    ],
)
def test_a_png_whose_zlib_stream_is_broken_is_rejected(corpus_dir, name, fix_crc, mode):
    # Pillow keeps a partial image when a decode fails, and reading EXIF loads a PNG: a second
    # load() used to hand the partial pixels to the hashes.
    good = (corpus_dir / name).read_bytes()
    assert fingerprint(good, mode=mode).ok
    broken = _png_with_broken_idat(good, fix_crc=fix_crc)
    fp = fingerprint(broken, mode=mode)
    assert (fp.status, fp.reason, fp.format) == ("rejected", "corrupt", "png")
    assert fp.message.startswith("png cannot be decoded: ") and "data stream" in fp.message
    assert fp.phash is None and fp.ahash is None and fp.dhash is None
    assert fp.md5 == hashlib.md5(broken).hexdigest() and fp.size_bytes == len(broken)


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize(
    ("name", "kept", "says"),
    [
        ("github_python-pillow_Pillow/hopper.webp", 0.9, "RIFF header declares 3,282 bytes"),
        ("github_webmproject_libwebp-test-data/lossless1.webp", 0.5, "RIFF header declares"),
        ("debian_gnome-backgrounds/gnome/wood-d.webp", 0.95, "RIFF header declares"),
        ("github_python-pillow_Pillow/hopper.jpg", 0.9, "ends before its pixels do"),
        ("github_python-pillow_Pillow/hopper.png", 0.6, "image file is truncated"),
        ("github_python-pillow_Pillow/hopper.gif", 0.6, "image file is truncated"),
    ],
)
def test_a_file_cut_short_is_rejected_as_truncated(corpus_dir, name, kept, says, mode):
    data = (corpus_dir / name).read_bytes()
    fp = fingerprint(data[: int(len(data) * kept)], mode=mode)
    assert (fp.status, fp.reason) == ("rejected", "truncated"), fp.message
    kind = {".jpg": "jpeg"}.get(Path(name).suffix, Path(name).suffix[1:])
    assert fp.message.startswith(f"{kind} cannot be decoded: ")
    assert says in fp.message and fp.phash is None


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_a_png_cut_short_after_its_pixels_is_still_rejected(corpus_dir, mode):
    # Its pixels decode, then the chunk after them ends early and Pillow's load() raises.
    data = (corpus_dir / "github_python-pillow_Pillow/truncated_end_chunk.png").read_bytes()
    fp = fingerprint(data, mode=mode)
    assert (fp.status, fp.reason, fp.phash) == ("rejected", "truncated", None)
    assert fp.message == "png cannot be decoded: Truncated File Read"


def test_a_png_with_a_garbage_header_is_corrupt_not_truncated(corpus_dir):
    fp = fingerprint((corpus_dir / "github_python-pillow_Pillow/broken.png").read_bytes())
    assert (fp.reason, fp.message) == ("corrupt", "png signature but the header is unreadable")


HEIF_FILES = (
    "github_ianare_exif-samples/heic/IMG_5195.HEIC",
    "github_ianare_exif-samples/heic/samplefilehub.heif",
)


@pytest.mark.parametrize("name", HEIF_FILES)
def test_heif_files_are_fingerprinted_like_imagehash_on_pillow_heif(name, fast, exact, details):
    # DETAILS.tsv's reference hashes were computed on the decoded HEIF (no rotation in either).
    for fp in (fast[name], exact[name]):
        assert (fp.status, fp.format, fp.frames, fp.orientation) == ("ok", "heif", 1, 1)
        assert fp.quality is not None and fp.quality >= 50
    assert exact[name].phash == details[name]["phash"]
    assert exact[name].dhash == details[name]["dhash"]
    assert hamming(fast[name].phash, exact[name].phash) <= 2
    assert exact["github_ianare_exif-samples/heic/IMG_5195.HEIC"].camera_make == "Apple"


def test_the_avif_file_still_decodes(manifest, fast, exact):
    (name,) = [path for path, row in manifest.items() if row["format"] == "AVIF"]
    for fp in (fast[name], exact[name]):
        assert (fp.status, fp.format) == ("ok", "avif")
        assert (fp.width, fp.height) == (
            int(manifest[name]["width"]),
            int(manifest[name]["height"]),
        )


@pytest.mark.parametrize("orientation", [3, 6, 8, 5])
def test_a_rotated_heif_is_hashed_as_displayed_once(corpus_dir, orientation):
    # Written with an EXIF orientation, pillow-heif stores the turn as the container's irot/imir
    # and the decoder applies it; the EXIF tag then reads 1, so it is not applied a second time.
    source = Image.open(corpus_dir / "github_recurser_exif-orientation-examples/Landscape_1.jpg")
    stored = source.convert("RGB").resize((300, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="HEIF", exif=exif.tobytes(), quality=95)
    displayed = ImageOps.exif_transpose(_with_orientation(stored, orientation))
    fp = fingerprint(buffer.getvalue(), mode="exact")
    assert (fp.status, fp.format, fp.orientation) == ("ok", "heif", 1)
    assert (
        (fp.width, fp.height) == displayed.size == ((300, 200) if orientation == 3 else (200, 300))
    )
    assert hamming(fp.phash, str(imagehash.phash(displayed))) <= 4
    twice = ImageOps.exif_transpose(_with_orientation(displayed, orientation))
    assert hamming(fp.phash, str(imagehash.phash(twice))) > 8


def _with_orientation(image: Image.Image, orientation: int) -> Image.Image:
    """A copy of ``image`` carrying an EXIF orientation tag, for ImageOps.exif_transpose."""
    tagged = image.copy()
    tagged.getexif()[0x0112] = orientation
    return tagged


def test_a_corrupt_heif_is_rejected_naming_the_format(corpus_dir):
    data = (corpus_dir / HEIF_FILES[1]).read_bytes()
    fp = fingerprint(data[:200])
    assert (fp.status, fp.reason) in {("rejected", "corrupt"), ("rejected", "truncated")}
    assert fp.message.startswith("heif ")


# --- files cut mid-stream that still end the way their format ends -----------------------------


@pytest.fixture(scope="module")
def photo(corpus_dir: Path) -> Image.Image:
    """A real photo, small enough to encode quickly in every format."""
    path = corpus_dir / "github_recurser_exif-orientation-examples/Landscape_1.jpg"
    return Image.open(path).convert("RGB").resize((480, 320))


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _jpeg_scan_starts(data: bytes) -> list[int]:
    """Offsets of the JPEG's start-of-scan markers (FFDA)."""
    return [i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("size", [(480, 320), (200, 150)], ids=["reduced", "small"])
@pytest.mark.parametrize(
    "options",
    [{}, {"progressive": True}, {"restart_marker_blocks": 4}],
    ids=["baseline", "progressive", "restart-markers"],
)
def test_a_jpeg_cut_mid_scan_is_truncated_whatever_follows(photo, options, size, mode):
    whole = _encoded(photo.resize(size), "JPEG", quality=90, **options)
    assert fingerprint(whole, mode=mode).ok
    scans = _jpeg_scan_starts(whole)
    for kept in (0.4, 0.7):
        cut = whole[: int(len(whole) * kept)]
        assert len(cut) not in scans
        # ended by an end-of-image marker, or by the scans that followed the one cut
        for tail in (b"\xff\xd9", whole[scans[-1] :] if len(scans) > 1 else b"\xff\xd9"):
            fp = fingerprint(cut + tail, mode=mode)
            assert (fp.status, fp.reason, fp.format) == ("rejected", "truncated", "jpeg"), fp
            assert fp.message.startswith("jpeg cannot be decoded: ")
            assert "ends before its pixels do" in fp.message and fp.phash is None


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_a_progressive_jpeg_cut_at_a_scan_boundary_is_a_whole_image(photo, mode):
    whole = _encoded(photo, "JPEG", quality=90, progressive=True)
    scans = _jpeg_scan_starts(whole)
    assert len(scans) >= 4
    for boundary in scans[1:3]:
        fp = fingerprint(whole[:boundary] + b"\xff\xd9", mode=mode)
        assert fp.ok and (fp.width, fp.height) == photo.size, fp.message


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body).to_bytes(4, "big")
    return len(body).to_bytes(4, "big") + kind + body + crc


def _png_with_idat_cut(data: bytes, kept: float) -> bytes:
    """The PNG with its zlib stream cut, in one IDAT chunk with a valid CRC, then IEND."""
    position, before, idat = 8, b"", b""
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        if kind == b"IDAT":
            idat += body
        elif kind != b"IEND" and not idat:
            before += _png_chunk(kind, body)
        position += 12 + length
    cut = idat[: int(len(idat) * kept)]
    return data[:8] + before + _png_chunk(b"IDAT", cut) + _png_chunk(b"IEND", b"")


def _gif_with_lzw_cut(data: bytes, kept: float) -> bytes:
    """The single-frame GIF with its LZW sub-blocks cut, then a block terminator and ``;``."""
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while data[position] == 0x21:  # extensions: label, then sub-blocks
        position += 2
        while data[position]:
            position += 1 + data[position]
        position += 1
    assert data[position] == 0x2C
    local = data[position + 9]
    position += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1  # + LZW code size
    blocks = []
    while data[position]:
        blocks.append(data[position : position + 1 + data[position]])
        position += 1 + data[position]
    return (
        data[: position - sum(map(len, blocks))]
        + b"".join(blocks[: int(len(blocks) * kept)])
        + b"\x00;"
    )


def _webp_with_bitstream_cut(data: bytes, kept: float) -> bytes:
    """The simple-format WebP with its VP8/VP8L bitstream cut, chunk and RIFF sizes made to
    agree with what is left."""
    kind, size = data[12:16], int.from_bytes(data[16:20], "little")
    assert kind in (b"VP8 ", b"VP8L")
    body = data[20 : 20 + size][: int(size * kept) // 2 * 2]
    chunk = kind + len(body).to_bytes(4, "little") + body
    return b"RIFF" + (4 + len(chunk)).to_bytes(4, "little") + b"WEBP" + chunk


# TIFF field types and their sizes in bytes, for the directory entries a cut TIFF rewrites.
_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}


def _tiff_with_strip_cut(data: bytes, kept: float) -> bytes:
    """The little-endian TIFF with its middle strip cut, the strips and directory after it moved
    up, and every offset to them and the cut strip's byte count made to agree."""

    def read(at: int, size: int) -> int:
        return int.from_bytes(data[at : at + size], "little")

    directory = read(4, 4)
    entries = {
        read(entry, 2): entry
        for entry in range(directory + 2, directory + 2 + 12 * read(directory, 2), 12)
    }

    def values(tag: int) -> list[tuple[int, int]]:
        entry = entries[tag]
        size, count = _TIFF_TYPE_SIZES[read(entry + 2, 2)], read(entry + 4, 4)
        at = entry + 8 if size * count <= 4 else read(entry + 8, 4)
        return [(at + size * k, size) for k in range(count)]

    offsets, counts = values(273), values(279)
    middle = len(offsets) // 2
    start, length = read(*offsets[middle]), read(*counts[middle])
    keep = int(length * kept)
    end, gone = start + length, length - keep
    out = bytearray(data[: start + keep] + data[end:])

    def moved(value: int) -> int:
        return value - gone if value >= end else value

    def write(at: int, size: int, value: int) -> None:
        out[moved(at) : moved(at) + size] = value.to_bytes(size, "little")

    write(4, 4, moved(directory))
    for entry in entries.values():
        if _TIFF_TYPE_SIZES[read(entry + 2, 2)] * read(entry + 4, 4) > 4:
            write(entry + 8, 4, moved(read(entry + 8, 4)))
    for at, size in offsets:
        write(at, size, moved(read(at, size)))
    write(*counts[middle], keep)
    return bytes(out)


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize(
    ("fmt", "options", "cut"),
    [
        ("PNG", {}, _png_with_idat_cut),
        ("GIF", {}, _gif_with_lzw_cut),
        ("WEBP", {"quality": 80}, _webp_with_bitstream_cut),
        ("WEBP", {"lossless": True}, _webp_with_bitstream_cut),
        ("TIFF", {"compression": "jpeg"}, _tiff_with_strip_cut),
        ("TIFF", {"compression": "tiff_lzw"}, _tiff_with_strip_cut),
        ("TIFF", {"compression": "tiff_adobe_deflate"}, _tiff_with_strip_cut),
        ("TIFF", {"compression": "packbits"}, _tiff_with_strip_cut),
    ],
    ids=[
        "png",
        "gif",
        "webp-lossy",
        "webp-lossless",
        "tiff-jpeg",
        "tiff-lzw",
        "tiff-deflate",
        "tiff-packbits",
    ],
)
def test_a_file_cut_mid_stream_with_a_valid_trailer_is_truncated(photo, fmt, options, cut, mode):
    whole = _encoded(photo, fmt, **options)
    assert fingerprint(whole, mode=mode).ok
    for kept in (0.4, 0.8):
        fp = fingerprint(cut(whole, kept), mode=mode)
        assert (fp.status, fp.reason, fp.format) == ("rejected", "truncated", fmt.lower()), fp
        assert fp.phash is None


def test_an_uncompressed_tiff_strip_shorter_than_its_rows_is_truncated(photo, monkeypatch):
    """libtiff writes the directory after the strips: Pillow would read a cut strip on into the
    next one and the directory. A single strip is read to the end of its rows, as libtiff does."""
    monkeypatch.setattr(TiffImagePlugin, "WRITE_LIBTIFF", True)
    strips = _encoded(photo, "TIFF", compression="raw")
    monkeypatch.setattr(TiffImagePlugin, "WRITE_LIBTIFF", False)
    single = _encoded(photo, "TIFF", compression="raw")
    assert fingerprint(strips).ok and fingerprint(single).ok
    for kept in (0.4, 0.8):
        for whole in (strips, single):
            fp = fingerprint(_tiff_with_strip_cut(whole, kept))
            assert (fp.status, fp.reason, fp.format, fp.phash) == (
                "rejected",
                "truncated",
                "tiff",
                None,
            ), fp
    entry = single.index((279).to_bytes(2, "little") + (4).to_bytes(2, "little"))
    counted_short = bytearray(single)  # every byte there, the count alone made smaller
    counted_short[entry + 8 : entry + 12] = (1000).to_bytes(4, "little")
    fp = fingerprint(bytes(counted_short))
    assert fp.ok and fp.phash == fingerprint(single).phash, fp.message


def test_libtiff_messages_go_into_the_rejection_not_to_stderr(corpus_dir, capfd):
    data = (corpus_dir / "github_python-pillow_Pillow/hopper_lzw.tif").read_bytes()
    fp = fingerprint(_tiff_with_strip_cut(data, 0.5))
    assert (fp.status, fp.reason) == ("rejected", "truncated")
    assert "; the decoder reported: LZWDecode: " in fp.message
    assert capfd.readouterr().err == ""
