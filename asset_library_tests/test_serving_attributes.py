"""Images having an attribute value, paged by a cursor: the serving store answers as the lake
does (same rows, same columns, same types, same order), through ``Library`` and the service,
and falls back to the lake, saying so, whenever it is not level with it."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
from pydantic import TypeAdapter

from asset_library import Library
from asset_library.ids import InvalidIdError
from asset_library.lake import Lake, merge_images
from asset_library.layout import LibraryLayout
from asset_library.runs.orchestrate import ingest_batch
from asset_library.serve.app import create_app
from asset_library.serve.settings import ServeSettings
from asset_library.serving import MAX_ATTRIBUTE_PAGE, check_store, sync
from asset_library_tests.support.http_server import LiveServer
from asset_library_tests.support.synthetic import land_shard, random_md5s

FOLDERS = ("github_recurser_exif-orientation-examples", "github_jenssegers_imagehash")
#: Each over the fast budget: a library ingested through Dagster, or Delta shards synced.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def manifest_library(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    """Two corpus folders ingested through Dagster from a manifest with attribute columns
    (text, integer, and one named like a derived attribute), in shards of 10; one image listed
    under a second name with another label (two sources, two values of one attribute)."""
    batch = tmp_path_factory.mktemp("batch")
    files = []
    for folder in FOLDERS:
        shutil.copytree(corpus_dir / folder, batch / folder)
        files += sorted(p for p in (batch / folder).rglob("*") if p.is_file())
    twin = batch / "twin.jpg"
    shutil.copy(files[0], twin)
    lines = [
        {"uri": str(p.relative_to(batch)), "label": ("cat", "dog")[n % 2], "rank": n % 3}
        | ({"exif.make": "Canon"} if n % 4 == 0 else {})
        for n, p in enumerate(files)
    ]
    lines.append({"uri": twin.name, "label": "dog", "rank": 7})
    manifest = batch / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    root = tmp_path_factory.mktemp("library")
    with dg.instance_for_test() as instance:
        summary = ingest_batch(
            str(manifest),
            library=root,
            max_images_per_shard=10,
            workers=1,
            environ={},
            instance=instance,
            progress=lambda _: None,
        )
    assert summary.ok == len(lines) and summary.shards >= 2
    assert summary.checks["serving_store_level"]
    return root


#: (attribute, value, origin): values one image has, most, some, none; by origin and not.
CASES = [
    ("label", "cat", None),
    ("label", "dog", None),  # the twin's image has both labels
    ("rank", "1", None),
    ("rank", "7", "manifest"),
    ("image.animated", "false", None),  # every image
    ("image.animated", "false", "derived"),
    ("image.animated", "false", "manifest"),  # none
    ("exif.make", "Canon", None),  # a manifest value named like a derived attribute
    ("exif.make", "Canon", "manifest"),
    ("label", "no such label", None),
]


def _every_page(library: Library, case: tuple[str, str, str | None], **kw: Any) -> list[dict]:
    """The pages of one case, followed by their cursors."""
    attribute, value, origin = case
    pages = [library.images_with_attribute(attribute, value, origin=origin, **kw)]
    while pages[-1]["cursor"] is not None:
        pages.append(
            library.images_with_attribute(
                attribute, value, origin=origin, after=pages[-1]["cursor"], **kw
            )
        )
    return pages


def _copy_without_store(root: Path, to: Path) -> Path:
    """The library's lake and settings, without its serving store: the lake answers."""
    to.mkdir()
    shutil.copy(root / "library.json", to / "library.json")
    shutil.copytree(root / "lake", to / "lake")
    return to


def test_pages_from_the_store_equal_the_lakes_field_for_field(manifest_library, tmp_path):
    store = Library(manifest_library)
    lake = Library(_copy_without_store(manifest_library, tmp_path / "copy"))
    images = [r["md5"] for r in store.query("SELECT md5 FROM images ORDER BY md5")]
    seen = {}
    for case in CASES:
        attribute, value, origin = case
        stored, read = _every_page(store, case, limit=2), _every_page(lake, case, limit=2)
        assert {p["answered_by"] for p in stored} == {"store"}, case
        assert {p["answered_by"] for p in read} == {"lake"}, case
        assert stored == [{**p, "answered_by": "store"} for p in read], case
        rows = [row for page in stored for row in page["rows"]]
        md5s = [row["md5"] for row in rows]
        assert md5s == sorted(set(md5s)), case  # md5 order, each image once
        assert all(len(p["rows"]) == 2 for p in stored[:-1]), case  # full pages but the last
        assert all(list(row) == list(rows[0]) for row in rows), case
        for row in rows:  # each row is the image's row, as its lookup gives it
            lookup = store.lookup(row["md5"])
            assert row == {name: lookup[name] for name in row}, case
        seen[case] = md5s
        # the md5s alone: as the macro has them, by origin as the cube has them
        listed = store.md5s_with_attribute(attribute, value, origin=origin, limit=1000)
        assert listed["answered_by"] == "store" and listed["cursor"] is None
        assert listed == {**lake.md5s_with_attribute(*case[:2], origin=origin, limit=1000),
                          "answered_by": "store"}  # fmt: skip
        if origin is None:
            macro = store.query(
                "SELECT md5, bucket FROM md5s_with_attribute(?, ?) ORDER BY md5", [attribute, value]
            )
        else:
            macro = store.query(
                "SELECT DISTINCT md5, bucket FROM attributes WHERE attribute = ? AND value = ? "
                "AND origin = ? ORDER BY md5",
                [attribute, value, origin],
            )
        assert listed["rows"] == macro and [r["md5"] for r in macro] == md5s, case
    assert seen[("image.animated", "false", None)] == images
    assert seen[("image.animated", "false", "manifest")] == []
    assert seen[("label", "no such label", None)] == []
    twin = set(seen[("label", "cat", None)]) & set(seen[("label", "dog", None)])
    assert len(twin) == 1 and store.lookup(twin.pop())["occurrences"] == 2
    assert len(seen[("exif.make", "Canon", "manifest")]) >= 4
    assert check_store(store, sample=10, seed=3).passed


def test_a_page_is_bounded_and_bad_inputs_are_named(manifest_library):
    library = Library(manifest_library)
    for bad, named in (
        ({"limit": 0}, "limit"),
        ({"limit": MAX_ATTRIBUTE_PAGE + 1}, "limit"),
        ({"after": "not-a-cursor"}, "after"),
        ({"origin": "elsewhere"}, "origin"),
    ):
        with pytest.raises(ValueError, match=named):
            library.images_with_attribute("label", "cat", **bad)
    with pytest.raises(InvalidIdError, match="after"):
        library.md5s_with_attribute("label", "cat", after="zz")
    with pytest.raises(ValueError, match="value"):
        library.images_with_attribute("rank", 1)  # type: ignore[arg-type]
    # a cursor past every md5: an empty last page
    assert library.images_with_attribute("label", "cat", after="f" * 32)["rows"] == []


def test_the_service_pages_by_cursor_as_the_library_does(manifest_library, tmp_path):
    library = Library(manifest_library)
    settings = ServeSettings(library=manifest_library, cache_dir=tmp_path / "cache")
    expected = _every_page(library, ("label", "dog", None), limit=3)
    with LiveServer(create_app(settings)) as client:
        path: str | None = "/attributes/images?attr=label&val=dog&limit=3"
        bodies = []
        while path is not None:
            reply = client.get(path)
            assert reply.status == 200
            bodies.append(reply.json())
            following = bodies[-1]["next"]
            path = None if following is None else following.removeprefix(client.url)
        as_json = TypeAdapter(list[dict[str, Any]]).dump_python
        assert [b["rows"] for b in bodies] == [as_json(p["rows"], mode="json") for p in expected]
        assert [b["cursor"] for b in bodies] == [p["cursor"] for p in expected]
        assert {b["answered_by"] for b in bodies} == {"store"}
        md5s = client.get("/attributes/md5s?attr=rank&val=7&origin=manifest").json()
        assert md5s["rows"] == library.md5s_with_attribute("rank", "7", origin="manifest")["rows"]
        for query, named in (
            ("attr=label&val=dog&limit=1001", "limit"),
            ("attr=label&val=dog&limit=0", "limit"),
            ("attr=label&val=dog&after=nope", "after"),
            ("attr=label&val=dog&origin=nowhere", "origin"),
            ("attr=label", "val"),
        ):
            reply = client.get(f"/attributes/images?{query}")
            assert reply.status == 422, query
            assert named in reply.json()["detail"], (query, reply.json())


# --------------------------------------------------------------------------------------------
# Synced shard by shard (lake written directly: quick, real Delta tables)

BUCKETS = 16


@pytest.fixture
def lake(tmp_path: Path) -> Iterator[tuple[LibraryLayout, Lake]]:
    layout = LibraryLayout.open(tmp_path / "library", BUCKETS)
    lake = Lake.of(layout, {})
    lake.ensure()
    yield layout, lake


def _same_both_ways(library: Library, attribute: str, value: str) -> list[str]:
    """Every image having the value, paged from the store, equals the lake's; their md5s."""
    rows, after = [], ""
    while True:
        page = library.store_attribute_page(
            attribute, value, origin=None, after=after, limit=7, images=True
        )
        rows += page
        if len(page) < 7:
            break
        after = page[-1]["md5"]
    assert rows == library.lake_attribute_page(
        attribute, value, origin=None, after="", limit=1000, images=True
    )
    return [row["md5"] for row in rows]


def test_the_index_follows_each_sync_and_a_store_behind_is_not_read(lake, caplog):
    layout, lake_ = lake
    rng = np.random.default_rng(11)
    first = random_md5s(rng, 80)
    land_shard(layout, lake_, "a-s00000", first)
    merge_images(lake_)
    assert sync(lake_, layout.serving_store_path).rebuilt
    library = Library(layout.root)
    cats = _same_both_ways(library, "label", "cat")
    assert library.images_with_attribute("label", "cat")["answered_by"] == "store"
    # a shard written, not merged: the cube moved on, the store did not
    second = first[:20] + random_md5s(rng, 30)
    land_shard(layout, lake_, "b-s00000", second, seed=5)
    page = library.md5s_with_attribute("label", "cat", limit=1000)
    assert page["answered_by"] == "lake"
    assert "behind the lake (at attributes version" in caplog.text
    merge_images(lake_)
    synced = sync(lake_, layout.serving_store_path)
    assert not synced.rebuilt and synced.attributes_changed > 0
    assert library.md5s_with_attribute("label", "cat", limit=1000) == {
        **page,
        "answered_by": "store",
    }
    more = _same_both_ways(library, "label", "cat")
    assert len(more) > len(cats)
    # the second shard again, other images and values: index entries leave with their rows
    earlier = datetime.now(UTC) - timedelta(days=1)
    land_shard(layout, lake_, "b-s00000", first[40:60], seed=9, ingested_at=earlier)
    merge_images(lake_)
    assert not sync(lake_, layout.serving_store_path).rebuilt
    for value in ("cat", "dog", "bird"):
        _same_both_ways(library, "label", value)
    assert check_store(library, sample=20, seed=4).passed


def test_a_store_of_the_layout_before_runs_is_read_by_no_one_and_rebuilt(lake):
    layout, lake_ = lake
    md5s = random_md5s(np.random.default_rng(12), 30)
    land_shard(layout, lake_, "a-s00000", md5s)
    merge_images(lake_)
    path = layout.serving_store_path
    sync(lake_, path)
    with sqlite3.connect(path) as connection:  # as the layout before runs wrote it
        connection.execute("UPDATE meta SET value = '2' WHERE key = 'format'")
        connection.execute("DELETE FROM meta WHERE key = 'runs'")
        connection.execute("CREATE TABLE images (md5 TEXT PRIMARY KEY, record TEXT NOT NULL)")
    library = Library(layout.root)
    assert library.images_with_attribute("label", "dog")["answered_by"] == "lake"
    assert library.lookup(md5s[0])["answered_by"] == "lake"
    synced = sync(lake_, path)
    assert synced.rebuilt and "layout '2'" in synced.reason
    with sqlite3.connect(path) as connection:  # the old layout's tables gone
        assert not connection.execute(
            "SELECT 1 FROM sqlite_schema WHERE name = 'images'"
        ).fetchall()
    assert library.images_with_attribute("label", "dog")["answered_by"] == "store"
    assert library.lookup(md5s[0])["answered_by"] == "store"
    _same_both_ways(library, "label", "dog")
