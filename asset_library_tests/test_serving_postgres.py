"""The serving store in PostgreSQL answers as the SQLite store and the lake do, field for
field, as shards land and are replaced; a change of layout rebuilds it; its check passes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from asset_library import Library
from asset_library.lake import Lake, merge_images
from asset_library.layout import LibraryLayout
from asset_library.serving import (
    STORE_SETTING,
    PostgresBackend,
    backend_of,
    check_store,
    configured_backend,
    sync,
)
from asset_library.serving.backend import PASSWORD_SETTING
from asset_library_tests.support.postgres import PostgresServer
from asset_library_tests.support.synthetic import land_shard, random_md5s

BUCKETS = 16
#: Attribute values the synthetic shards carry (``label``: manifest; ``image.format``: derived).
CASES = [
    ("label", "cat", None),
    ("label", "dog", "manifest"),
    ("label", "bird", "derived"),
    ("label", "no such label", None),
]


@pytest.fixture
def store(postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch, request) -> PostgresBackend:
    """A PostgreSQL store in a database of its own, named by the setting (the password from
    its own variable, as in production)."""
    url = postgres.new_database(f"store_{request.node.name[-40:].lower()}")
    monkeypatch.setenv(STORE_SETTING, url)
    monkeypatch.setenv(PASSWORD_SETTING, postgres.password)
    backend = configured_backend(None)
    assert isinstance(backend, PostgresBackend)
    return backend


@pytest.fixture
def lake(tmp_path: Path) -> Iterator[tuple[LibraryLayout, Lake]]:
    layout = LibraryLayout.open(tmp_path / "library", BUCKETS)
    lake = Lake.of(layout, {})
    lake.ensure()
    yield layout, lake


def _pages(library: Library, case: tuple[str, str, str | None], images: bool) -> list[dict]:
    """Every page (of 3) of the images (or md5s) having the value, with its ``answered_by``."""
    attribute, value, origin = case
    pages, after = [], None
    read = library.images_with_attribute if images else library.md5s_with_attribute
    while True:
        page = read(attribute, value, origin=origin, limit=3, after=after)
        pages.append(page)
        after = page["cursor"]
        if after is None:
            return pages


def _same_everywhere(layout: LibraryLayout, lake: Lake, backend: PostgresBackend) -> None:
    """Both stores synced: lookups, sources pages and attribute pages from PostgreSQL equal
    SQLite's and the lake's, field for field; the level check passes on PostgreSQL."""
    sync(lake, layout.serving_store_path)
    on_pg = Library(layout.root)
    assert on_pg.serving_backend == backend
    with pytest.MonkeyPatch.context() as unset:
        unset.delenv(STORE_SETTING)
        on_sqlite = Library(layout.root)
    md5s = [r["md5"] for r in on_pg.query("SELECT md5 FROM images ORDER BY md5")]
    assert md5s
    for md5 in md5s:
        found = on_pg.lookup(md5)
        assert found["answered_by"] == "store", md5
        assert found == on_sqlite.lookup(md5), md5
        assert on_pg.store_record(md5) == on_pg.lake_record(md5), md5
        page = on_pg.sources(md5, limit=2, offset=1)
        assert page == on_sqlite.sources(md5, limit=2, offset=1)
        assert page["answered_by"] == "store"
    assert on_pg.lookup("0" * 32) is None
    for case in CASES:
        for images in (True, False):
            pages = _pages(on_pg, case, images)
            assert {p["answered_by"] for p in pages} == {"store"}, case
            assert pages == _pages(on_sqlite, case, images), case
            rows = [row for p in pages for row in p["rows"]]
            attribute, value, origin = case
            assert rows == on_pg.lake_attribute_page(
                attribute, value, origin=origin, after="", limit=1000, images=images
            ), case
    checked = check_store(on_pg, sample=20, seed=1)
    assert checked.passed and checked.store_rows == len(md5s), checked.reason


def test_postgres_store_follows_batches_and_a_replaced_shard_as_sqlite_does(lake, store):
    layout, lake_ = lake
    rng = np.random.default_rng(21)
    first = random_md5s(rng, 60)
    land_shard(layout, lake_, "a-s00000", first)
    merge_images(lake_)
    assert sync(lake_, store).rebuilt
    _same_everywhere(layout, lake_, store)
    # a second batch: new images, and some seen again with other manifest values
    second = first[:15] + random_md5s(rng, 20)
    land_shard(layout, lake_, "b-s00000", second, seed=5)
    merge_images(lake_)
    synced = sync(lake_, store)
    assert not synced.rebuilt and synced.images_changed == 20 and synced.attributes_changed
    assert Library(layout.root).lookup(first[0])["sources_count"] == 2
    _same_everywhere(layout, lake_, store)
    # the second batch's shard again, other content, ingested earlier: images leave, counts
    # fall, first sources change (refilled from the lake)
    earlier = datetime.now(UTC) - timedelta(days=1)
    land_shard(layout, lake_, "b-s00000", first[10:25] + random_md5s(rng, 5), seed=9,
          ingested_at=earlier)  # fmt: skip
    merge_images(lake_)
    assert not sync(lake_, store).rebuilt
    library = Library(layout.root)
    assert library.lookup(second[-1]) is None
    assert library.lookup(first[12])["sources"][0].startswith("s3://landing/b/")
    _same_everywhere(layout, lake_, store)
    # behind the lake: the lake answers until the next sync
    land_shard(layout, lake_, "c-s00000", random_md5s(rng, 5))
    merge_images(lake_)
    assert Library(layout.root).lookup(first[0])["answered_by"] == "lake"
    sync(lake_, store)
    assert Library(layout.root).lookup(first[0])["answered_by"] == "store"


def test_postgres_store_of_another_layout_is_rebuilt_and_its_password_never_shown(
    lake, store, postgres
):
    layout, lake_ = lake
    land_shard(layout, lake_, "a-s00000", random_md5s(np.random.default_rng(22), 30))
    merge_images(lake_)
    sync(lake_, store)
    database = store.url.rsplit("/", 1)[1]
    with contextlib.closing(postgres.connect(database)) as connection, connection:
        connection.cursor().execute("UPDATE meta SET value = '1' WHERE key = 'format'")
    library = Library(layout.root)  # a layout it does not know: it reads the lake
    assert library.images_with_attribute("label", "dog")["answered_by"] == "lake"
    synced = sync(lake_, store)
    assert synced.rebuilt and "layout '1'" in synced.reason
    assert library.images_with_attribute("label", "dog")["answered_by"] == "store"
    _same_everywhere(layout, lake_, store)
    with_password = store.url.replace("dagster@", f"dagster:{postgres.password}@")
    assert postgres.password not in backend_of(with_password, None).describe()
    with pytest.raises(ValueError, match=f"{STORE_SETTING}=.*not a postgresql:// URL"):
        backend_of("mysql://user@host/db", None)


def test_a_lake_on_s3_is_served_from_postgres(
    store, s3_env, s3_bucket, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    """A library whose lake is on S3 has no SQLite store; with PostgreSQL it has one, level
    with the lake by one ``HEAD`` of the next commit's log per lookup."""
    monkeypatch.setenv("ASSET_LIBRARY_LAKE", f"s3://{s3_bucket}/lake")
    layout = LibraryLayout.open(tmp_path / "library", BUCKETS)
    lake = Lake.of(layout)
    assert lake.is_s3
    lake.ensure()
    rng = np.random.default_rng(23)
    md5s = random_md5s(rng, 20)
    land_shard(layout, lake, "a-s00000", md5s)
    merge_images(lake)
    with pytest.raises(ValueError, match="needs a PostgreSQL serving store"):
        sync(lake, layout.serving_store_path)
    assert sync(lake, store).rebuilt
    library = Library(layout.root)
    for md5 in md5s:
        found = library.lookup(md5)
        assert found["answered_by"] == "store"
        assert {**found, "answered_by": "lake"} == {
            **library.lake_record(md5),
            "answered_by": "lake",
        }
    assert check_store(library, sample=5, seed=2).passed
    more = random_md5s(rng, 3)
    land_shard(layout, lake, "b-s00000", more)
    merge_images(lake)
    assert Library(layout.root).lookup(more[0])["answered_by"] == "lake"  # behind: the lake
    assert not sync(lake, store).rebuilt
    assert Library(layout.root).lookup(more[0])["answered_by"] == "store"
    assert not layout.serving_store_path.exists()


def test_rows_with_reserved_characters_travel_intact(store):
    """Rows reach PostgreSQL by COPY's text format: its reserved characters survive."""
    awkward = ["tab\there", "new\nline", "back\\slash \\N", "\\N", "", "caf\u00e9 \r end"]
    rows = [(f"{n:032x}", "2026-01-01", "a-s00000", n, uri) for n, uri in enumerate(awkward)]
    with store.transaction() as writer:
        writer.create_run(1)
        writer.write("INSERT INTO sources_1 VALUES (?, ?, ?, ?, ?)", rows)
        writer.write(
            "INSERT INTO sources_1 VALUES (?, ?, ?, ?, ?) ON CONFLICT (md5, ingested_at, shard, "
            "ordinal) DO UPDATE SET source_uri = excluded.source_uri",
            [(rows[0][0], "2026-01-01", "a-s00000", 0, "tab\tagain")],
        )
        found = writer.execute("SELECT * FROM sources_1 ORDER BY ordinal")
    assert found == [rows[0][:4] + ("tab\tagain",), *rows[1:]]
