"""Search quality: which edited copies of a photo a pHash query finds, ours against ImageHash.

Run by hand from the project root (never in CI; about a minute at the default size)::

    uv run python benchmarks/quality.py [--corpus ../shared/corpus] [--photos 12] [--max-side 1024]
    uv run python benchmarks/quality.py --photo-set [--photos 77]   # about 6 minutes

Takes ``--photos`` camera JPEGs from the corpus (EXIF make, decodable, quality at or above the
cut-off), or with ``--photo-set`` the photographs of ``asset_library_tests/data/photos.txt``
(all by default) each with its blurred, low-contrast, dark and hazy versions
(``asset_library_tests/support/photo_set.py``, indexed beside the corpus, whatever their
quality, each version related to the others of its picture), and first prints the share of those
below the cut-off. It makes edited copies of each in a temporary folder (re-encode at quality 50
and 20, resize to 50% and 25%, crop 10% of each side, rotate 90 degrees, mirror, rotate 5
degrees, brighter, more contrast, blur, a watermark box, greyscale, padding), and queries every
copy against the whole corpus (all accepted files: the originals and everything else as
distractors) at the default threshold. Printed per edit: recall (the copy finds its original)
for ImageHash's pHash (hashed on the image as displayed, no cut-off), ours (fast mode, quality
cut-off on results) and ours querying the 8 dihedral variants, each without and with the dHash
confirmation (``--confirm`` bits, default the library's); then unrelated results per query
(anything but the original and its labelled near_dups.tsv family, per md5), and the largest
dHash distance between a copy and the original its pHash found."""

from __future__ import annotations

import argparse
import csv
import io
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from asset_library.ingest.dihedral import query_fingerprint
from asset_library.ingest.fingerprint import Fingerprint, fingerprint, hamming
from asset_library.ingest.pool import fingerprint_many
from asset_library.search import HammingIndex
from asset_library.search.quality import confirmed, informative
from asset_library.search.thresholds import (
    DEFAULT_CONFIRM_DISTANCE,
    DEFAULT_MIN_QUALITY,
    DEFAULT_PHASH_THRESHOLD,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from asset_library_tests.support.photo_set import photographs  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus"

Edit = Callable[[Image.Image], Image.Image]


def _crop(image: Image.Image) -> Image.Image:
    w, h = image.size
    return image.crop((w // 10, h // 10, w - w // 10, h - h // 10))


def _watermark(image: Image.Image) -> Image.Image:
    out = image.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    draw.rectangle((int(w * 0.6), int(h * 0.8), int(w * 0.95), int(h * 0.95)), fill=(255,) * 3)
    draw.text((int(w * 0.62), int(h * 0.83)), "(c) watermark", fill=(0, 0, 0))
    return out


def _pad(image: Image.Image) -> Image.Image:
    w, h = image.size
    return ImageOps.expand(image, border=(w // 10, h // 10), fill=(255, 255, 255))


#: name -> (edit, JPEG quality the copy is saved at)
EDITS: dict[str, tuple[Edit, int]] = {
    "re-encode q50": (lambda im: im, 50),
    "re-encode q20": (lambda im: im, 20),
    "resize 50%": (lambda im: im.resize((im.width // 2, im.height // 2), Image.LANCZOS), 90),
    "resize 25%": (lambda im: im.resize((im.width // 4, im.height // 4), Image.LANCZOS), 90),
    "crop 10%": (_crop, 90),
    "rotate 90": (lambda im: im.transpose(Image.Transpose.ROTATE_90), 90),
    "mirror": (lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 90),
    "rotate 5 deg": (lambda im: im.rotate(5, Image.BICUBIC), 90),
    "brightness +30%": (lambda im: ImageEnhance.Brightness(im).enhance(1.3), 90),
    "contrast +50%": (lambda im: ImageEnhance.Contrast(im).enhance(1.5), 90),
    "blur": (lambda im: im.filter(ImageFilter.GaussianBlur(max(im.size) / 300)), 90),
    "watermark box": (_watermark, 90),
    "greyscale": (lambda im: im.convert("L"), 90),
    "padding 10%": (_pad, 90),
}


def _imagehash_phash(data: bytes) -> int | None:
    try:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        return int(str(imagehash.phash(image)), 16)
    except Exception:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--photos", type=int, help="pictures queried (default 12, or all listed)")
    parser.add_argument("--photo-set", action="store_true", help="the listed photographs")
    parser.add_argument("--max-side", type=int, default=1024, help="edited copies' longest side")
    parser.add_argument("--confirm", type=int, default=DEFAULT_CONFIRM_DISTANCE, help="dHash bits")
    args = parser.parse_args(argv)
    corpus: Path = args.corpus
    with open(corpus / "MANIFEST.tsv", newline="") as handle:
        paths = [row["path"] for row in csv.DictReader(handle, delimiter="\t")]
    with open(corpus / "near_dups.tsv", newline="") as handle:
        family_rows = list(csv.DictReader(handle, delimiter="\t"))

    started = time.perf_counter()
    fps: dict[str, Fingerprint] = {
        p: fp
        for p, fp in zip(paths, fingerprint_many([corpus / p for p in paths]), strict=True)
        if fp.ok
    }
    md5s = sorted({fp.md5 for fp in fps.values()})
    row = {m: i for i, m in enumerate(md5s)}
    first_path = {}
    for p, fp in fps.items():
        first_path.setdefault(fp.md5, p)
    quality = np.array([fps[first_path[m]].quality for m in md5s])
    phashes = [int(fps[first_path[m]].phash, 16) for m in md5s]
    dhashes = np.array([int(fps[first_path[m]].dhash, 16) for m in md5s], dtype=np.uint64)
    theirs_hashes = [_imagehash_phash((corpus / first_path[m]).read_bytes()) for m in md5s]
    theirs = np.array([h if h is not None else 0 for h in theirs_hashes], dtype=np.uint64)
    families: dict[int, set[str]] = defaultdict(set)
    for r in family_rows:
        for p in (r["path_a"], r["path_b"]):
            if p in fps:
                families[row[fps[p].md5]].add(r["family"])
    print(f"corpus: {len(md5s)} images indexed in {time.perf_counter() - started:.1f} s")

    photos: list[tuple[int, bytes]] = []  # (row of the original, its bytes)
    if args.photo_set:
        versions = list(photographs(corpus))[: 5 * args.photos if args.photos else None]
        derived = [fingerprint(data) for _, data in versions]
        hidden = sum(fp.quality < DEFAULT_MIN_QUALITY for fp in derived)
        print(f"photo set: {hidden} of {len(derived)} below the cut-off {DEFAULT_MIN_QUALITY}")
        for (name, data), fp in zip(versions, derived, strict=True):
            if fp.md5 not in row:
                row[fp.md5] = len(md5s)
                md5s.append(fp.md5)
                phashes.append(int(fp.phash, 16))
                quality = np.append(quality, fp.quality)
                dhashes = np.append(dhashes, np.uint64(int(fp.dhash, 16)))
                theirs = np.append(theirs, np.uint64(_imagehash_phash(data) or 0))
            if " (" not in name:  # the file as stored: its versions share its families
                picture = families[row[fp.md5]] | {"photo:" + name}
            families[row[fp.md5]] |= picture
            photos.append((row[fp.md5], data))
    else:
        photos = [
            (row[fp.md5], (corpus / p).read_bytes())
            for p, fp in sorted(fps.items())
            if fp.format == "jpeg" and fp.camera_make and fp.quality >= DEFAULT_MIN_QUALITY
        ][: args.photos or 12]
    ours = HammingIndex(hashes=np.array(phashes, "u8"))
    kinds = ("ih", "ours", "dih", "ours_c", "dih_c")
    results: dict[str, dict[str, list[int]]] = {
        e: {"dhash": [], **{key: [] for kind in kinds for key in (kind, "u_" + kind)}}
        for e in EDITS
    }
    plain_ms: list[float] = []
    extra_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="quality-bench-") as tmp:
        for original, photo in photos:
            displayed = ImageOps.exif_transpose(Image.open(io.BytesIO(photo))).convert("RGB")
            displayed.thumbnail((args.max_side, args.max_side))
            for name, (edit, jpeg_quality) in EDITS.items():
                target = Path(tmp) / f"{len(plain_ms)}-{name.replace(' ', '_')}.jpg"
                edit(displayed).save(target, quality=jpeg_quality)
                data = target.read_bytes()
                t0 = time.perf_counter()
                fingerprint(data)
                t1 = time.perf_counter()
                fp, variants, dhash_variants = query_fingerprint(data)
                t2 = time.perf_counter()
                plain_ms.append(1e3 * (t1 - t0))
                extra_ms.append(1e3 * ((t2 - t1) - (t1 - t0)))
                ih = _imagehash_phash(data)
                got = results[name]
                hits_ih = set(
                    np.flatnonzero(np.bitwise_count(theirs ^ np.uint64(ih)) <= 8).tolist()
                )
                searches = (
                    ("ours", {"identity": fp.phash}, None),
                    ("dih", variants, None),
                    ("ours_c", {"identity": fp.phash}, args.confirm),
                    ("dih_c", variants, args.confirm),
                )
                for key, hashes, confirm in searches:
                    found = set()
                    for transform, h in hashes.items():
                        rows = np.array(
                            [i for i, _ in ours.query(h, DEFAULT_PHASH_THRESHOLD)], dtype=np.int64
                        )
                        if confirm is not None and rows.size:
                            query_dhash = int(dhash_variants[transform], 16)
                            rows = rows[confirmed(query_dhash, dhashes[rows], confirm)]
                        found.update(rows.tolist())
                    kept = np.array(sorted(found), dtype=np.int64)
                    if kept.size:
                        kept = kept[informative(fp.quality, quality[kept])]
                    got[key].append(original in kept)
                    got["u_" + key].append(_unrelated(set(kept.tolist()), original, families))
                if got["ours"][-1]:  # how far the dHash of a copy pHash finds can be
                    got["dhash"].append(hamming(fp.dhash, int(dhashes[original])))
                got["ih"].append(original in hits_ih)
                got["u_ih"].append(_unrelated(hits_ih, original, families))
    print(
        f"{len(photos)} {'photographs' if args.photo_set else 'camera photos'}, "
        f"longest side <= {args.max_side}, "
        f"threshold {DEFAULT_PHASH_THRESHOLD}, cut-off {DEFAULT_MIN_QUALITY}\n"
    )
    print(
        f"| edit | ImageHash pHash | ours | ours + dihedral | ours, dHash <= {args.confirm} | "
        f"ours + dihedral, dHash <= {args.confirm} | unrelated/query, same order | "
        "largest dHash distance found |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, got in results.items():
        print(_row(name, got))
    every = {k: [v for got in results.values() for v in got[k]] for k in results["blur"]}
    print(_row("all edits", every))
    print(
        f"\nper query image: fingerprint median {np.median(plain_ms):.1f} ms; the 8 variants "
        f"add median {np.median(extra_ms):.2f} ms (p90 {np.percentile(extra_ms, 90):.2f} ms)"
    )
    return 0


def _row(name: str, got: dict[str, list[int]]) -> str:
    kinds = ("ih", "ours", "dih", "ours_c", "dih_c")
    rates = " | ".join(f"{np.mean(got[k]):.0%}" for k in kinds)
    unrelated = " / ".join(f"{np.mean(got['u_' + k]):.2f}" for k in kinds)
    farthest = max(got["dhash"], default="-")
    return f"| {name} | {rates} | {unrelated} | {farthest} |"


def _unrelated(hits: set[int], original: int, families: dict[int, set[str]]) -> int:
    mine = families.get(original, set())
    return sum(1 for h in hits if h != original and not (families.get(h, set()) & mine))


if __name__ == "__main__":
    raise SystemExit(main())
