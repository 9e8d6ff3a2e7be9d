"""Search quality on the corpus, without the library: fingerprint every file, search the pHashes.

Measured at the default threshold with and without the quality cut-off: labelled copies found,
and unrelated results per query (unrelated = not the query's md5 and not in its labelled family
in near_dups.tsv). Byte-identical files are one md5, so results are counted per md5.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from asset_library.ingest.dihedral import (
    VARIANTS,
    fingerprint_variants,
    query_fingerprint,
    variants_of_blocks,
)
from asset_library.ingest.fingerprint import (
    Fingerprint,
    fingerprint,
    fingerprint_and_grey,
    hamming,
    phash_block,
    phash_pixels,
)
from asset_library.ingest.pool import FingerprintPool, fingerprint_many
from asset_library.ingest.shard import ingest_shard
from asset_library.ingest.sources import SourceItem
from asset_library.search import HammingIndex
from asset_library.search.quality import confirmed, informative
from asset_library.search.thresholds import (
    DEFAULT_CONFIRM_DISTANCE,
    DEFAULT_MIN_QUALITY,
    DEFAULT_PHASH_THRESHOLD,
)
from asset_library.storage import LocalObjectStore
from asset_library_tests.support.photo_set import flat_images, photo_paths, photographs

FOUND_RELATIONS = {"exact", "reencode", "resize", "exif-orientation"}

#: Smooth gradients among the corpus files (one-colour files are found by their hashes).
GRADIENTS = {
    "github_lunapaint_pngsuite/png/basi0g16.png",
    "github_lunapaint_pngsuite/png/basn0g16.png",
    "github_lunapaint_pngsuite/png/basi2c16.png",
    "github_lunapaint_pngsuite/png/basn2c16.png",
    "debian_desktop-base/homeworld-theme/grub/grub-16x9.png",
    "debian_desktop-base/homeworld-theme/grub/grub-4x3.png",
}
# Two wallpapers are a gradient with a logo in the middle (GreenTraditional.jpg, xfce-blue.jpg):
# the logo is detail the pHash can tell apart, so they are kept.

#: Files seen (by eye, and within 0-8 bits on all three hashes) to be the same picture, which
#: near_dups.tsv does not pair: counted as related in the second set of figures, each joined
#: to the labelled families it shares a file with.
SEEN_SAME_PICTURE = [
    # a 16x16 icon of the hopper picture, family F024
    {"github_python-pillow_Pillow/hopper.ico", "github_python-pillow_Pillow/hopper.png"},
    # three animation frames of one sprite, lights in other colours, each as PNG and GIF
    {f"pypi_pygame/alien{n}.{ext}" for n in (1, 2, 3) for ext in ("png", "gif")},
    # the same 8x8 checkerboard, in black and white and in blue and yellow
    {
        "pypi_scikit-image/chessboard_GRAY.png",
        "pypi_scikit-image/chessboard_RGB.png",
        "github_lunapaint_pngsuite/png/basn3p01.png",
        "github_lunapaint_pngsuite/png/basi3p01.png",
    },
    # one picture, interlaced (basi) and not (basn): PngSuite's naming
    *(
        {f"github_lunapaint_pngsuite/png/bas{i}{kind}.png" for i in "in"}
        for kind in ("0g04", "0g16", "2c08", "2c16")
    ),
    # frames of one VP8 test clip, the same dark frame of another, and a stereo pair
    {
        f"github_webmproject_libwebp-test-data/vp80-00-comprehensive-{n}.webp"
        for n in ("002", "003", "005", "009")
    },
    {
        f"github_webmproject_libwebp-test-data/vp80-00-comprehensive-{n}.webp"
        for n in ("001", "004", "007", "011", "012")
    },
    {"pypi_scikit-image/motorcycle_left.png", "pypi_scikit-image/motorcycle_right.png"},
]


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.fixture(scope="module")
def corpus(corpus_dir: Path) -> dict[str, Fingerprint]:
    """path -> fast-mode fingerprint of every corpus file that is accepted."""
    paths = [row["path"] for row in _read_tsv(corpus_dir / "MANIFEST.tsv")]
    fps = fingerprint_many([corpus_dir / p for p in paths], workers=2)
    return {path: fp for path, fp in zip(paths, fps, strict=True) if fp.ok}


@pytest.fixture(scope="module")
def pairs(corpus_dir: Path) -> list[dict[str, str]]:
    return _read_tsv(corpus_dir / "near_dups.tsv")


class Evaluation:
    """The corpus as one row per md5, its families, and a HammingIndex over the pHashes."""

    def __init__(self, corpus: dict[str, Fingerprint], families: list[set[str]]) -> None:
        paths_of: dict[str, list[str]] = defaultdict(list)
        for path, fp in corpus.items():
            paths_of[fp.md5].append(path)
        self.md5s = sorted(paths_of)
        self.row = {md5: i for i, md5 in enumerate(self.md5s)}
        self.fp = [corpus[paths_of[m][0]] for m in self.md5s]
        self.quality = np.array([fp.quality for fp in self.fp])
        self.dhash = np.array([int(fp.dhash, 16) for fp in self.fp], dtype=np.uint64)
        self.family = [set() for _ in self.md5s]
        for number, members in enumerate(families):
            for path in members & corpus.keys():
                self.family[self.row[corpus[path].md5]].add(number)
        self.index = HammingIndex(hashes=np.array([int(fp.phash, 16) for fp in self.fp], "u8"))

    def results(
        self, hashes: list[tuple[str, str]], query: int, cut: bool, confirm: int | None = None
    ) -> set[int]:
        """Rows within the threshold of any of the (pHash, dHash) ``hashes`` (with ``confirm``,
        and whose dHash is within that of the same variant's), the query's own row left out."""
        found = set()
        for phash, dhash in hashes:
            rows = np.array([i for i, _ in self.index.query(phash, DEFAULT_PHASH_THRESHOLD)])
            if confirm is not None and rows.size:
                rows = rows[confirmed(int(dhash, 16), self.dhash[rows], confirm)]
            found.update(rows.tolist())
        found.discard(query)
        rows = np.array(sorted(found), dtype=np.int64)
        if cut and rows.size:
            rows = rows[informative(int(self.quality[query]), self.quality[rows])]
        return set(rows.tolist())

    def unrelated(self, query: int, rows: set[int]) -> int:
        return sum(1 for r in rows if not self.family[r] & self.family[query])


def _families(pairs: list[dict[str, str]]) -> list[set[str]]:
    by_name: dict[str, set[str]] = defaultdict(set)
    for row in pairs:
        by_name[row["family"]] |= {row["path_a"], row["path_b"]}
    return list(by_name.values())


def _by_eye(families: list[set[str]]) -> list[set[str]]:
    """The labelled families with each SEEN_SAME_PICTURE set joined to those it overlaps."""
    merged = [set(f) for f in families]
    for seen in SEEN_SAME_PICTURE:
        joined = set(seen)
        for family in [f for f in merged if f & seen]:
            joined |= family
            merged.remove(family)
        merged.append(joined)
    return merged


def _own(ev: Evaluation, q: int) -> list[tuple[str, str]]:
    return [(ev.fp[q].phash, ev.fp[q].dhash)]


def _figures(ev: Evaluation, queries: list[int], cut: bool, confirm: int | None = None) -> float:
    total = sum(ev.unrelated(q, ev.results(_own(ev, q), q, cut, confirm)) for q in queries)
    return total / len(queries)


@pytest.mark.parametrize("confirm", [None, DEFAULT_CONFIRM_DISTANCE])
def test_labelled_copies_are_found_with_the_cut_off(corpus, pairs, confirm):
    ev = Evaluation(corpus, _families(pairs))
    wanted = [row for row in pairs if row["relation"] in FOUND_RELATIONS]
    assert len(wanted) == 100
    for row in wanted:
        a, b = ev.row[corpus[row["path_a"]].md5], ev.row[corpus[row["path_b"]].md5]
        assert a == b or b in ev.results(_own(ev, a), a, cut=True, confirm=confirm), row


def test_the_cut_off_removes_most_unrelated_results(corpus, pairs):
    labelled_families = _families(pairs)
    figures = {}
    for name, families in (
        ("near_dups.tsv", labelled_families),
        ("+ seen same picture", _by_eye(labelled_families)),
    ):
        ev = Evaluation(corpus, families)
        labelled = sorted(
            {ev.row[corpus[p].md5] for f in labelled_families for p in f & corpus.keys()}
        )
        everyone = list(range(len(ev.md5s)))
        for cut in (False, True):
            figures[name, cut] = (_figures(ev, labelled, cut), _figures(ev, everyone, cut))
    print(f"\nunrelated results per query at d <= {DEFAULT_PHASH_THRESHOLD}, {len(everyone)} md5s:")
    for (name, cut), (per_labelled, per_query) in figures.items():
        print(
            f"  {name:20} cut-off {DEFAULT_MIN_QUALITY if cut else 'none':4}: "
            f"labelled queries {per_labelled:.3f}, every image {per_query:.3f}"
        )
    before, after = figures["near_dups.tsv", False], figures["near_dups.tsv", True]
    assert before[1] > 3.0 and after[1] <= 0.3  # every image queried: 3.18 -> 0.25
    assert after[0] <= before[0] / 2  # labelled queries: 0.86 -> 0.29
    # What is left, bar one pair of pictures (a flag and a grey gradient in bands), are copies
    # of the same picture that near_dups.tsv does not pair.
    assert figures["+ seen same picture", True][0] <= 0.05  # 0.04
    assert figures["+ seen same picture", True][1] <= 0.05  # 0.04


def test_dhash_confirmation_leaves_only_copies_near_dups_tsv_misses(corpus, pairs):
    labelled_families = _families(pairs)
    strict, by_eye = (
        Evaluation(corpus, labelled_families),
        Evaluation(corpus, _by_eye(labelled_families)),
    )
    labelled = sorted(
        {strict.row[corpus[p].md5] for f in labelled_families for p in f & corpus.keys()}
    )
    everyone = list(range(len(strict.md5s)))
    figures = {
        (name, confirm): (
            _figures(ev, labelled, True, confirm),
            _figures(ev, everyone, True, confirm),
        )
        for name, ev in (("near_dups.tsv", strict), ("+ seen same picture", by_eye))
        for confirm in (None, DEFAULT_CONFIRM_DISTANCE)
    }
    print(f"\nunrelated results per query, cut-off {DEFAULT_MIN_QUALITY}:")
    for (name, confirm), (per_labelled, per_query) in figures.items():
        print(
            f"  {name:20} dHash <= {confirm or '-':4}: labelled queries {per_labelled:.3f}, "
            f"every image {per_query:.3f}"
        )
    plain = figures["near_dups.tsv", None]
    confirmed_ = figures["near_dups.tsv", DEFAULT_CONFIRM_DISTANCE]
    # The flag against the banded grey gradient (pHash 3 bits, dHash 64) goes: 0.29 -> 0.25 on
    # the labelled queries, 0.25 -> 0.21 on every image. Not the 0.1 wanted on the labels as
    # they are: the results left are all SEEN_SAME_PICTURE copies (frames of one sprite, one
    # checkerboard, hopper as an icon, four dark copies of one VP8 frame), within 0-8 bits on
    # every hash.
    assert confirmed_[0] < plain[0] and confirmed_[0] <= 0.26
    assert confirmed_[1] < plain[1] and confirmed_[1] <= 0.22
    assert figures["+ seen same picture", DEFAULT_CONFIRM_DISTANCE] == (0.0, 0.0)


def test_dihedral_queries_find_more_but_stay_near_the_unrelated_budget(corpus_dir, corpus, pairs):
    ev = Evaluation(corpus, _by_eye(_families(pairs)))
    pictures = list(range(len(ev.md5s)))
    path_of = {fp.md5: path for path, fp in corpus.items()}
    plain = dihedral = 0
    for q in pictures:
        hashes = _own(ev, q)
        plain += ev.unrelated(q, ev.results(hashes, q, True, DEFAULT_CONFIRM_DISTANCE))
        if ev.quality[q] >= DEFAULT_MIN_QUALITY:  # a low query keeps no results either way
            data = (corpus_dir / path_of[ev.md5s[q]]).read_bytes()
            _, phashes, dhashes = query_fingerprint(data)
            hashes = [(phashes[v], dhashes[v]) for v in VARIANTS]
        dihedral += ev.unrelated(q, ev.results(hashes, q, True, DEFAULT_CONFIRM_DISTANCE))
    print(f"\nunrelated per query, cut-off on: {plain / len(pictures):.3f} plain, ", end="")
    print(f"{dihedral / len(pictures):.3f} with the 8 dihedral variants")
    assert dihedral >= plain and dihedral / len(pictures) <= 0.3


def test_the_cut_off_keeps_camera_photos_and_drops_flat_images(corpus):
    camera = [
        fp.quality
        for path, fp in corpus.items()
        if fp.format == "jpeg"
        and (fp.camera_make or path.startswith(("github_ianare_exif-samples/", "debian_")))
    ]
    flat = {p for p, fp in corpus.items() if fp.ahash == fp.dhash == "0" * 16} | GRADIENTS
    below = sum(q < DEFAULT_MIN_QUALITY for q in camera)
    print(f"\ncamera JPEGs below {DEFAULT_MIN_QUALITY}: {below} of {len(camera)}; ", end="")
    print(f"flat images below: {sum(corpus[p].quality < DEFAULT_MIN_QUALITY for p in flat)}")
    print(f"of {len(flat)}; all files below: ", end="")
    print(f"{sum(fp.quality < DEFAULT_MIN_QUALITY for fp in corpus.values())} of {len(corpus)}")
    assert len(camera) == 77 and below / len(camera) <= 0.05
    assert len(flat) >= 30 and all(corpus[p].quality < DEFAULT_MIN_QUALITY for p in flat)
    assert sorted(camera)[len(camera) // 20 + 1] >= DEFAULT_MIN_QUALITY + 10  # room below 5%


def test_the_cut_off_keeps_smooth_photographs_and_drops_generated_flat_images(corpus_dir):
    """The listed photographs and their blurred, low-contrast, dark and hazy versions are kept
    (at most 1% below the cut); every generated flat image (one colour, gradients, vignettes,
    near-blank scans) falls below it."""
    photos = {name: fingerprint(data).quality for name, data in photographs(corpus_dir)}
    flat = {name: fingerprint(data).quality for name, data in flat_images()}
    hidden = sorted((q, name) for name, q in photos.items() if q < DEFAULT_MIN_QUALITY)
    shown = sorted((q, name) for name, q in flat.items() if q >= DEFAULT_MIN_QUALITY)
    print(f"\nphotographs below {DEFAULT_MIN_QUALITY}: {len(hidden)} of {len(photos)} {hidden}")
    print(f"flat images at or above it: {len(shown)} of {len(flat)} {shown}; ", end="")
    print(f"lowest photographs {sorted(photos.values())[:5]}, ", end="")
    print(f"highest flat images {sorted(flat.values())[-5:]}")
    assert len(photo_paths()) >= 70 and len(photos) == 5 * len(photo_paths()) >= 200
    assert None not in photos.values() and None not in flat.values()
    assert len(hidden) <= len(photos) // 100, hidden
    assert shown == [] and len(flat) >= 40


PHOTOS = (
    "github_ianare_exif-samples/jpg/Canon_40D.jpg",
    "github_ianare_exif-samples/jpg/gps/DSCN0010.jpg",
    "github_ianare_exif-samples/jpg/orientation/landscape_5.jpg",
    "debian_plasma-workspace-wallpapers/ColdRipple/contents/screenshot.jpg",
    "debian_xfdesktop4-data/xfce/xfce-blue.jpg",
    "github_python-pillow_Pillow/hopper.png",
)


@pytest.mark.parametrize("name", PHOTOS)
def test_each_variant_is_the_phash_of_the_transformed_image(corpus_dir, name):
    data = (corpus_dir / name).read_bytes()
    displayed = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    _, exact, exact_dhashes = query_fingerprint(data, mode="exact")
    _, fast, fast_dhashes = query_fingerprint(data)
    assert set(exact) == set(exact_dhashes) == set(VARIANTS) and len(set(exact.values())) >= 6
    assert exact == fingerprint_variants(data, mode="exact")
    assert exact["identity"] == fingerprint(data, mode="exact").phash
    worst = 0
    for variant, transpose in VARIANTS.items():
        image = displayed if transpose is None else displayed.transpose(transpose)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        turned = fingerprint(buffer.getvalue(), mode="exact")
        assert (turned.phash, turned.dhash) == (exact[variant], exact_dhashes[variant]), variant
        turned = fingerprint(buffer.getvalue())
        worst = max(worst, hamming(turned.phash, fast[variant]))
        worst = max(worst, hamming(turned.dhash, fast_dhashes[variant]))
    print(f"\n{name}: fast-mode variants within {worst} bits of the transformed image's hashes")
    assert worst <= 4


def test_the_block_transpose_alone_misses_by_at_most_a_pair_of_bits(corpus_dir):
    # Why phash_variants resizes the transposed image once more: Pillow's resize is not
    # symmetric under a transpose. The pure coefficient form stays within 2 bits.
    data = (corpus_dir / PHOTOS[3]).read_bytes()
    _, grey = fingerprint_and_grey(data, mode="exact")
    block = phash_block(phash_pixels(grey))
    exact = fingerprint_variants(data, mode="exact")
    pure = variants_of_blocks(block, block.T)
    for variant in ("identity", "flip_h", "flip_v", "rot180"):
        assert pure[variant] == exact[variant]
    assert all(hamming(pure[v], exact[v]) <= 2 for v in VARIANTS)


def test_a_rejected_query_image_says_why():
    with pytest.raises(ValueError, match=r"query image \(md5 [0-9a-f]{32}\) was rejected as"):
        fingerprint_variants(b"not an image")


def test_informative_drops_low_results_and_everything_for_a_low_query():
    qualities = np.array([100, 10, 40, 39, np.nan])
    assert informative(80, qualities).tolist() == [True, False, True, False, True]
    assert not informative(5, qualities).any()
    assert informative(None, qualities, min_quality=50).tolist() == [1, 0, 0, 0, 1]


def test_a_shard_keys_file_records_each_images_quality(corpus_dir, tmp_path):
    names = [
        "github_python-pillow_Pillow/hopper.png",
        "pypi_pygame/red.jpg",
        "github_ianare_exif-samples/heic/samplefilehub.heif",
    ]
    keys = tmp_path / "keys.parquet"
    with FingerprintPool(0) as pool:
        stats = ingest_shard(
            enumerate(SourceItem(str(corpus_dir / n)) for n in names),
            keys_path=keys,
            store=LocalObjectStore(tmp_path / "objects"),
            read=lambda uri: Path(uri).read_bytes(),
            pool=pool,
            batch="b",
            shard="s",
            n_buckets=4,
        )
    table = pq.read_table(keys)
    assert stats.ok == 3 and table.schema.field("quality").type == pa.int16()
    quality = dict(zip(table["source_uri"].to_pylist(), table["quality"].to_pylist(), strict=True))
    assert quality[str(corpus_dir / names[0])] >= DEFAULT_MIN_QUALITY  # a photo
    assert quality[str(corpus_dir / names[1])] == 0  # one red colour
    assert quality[str(corpus_dir / names[2])] >= DEFAULT_MIN_QUALITY  # HEIF, accepted
