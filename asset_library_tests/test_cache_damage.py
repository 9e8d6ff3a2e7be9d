"""Files rebuilt from the lake (the merge's key cache, the similarity index, the groups file,
the thumbnail cache), damaged every way a disk or a hand can: each costs at most a rebuild the
project does itself, logged naming the file, and every answer stays what it was."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asset_library import Library
from asset_library.defs.assets.library import near_duplicate_groups, similarity_index
from asset_library.defs.checks import images_md5_unique
from asset_library.defs.resources import LibraryResource
from asset_library.index_files import GROUPS_FILE
from asset_library.lake import Lake, merge_images
from asset_library.lake.keyset import MANIFEST, ImageKeys, digests
from asset_library.layout import LibraryLayout
from asset_library.runs.orchestrate import ingest_batch
from asset_library.serve import ServeSettings, create_app
from asset_library.serve.reads import duplicate_groups
from asset_library.similarity import SimilarityIndex
from asset_library_tests.support.http_server import LiveServer

#: Images of the first batch, and of the second (new ones and some of the first again).
FIRST, SECOND, REPEATED = 40, 20, 10


def _smallest_images(corpus: Path, n: int) -> list[Path]:
    images = [
        p
        for p in corpus.rglob("*")
        if p.is_file() and p.suffix.lower() in {".jpg", ".png", ".webp", ".gif"}
    ]
    return sorted(images, key=lambda p: (p.stat().st_size, str(p)))[:n]


def _folder(root: Path, images: list[Path]) -> Path:
    root.mkdir(parents=True)
    for n, path in enumerate(images):
        shutil.copyfile(path, root / f"{n:03d}{path.suffix.lower()}")
    return root


def _ingest(source: Path, library: Path) -> dict[str, bool]:
    with dg.instance_for_test() as instance:
        summary = ingest_batch(
            str(source),
            library=library,
            max_images_per_shard=20,
            workers=0,
            environ={},
            instance=instance,
            progress=lambda _: None,
        )
    assert summary.success, (summary.failures, summary.checks)
    return summary.checks


@pytest.fixture(scope="module")
def batches(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> tuple[Path, Path]:
    """Two folders of real images: the first batch, and a second that repeats some of it."""
    root = tmp_path_factory.mktemp("batches")
    images = _smallest_images(corpus_dir, FIRST + SECOND)
    first = _folder(root / "first", images[:FIRST])
    second = _folder(root / "second", images[FIRST:] + images[:REPEATED])
    return first, second


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, batches: tuple[Path, Path]) -> Path:
    """A library holding the first batch."""
    root = tmp_path_factory.mktemp("base") / "library"
    _ingest(batches[0], root)
    return root


def _md5s(library: Path) -> list[str]:
    rows = Library(library).query("SELECT md5 FROM images ORDER BY md5")
    return [row["md5"] for row in rows]


@pytest.fixture(scope="module")
def expected(
    tmp_path_factory: pytest.TempPathFactory, base: Path, batches: tuple[Path, Path]
) -> Path:
    """The library once the second batch lands on an undamaged copy of ``base``."""
    root = tmp_path_factory.mktemp("expected") / "library"
    shutil.copytree(base, root)
    _ingest(batches[1], root)
    md5s = _md5s(root)
    assert len(md5s) == len(set(md5s)) > len(_md5s(base))
    return root


def _version(table: Path) -> int:
    return max(int(p.stem) for p in (table / "_delta_log").glob("*.json"))


@pytest.fixture
def landed(base: Path, expected: Path, tmp_path: Path) -> Path:
    """``expected`` as it was between the second batch's shards and its refresh: its
    ``images`` and ``image_counts`` logs back at ``base``'s commits, its key cache and index
    ``base``'s."""
    root = tmp_path / "library"
    shutil.copytree(expected, root)
    for table in ("images", "image_counts"):
        log = root / "lake" / table / "_delta_log"
        assert not list(log.glob("*.checkpoint*"))
        for entry in log.glob("*.json"):
            if int(entry.stem) > _version(base / "lake" / table):
                entry.unlink()
    for cache in ("image_keys", "index"):
        shutil.rmtree(root / cache)
        shutil.copytree(base / cache, root / cache)
    return root


def _refresh(root: Path) -> dg.AssetCheckResult:
    """What the ``refresh_library`` job does: the merge, its check, the similarity index."""
    layout = LibraryLayout.open(root)
    lake = Lake.of(layout, {})
    merged = merge_images(lake)
    SimilarityIndex(layout).sync(lake)
    return images_md5_unique(lake, merged.buckets)


def _first_run(keys: Path) -> Path:
    return keys / json.loads((keys / MANIFEST).read_text())["runs"][0]["file"]


def _edit_manifest(keys: Path, edit: Callable[[dict], None]) -> Path:
    manifest = json.loads((keys / MANIFEST).read_text())
    edit(manifest)
    (keys / MANIFEST).write_text(json.dumps(manifest))
    return keys / MANIFEST


def _truncate(path: Path, size: int) -> Path:
    with path.open("r+b") as stream:
        stream.truncate(size)
    return path


def _overwrite_middle(path: Path) -> Path:
    """Same size, other bytes: only a checksum tells."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))
    return path


def _delete(path: Path) -> Path:
    path.unlink()
    return path


KEY_CACHE_DAMAGE: dict[str, Callable[[Path], Path]] = {
    "run list emptied": lambda keys: _edit_manifest(keys, lambda m: m.update(runs=[])),
    "run list and total emptied": lambda keys: _edit_manifest(
        keys, lambda m: m.update(runs=[], total=0)
    ),
    "run's rows wrong": lambda keys: _edit_manifest(
        keys, lambda m: m["runs"][0].update(rows=m["runs"][0]["rows"] - 5)
    ),
    "run truncated": lambda keys: _truncate(_first_run(keys), 200),
    "run emptied": lambda keys: _truncate(_first_run(keys), 0),
    "run overwritten": lambda keys: _overwrite_middle(_first_run(keys)),
    "run deleted": lambda keys: _delete(_first_run(keys)),
    "manifest truncated": lambda keys: _truncate(keys / MANIFEST, 30),
    "manifest garbage": lambda keys: (
        (keys / MANIFEST).write_bytes(b"\x00\xff" * 40) and keys / MANIFEST
    ),
}


def test_an_undamaged_key_cache_is_trusted(landed: Path, expected: Path, caplog):
    keys = landed / "image_keys"
    before = json.loads((keys / MANIFEST).read_text())
    assert _refresh(landed).passed
    assert _md5s(landed) == _md5s(expected)
    after = json.loads((keys / MANIFEST).read_text())
    assert after["runs"][0] == before["runs"][0]  # added to, not rebuilt
    assert "damaged" not in caplog.text


@pytest.mark.parametrize("damage", sorted(KEY_CACHE_DAMAGE))
def test_a_damaged_key_cache_is_rebuilt_and_no_md5_is_lost_or_doubled(
    damage: str, landed: Path, expected: Path, caplog: pytest.LogCaptureFixture
):
    keys = landed / "image_keys"
    named = KEY_CACHE_DAMAGE[damage](keys)
    assert _refresh(landed).passed
    assert _md5s(landed) == _md5s(expected)  # none lost, none doubled
    assert "images key cache damaged, rebuilt from the table" in caplog.text
    assert str(named) in caplog.text
    manifest = json.loads((keys / MANIFEST).read_text())  # rebuilt by the merge itself
    assert manifest["total"] == len(_md5s(expected)) == sum(r["rows"] for r in manifest["runs"])


def test_a_refresh_after_a_cut_run_file_holds_every_image(
    base: Path, batches: tuple[Path, Path], expected: Path, tmp_path: Path
):
    """Through the ``refresh_library`` job: the refresh succeeds and its check passes."""
    library = tmp_path / "library"
    shutil.copytree(base, library)
    _truncate(_first_run(library / "image_keys"), 200)
    checks = _ingest(batches[1], library)
    assert checks["images_md5_unique"]
    assert _md5s(library) == _md5s(expected)


def test_the_uniqueness_check_reads_the_table_not_the_cache(landed: Path, expected: Path):
    """A key cache that is well formed and level, but lists other md5s (a cache of another
    library under this one's name): the merge believes it and appends held md5s again; the
    check counts the table's own rows and says so."""
    keys = landed / "image_keys"
    manifest = json.loads((keys / MANIFEST).read_text())
    other = ImageKeys(keys)
    total = manifest["total"]
    fake = digests(pa.array([f"{n:032x}" for n in range(total)]))
    other.rebuild(fake, manifest["table"], manifest["version"], manifest["merge"])
    check = _refresh(landed)
    md5s = _md5s(landed)
    assert len(md5s) > len(set(md5s))  # what the cache made the merge do
    assert not check.passed
    assert check.metadata["duplicated_md5s"].value == len(md5s) - len(set(md5s))


def _segment(library: Path, kind: str = "phash") -> Path:
    return next(p for p in (library / "index" / kind).iterdir() if p.is_dir())


def _kind_manifest(library: Path, kind: str) -> Path:
    """The manifest ``segments.json`` names for a hash kind."""
    saved = json.loads((library / "index" / "segments.json").read_text())
    return library / "index" / saved["manifests"][kind]


def _keys_file(library: Path) -> Path:
    return next((library / "index" / "keys").iterdir())


INDEX_DAMAGE: dict[str, Callable[[Path], Path]] = {
    "segments.json truncated": lambda lib: _truncate(lib / "index" / "segments.json", 20),
    "segments.json emptied": lambda lib: _truncate(lib / "index" / "segments.json", 0),
    "segments.json lists no segment": lambda lib: _edit_json(
        lib / "index" / "segments.json", lambda m: m.update(segments={})
    ),
    "segments.json deleted": lambda lib: _delete(lib / "index" / "segments.json"),
    "index manifest wrong dir": lambda lib: _edit_json(
        _kind_manifest(lib, "dhash"),
        lambda m: m["segments"][0].update(dir="seg-elsewhere"),
    ),
    "segment array truncated": lambda lib: _truncate(_segment(lib) / "hashes.npy", 100),
    "segment array garbage": lambda lib: (
        (_segment(lib) / "ids.npy").write_bytes(b"\x93NUMPY?" * 9) and _segment(lib) / "ids.npy"
    ),
    "segment meta deleted": lambda lib: _delete(_segment(lib, "ahash") / "meta.json"),
    "segment hashes overwritten": lambda lib: _overwrite_middle(_segment(lib) / "hashes.npy"),
    "segment ids overwritten": lambda lib: _overwrite_middle(_segment(lib, "dhash") / "ids.npy"),
    "keys file truncated": lambda lib: _truncate(_keys_file(lib), 90),
}


def _edit_json(path: Path, edit: Callable[[dict], None]) -> Path:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _answers(library: Path) -> tuple[dict[str, list], list[list[str]]]:
    opened = Library(library)
    md5s = _md5s(library)
    similar = {
        md5: [(r["md5"], r["distance"]) for r in opened.similar(md5, max_distance=20)]
        for md5 in md5s[:12]
    }
    groups = SimilarityIndex(opened.layout).groups(20)
    return similar, sorted(groups)


@pytest.mark.parametrize("damage", sorted(INDEX_DAMAGE))
def test_a_damaged_similarity_index_is_rebuilt_and_answers_as_before(
    damage: str, expected: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    library = tmp_path / "library"
    shutil.copytree(expected, library)
    before = _answers(library)
    assert before[0] and any(len(found) > 1 for found in before[0].values())
    named = INDEX_DAMAGE[damage](library)
    files = sorted((library / "index").rglob("*"))
    found = Library(library)
    similar = {md5: [(r["md5"], r["distance"]) for r in found.similar(md5, max_distance=20)]
               for md5 in before[0]}  # fmt: skip
    assert similar == before[0]  # a reader answers from an index rebuilt in memory
    assert sorted((library / "index").rglob("*")) == files  # and writes nothing
    assert "similarity index damaged, rebuilt from the images table" in caplog.text
    assert str(named) in caplog.text or str(named.parent) in caplog.text  # the file, or the
    # segment directory its manifest wrongly names
    layout = LibraryLayout.open(library)
    SimilarityIndex(layout).sync(Lake.of(layout, {}))  # what refresh_library does
    caplog.clear()
    assert _answers(library) == before  # saved again, and read as saved
    assert "damaged" not in caplog.text


def _groups_file(library: Path) -> Path:
    return library / "index" / GROUPS_FILE


GROUPS_DAMAGE: dict[str, Callable[[Path], Path]] = {
    "truncated": lambda lib: _truncate(_groups_file(lib), _groups_file(lib).stat().st_size // 2),
    "garbage": lambda lib: (
        _groups_file(lib).write_bytes(b"PAR1" + b"\x00\xff" * 300 + b"PAR1") and _groups_file(lib)
    ),
    "emptied": lambda lib: _truncate(_groups_file(lib), 0),
    "md5 overwritten": lambda lib: _overwrite_md5(_groups_file(lib)),
    "deleted": lambda lib: _delete(_groups_file(lib)),
}


def _overwrite_md5(path: Path) -> Path:
    """Same size, one md5 of a data page turned into another well-formed md5: only the page's
    checksum tells."""
    data = path.read_bytes()
    md5 = pq.read_table(path)["md5"][0].as_py().encode()
    at = data.index(md5)  # the pages come before the footer's statistics
    path.write_bytes(data[:at] + md5[::-1] + data[at + len(md5) :])
    return path


def _group_answers(library: Path) -> tuple[list[list[str]], list[dict]]:
    """The groups as the library and the service's ``/duplicates`` answer them."""
    opened = Library(library)
    return opened.near_duplicate_groups(), duplicate_groups(opened, 100, 0).items


def _refresh_groups(library: Path) -> None:
    """The ``refresh_library`` job's index and groups assets, through Dagster."""
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [similarity_index, near_duplicate_groups],
            resources={"library": LibraryResource(root=str(library))},
            instance=instance,
        )
    assert result.success


@pytest.mark.parametrize("damage", sorted(GROUPS_DAMAGE))
def test_a_damaged_groups_file_is_computed_again_and_answers_as_before(
    damage: str, expected: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    library = tmp_path / "library"
    shutil.copytree(expected, library)
    before = _group_answers(library)
    assert before[0] and before[1]  # the library has near-duplicate groups to lose
    written = _groups_file(library).read_bytes()
    named = GROUPS_DAMAGE[damage](library)
    damaged = named.read_bytes() if named.exists() else None
    assert _group_answers(library) == before
    assert "near-duplicate groups file" in caplog.text and str(named) in caplog.text
    assert (named.read_bytes() if named.exists() else None) == damaged  # readers write nothing
    _refresh_groups(library)
    assert named.read_bytes() == written  # rewritten by the refresh
    caplog.clear()
    assert _group_answers(library) == before
    assert "near-duplicate groups" not in caplog.text


THUMBNAIL_DAMAGE: dict[str, Callable[[Path], Path]] = {
    "truncated": lambda path: _truncate(path, path.stat().st_size // 2),
    "garbage": lambda path: path.write_bytes(b"\xff\xd8" + b"\x00\xff" * 500) and path,
    "zero bytes": lambda path: _truncate(path, 0),
    "overwritten": _overwrite_middle,
}


@pytest.fixture(scope="module")
def service(expected: Path, tmp_path_factory: pytest.TempPathFactory):
    """The HTTP service over ``expected``, its thumbnail cache in a folder of its own."""
    cache = tmp_path_factory.mktemp("serve-cache")
    with LiveServer(create_app(ServeSettings(library=expected, cache_dir=cache))) as live:
        yield live, cache


@pytest.mark.parametrize("damage", sorted(THUMBNAIL_DAMAGE))
def test_a_damaged_thumbnail_is_made_again_never_served(
    damage: str, service: tuple[LiveServer, Path], expected: Path, caplog
):
    live, cache = service
    md5 = _md5s(expected)[sorted(THUMBNAIL_DAMAGE).index(damage)]
    fresh = live.get(f"/images/{md5}/thumb")
    assert fresh.status == 200 and fresh.body[:2] == b"\xff\xd8"
    (cached,) = cache.rglob(f"{md5}.jpg")
    assert live.get(f"/images/{md5}/thumb").body == fresh.body  # served from the cache
    assert "thumbnail" not in caplog.text
    THUMBNAIL_DAMAGE[damage](cached)
    again = live.get(f"/images/{md5}/thumb")
    assert again.status == 200 and again.body == fresh.body
    assert "thumbnail cache damaged, made again" in caplog.text and str(cached) in caplog.text
    assert cached.read_bytes() == fresh.body  # made again in the cache
