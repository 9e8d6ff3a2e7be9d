"""The serving store answers lookups as the lake does, stays level as shards land and are
replaced, keeps records small, falls back to the lake saying so, and its check catches damage."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import TypeAdapter

from asset_library import Library
from asset_library.ingest.shard import KEYS_SCHEMA
from asset_library.lake import Lake, compact, merge_images, write_shard
from asset_library.layout import LibraryLayout
from asset_library.serve.app import create_app
from asset_library.serve.settings import ServeSettings
from asset_library.serving import RECORD_SOURCES, StoreUnavailable, check_store, sync
from asset_library.serving.runs import FAN_IN, Run, format_runs, parse_runs, runs_to_merge
from asset_library_tests.support.http_server import LiveServer
from asset_library_tests.support.synthetic import land_shard, random_md5s, write_keys

BUCKETS = 16


def _every_md5(library: Library) -> list[str]:
    return [r["md5"] for r in library.query("SELECT md5 FROM images ORDER BY md5")]


def _assert_store_is_the_lake(library: Library) -> None:
    """Every md5's record from the store equals the lake's, field for field."""
    md5s = _every_md5(library)
    assert md5s
    for md5 in md5s:
        assert library.store_record(md5) == library.lake_record(md5), md5
    assert check_store(library, sample=20, seed=1).passed


# --------------------------------------------------------------------------------------------
# The corpus, ingested through Dagster (the refresh job syncs the store)


def test_the_store_answers_every_image_of_the_corpus_as_the_lake_does(corpus_library):
    root, _ = corpus_library
    library = Library(root)
    _assert_store_is_the_lake(library)
    fresh = Library(root)
    some = _every_md5(library)[7]
    found = fresh.lookup(some)
    assert found["answered_by"] == "store"
    assert fresh._catalog is None  # answered without DuckDB
    assert {**found, "answered_by": "lake"} == {**library.lake_record(some), "answered_by": "lake"}
    assert set(found) >= {"sources", "sources_count", "attributes", "occurrences"}


def test_the_service_answers_from_the_store_and_pages_sources(corpus_library, tmp_path):
    root, _ = corpus_library
    library = Library(root)
    settings = ServeSettings(library=root, cache_dir=tmp_path / "cache")
    md5 = _every_md5(library)[3]
    with LiveServer(create_app(settings)) as client:
        reply = client.get(f"/images/{md5}")
        assert reply.status == 200
        body = reply.json()
        assert body["answered_by"] == "store"
        assert body["md5"] == md5 and body["sources_count"] == body["occurrences"]
        assert body["sources"] == library.lake_record(md5)["sources"]
        page = client.get(f"/images/{md5}/sources?limit=1").json()
        assert page["sources"] == body["sources"][:1] and page["sources_count"] >= 1
        assert client.get(f"/images/{md5}/sources?limit=1001").status == 422
        assert client.get(f"/images/{'0' * 32}/sources").status == 404


def _copy(root: Path, to: Path) -> Path:
    """The library's lake, settings and store (no image bytes: lookups never read them)."""
    to.mkdir()
    shutil.copy(root / "library.json", to / "library.json")
    shutil.copytree(root / "lake", to / "lake")
    shutil.copytree(root / "serving", to / "serving")
    return to


def test_a_library_without_its_store_answers_from_the_lake_and_says_so(
    corpus_library, tmp_path, caplog
):
    root = _copy(corpus_library[0], tmp_path / "copy")
    library = Library(root)
    md5 = _every_md5(library)[0]
    assert library.lookup(md5)["answered_by"] == "store"
    for name in ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm"):
        (root / "serving" / name).unlink(missing_ok=True)
    without = Library(root)
    with caplog.at_level(logging.WARNING, logger="asset_library.library"):
        found = without.lookup(md5)
    assert found["answered_by"] == "lake"
    assert found == {**library.store_record(md5), "answered_by": "lake"}
    assert "no serving store" in caplog.text
    # rebuilt on demand, it answers again
    sync(without.lake, without.layout.serving_store_path, rebuild=True)
    assert Library(root).lookup(md5)["answered_by"] == "store"


def test_a_damaged_store_fails_its_check_and_is_rebuilt(corpus_library, tmp_path):
    root = _copy(corpus_library[0], tmp_path / "copy")
    library = Library(root)
    path = library.layout.serving_store_path
    assert check_store(library, sample=30, seed=2).passed
    md5s = _every_md5(library)
    with sqlite3.connect(path) as connection:  # one row gone, every other record altered
        (runs,) = connection.execute("SELECT value FROM meta WHERE key = 'runs'").fetchone()
        for run in parse_runs(runs):
            connection.execute(f"DELETE FROM images_{run.id} WHERE md5 = ?", (md5s[0],))
            connection.execute(f"UPDATE counts_{run.id} SET n = n + 1")
    checked = check_store(Library(root), sample=30, seed=2)
    assert not checked.passed
    assert checked.store_rows == checked.lake_rows - 1 and checked.differing
    assert "differ" in checked.reason and "image rows" in checked.reason
    # bytes overwritten: unreadable, so lookups read the lake, and the next sync rebuilds it
    path.write_bytes(b"not a database" * 100)
    assert Library(root).lookup(md5s[1])["answered_by"] == "lake"
    assert not check_store(Library(root)).passed
    synced = sync(library.lake, path)
    assert synced.rebuilt and "damaged" in synced.reason
    _assert_store_is_the_lake(Library(root))


# --------------------------------------------------------------------------------------------
# Synced shard by shard (lake written directly: quick, real Delta tables)


def _lake(root: Path) -> tuple[LibraryLayout, Lake]:
    layout = LibraryLayout.open(root, BUCKETS)
    lake = Lake.of(layout, {})
    lake.ensure()
    return layout, lake


def _refresh(layout: LibraryLayout, lake: Lake):
    merge_images(lake)
    return sync(lake, layout.serving_store_path)


def test_sync_follows_new_images_counts_attributes_and_replaced_shards(tmp_path):
    layout, lake = _lake(tmp_path / "library")
    rng = np.random.default_rng(3)
    first = random_md5s(rng, 120)
    land_shard(layout, lake, "a-s00000", first)
    assert _refresh(layout, lake).rebuilt
    library = Library(layout.root)
    _assert_store_is_the_lake(library)
    # a second batch: 40 new images, 30 seen again with other manifest values
    second = first[:30] + random_md5s(rng, 40)
    land_shard(layout, lake, "b-s00000", second, seed=5)
    synced = _refresh(layout, lake)
    assert not synced.rebuilt and synced.images_changed == 40
    library = Library(layout.root)
    assert library.lookup(first[0])["answered_by"] == "store"
    assert library.lookup(first[0])["sources_count"] == 2
    assert len(_every_md5(library)) == 160
    _assert_store_is_the_lake(library)
    # the second batch's shard again, other content, ingested earlier: rows replaced, some
    # md5s lose an occurrence, some leave the library, the first sources change
    replaced = first[20:50] + random_md5s(rng, 10)
    earlier = datetime.now(UTC) - timedelta(days=1)
    land_shard(layout, lake, "b-s00000", replaced, seed=9, ingested_at=earlier)
    synced = _refresh(layout, lake)
    assert not synced.rebuilt
    library = Library(layout.root)
    assert library.lookup(second[-1]) is None  # only the replaced shard had it
    assert library.lookup(first[25])["sources"][0].startswith("s3://landing/b/")
    _assert_store_is_the_lake(library)


def test_a_sync_leaves_no_wal_behind(tmp_path):
    """The pages a sync changed are copied into the file and the WAL cut to nothing: a sync
    of a large store dirties most of its pages, and a WAL as large as the store doubled its
    disk (measured at 9.1M images: a 13.7 GB WAL beside a 14.6 GB file)."""
    layout, lake = _lake(tmp_path / "library")
    rng = np.random.default_rng(8)
    land_shard(layout, lake, "a-s00000", random_md5s(rng, 300))
    _refresh(layout, lake)
    reader = Library(layout.root)  # a service's reader keeps its connection (and the WAL) open
    first = _every_md5(reader)[0]
    assert reader.lookup(first)["answered_by"] == "store"
    land_shard(layout, lake, "b-s00000", random_md5s(rng, 300), seed=1)
    _refresh(layout, lake)
    wal = Path(f"{layout.serving_store_path}-wal")
    assert wal.exists() and wal.stat().st_size == 0
    assert reader.lookup(first)["answered_by"] == "store"


def test_a_store_behind_the_lake_answers_from_the_lake_until_synced(tmp_path, caplog):
    layout, lake = _lake(tmp_path / "library")
    rng = np.random.default_rng(4)
    md5s = random_md5s(rng, 50)
    land_shard(layout, lake, "a-s00000", md5s)
    _refresh(layout, lake)
    more = random_md5s(rng, 5)
    land_shard(layout, lake, "b-s00000", more)
    merge_images(lake)  # images moved on, the store did not
    library = Library(layout.root)
    with caplog.at_level(logging.WARNING, logger="asset_library.library"):
        found = library.lookup(more[0])
    assert found is not None and found["answered_by"] == "lake"
    assert "behind the lake" in caplog.text
    sync(lake, layout.serving_store_path)
    assert library.lookup(more[0])["answered_by"] == "store"


def test_a_compaction_leaves_the_store_level_and_a_new_shard_does_not(tmp_path):
    """A compaction's rewrite and a vacuum change no row: the store answers across them
    without a sync (a merge of rows after them still puts it behind)."""
    layout, lake = _lake(tmp_path / "library")
    rng = np.random.default_rng(5)
    md5s = random_md5s(rng, 40)
    for number in range(3):
        land_shard(layout, lake, f"{'abc'[number]}-s00000", md5s[number * 10 : number * 10 + 10])
        _refresh(layout, lake)
    images, attributes = lake.open("images").version(), lake.open("attributes").version()
    done = compact(lake, fan_in=2, retention_hours=0)
    assert done["images"]["files_added"] and done["attributes"]["files_added"]
    assert lake.open("images").version() > images
    assert lake.open("attributes").version() > attributes
    library = Library(layout.root)
    for md5 in md5s[:30]:
        found = library.lookup(md5, fallback=False)
        assert found == {**library.lake_record(md5), "answered_by": "store"}, md5
    page = library.images_with_attribute("label", "cat", limit=1000)
    assert page["answered_by"] == "store"
    land_shard(layout, lake, "d-s00000", md5s[30:])
    merge_images(lake)
    with pytest.raises(StoreUnavailable, match="behind the lake"):
        library.lookup(md5s[35], fallback=False)
    sync(lake, layout.serving_store_path)
    assert library.lookup(md5s[35], fallback=False)["answered_by"] == "store"


def test_the_service_answers_from_the_store_or_the_lake_as_library_lookup_does(tmp_path):
    """The route's body is FastAPI's JSON of ``Library.lookup``, byte for byte, whether the
    store answers (on the event loop) or the lake does (the store behind: a worker thread)."""
    layout, lake = _lake(tmp_path / "library")
    rng = np.random.default_rng(6)
    md5s = random_md5s(rng, 40)
    land_shard(layout, lake, "a-s00000", md5s)
    _refresh(layout, lake)
    library = Library(layout.root)
    as_json = TypeAdapter(dict[str, Any]).dump_json
    settings = ServeSettings(library=layout.root, cache_dir=tmp_path / "cache")
    with LiveServer(create_app(settings)) as client:
        reply = client.get(f"/images/{md5s[0]}")
        assert reply.status == 200 and reply.headers["content-type"] == "application/json"
        assert reply.body == as_json(library.lookup(md5s[0]))
        assert reply.json()["answered_by"] == "store"
        assert client.get(f"/images/{'0' * 32}").status == 404
        more = random_md5s(rng, 3)
        land_shard(layout, lake, "b-s00000", more)
        merge_images(lake)  # images moved on, the store did not
        with pytest.raises(StoreUnavailable, match="behind the lake"):
            Library(layout.root).lookup(more[0], fallback=False)
        for md5 in (more[0], md5s[1]):
            reply = client.get(f"/images/{md5}")
            assert reply.status == 200 and reply.json()["answered_by"] == "lake"
            assert reply.body == as_json(library.lookup(md5))
        sync(lake, layout.serving_store_path)
        reply = client.get(f"/images/{more[0]}")
        assert reply.json()["answered_by"] == "store"
        assert reply.body == as_json(library.lookup(more[0]))


def test_an_image_with_many_sources_has_a_bounded_record_and_pages_them(tmp_path):
    """A manifest repeating one file 500 times: the record carries the first few sources and
    the count; the pages give every one, in order, past what the store keeps."""
    layout, lake = _lake(tmp_path / "library")
    md5 = random_md5s(np.random.default_rng(5), 1)[0]
    shard = "many-s00000"
    keys = write_keys(
        layout.keys_path(shard), batch="many", shard=shard, n_buckets=BUCKETS, md5s=[md5] * 500
    )
    rows = pq.read_table(keys).to_pylist()
    own = {k: v for k, v in rows[0].items() if k not in ("ordinal", "source_uri", "extras")}
    for n, row in enumerate(rows):  # one file: the same bytes, so the same image each time
        row.update(own, extras=json.dumps({"copy": n % 3}))
    pq.write_table(pa.Table.from_pylist(rows, schema=KEYS_SCHEMA), keys)
    write_shard(lake, shard, keys)
    _refresh(layout, lake)
    library = Library(layout.root)
    record = library.lookup(md5)
    assert record["answered_by"] == "store"
    assert record["sources_count"] == record["occurrences"] == 500
    assert len(record["sources"]) == RECORD_SOURCES
    assert len(json.dumps(record, default=str)) < 4096
    assert record["attributes"]["manifest"]["copy"] == [0, 1, 2]
    every = [f"s3://landing/many/{n}.jpg" for n in range(500)]
    assert record["sources"] == every[:RECORD_SOURCES]
    pages = [library.sources(md5, limit=100, offset=o) for o in range(0, 500, 100)]
    assert [uri for page in pages for uri in page["sources"]] == every
    assert pages[0]["answered_by"] == "lake"  # past the ten the store keeps
    first = library.sources(md5, limit=5, offset=0)
    assert first["answered_by"] == "store" and first["sources"] == every[:5]
    with pytest.raises(ValueError, match="limit"):
        library.sources(md5, limit=5000)
    _assert_store_is_the_lake(library)
    # 20 copies ingested earlier come first; their shard replaced by other images, the
    # store's first sources are read again from the lake
    earlier = datetime.now(UTC) - timedelta(days=1)
    early = layout.keys_path("early-s00000")
    rows = [
        {**row, "source_uri": f"s3://landing/early/{n}.jpg", "batch": "early",
         "shard": "early-s00000", "ingested_at": earlier}
        for n, row in enumerate(rows[:20])
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=KEYS_SCHEMA), early)
    write_shard(lake, "early-s00000", early)
    _refresh(layout, lake)
    # rebuilt, the store keeps the first ten of all only (the early ones): once they are
    # gone, the next ten are in no run and come from the lake
    sync(lake, layout.serving_store_path, rebuild=True)
    assert Library(layout.root).lookup(md5)["sources"] == [
        f"s3://landing/early/{n}.jpg" for n in range(RECORD_SOURCES)
    ]
    land_shard(layout, lake, "early-s00000", random_md5s(np.random.default_rng(6), 3))
    synced = _refresh(layout, lake)
    assert synced.refilled == 1 and not synced.rebuilt
    library = Library(layout.root)
    assert library.lookup(md5)["sources"] == every[:RECORD_SOURCES]
    _assert_store_is_the_lake(library)


# --------------------------------------------------------------------------------------------
# Runs: each sync appends one, runs of a tier merge


def test_which_runs_merge():
    def runs(*rows: int) -> list[Run]:
        return [Run(n + 1, r) for n, r in enumerate(rows)]

    small, tier6, tier7 = 100, 5_000_000, 20_000_000
    assert runs_to_merge([]) == 0
    assert runs_to_merge(runs(small, small, small)) == 0
    assert runs_to_merge(runs(small, small, small, small)) == 4
    assert runs_to_merge(runs(tier7, tier7, tier6, tier6, tier6)) == 0  # 3 a tier: wait
    assert runs_to_merge(runs(tier7, tier7, tier6, tier6, tier6, tier6)) == 4
    # small runs stranded between larger ones join the next merge over them
    assert runs_to_merge(runs(tier6, small, small, tier7)) == 0
    assert runs_to_merge(runs(tier6, small, small, tier7, tier7, tier7, tier7)) == 7
    assert parse_runs(format_runs(runs(tier7, small))) == runs(tier7, small)


def test_runs_merge_as_syncs_follow_and_every_answer_stays_the_lakes(tmp_path):
    """Nine shards, overlapping, one replaced: each sync writes a run, every fourth of a tier
    merges them, a merge of them all keeps no removal; the store answers as the lake does
    throughout, a reader that read runs since merged away too."""
    layout, lake = _lake(tmp_path / "library")
    rng = np.random.default_rng(21)
    pool = random_md5s(rng, 200)
    reader = Library(layout.root)  # kept across syncs: the runs it read are merged away
    merged = 0
    for number in range(9):
        land_shard(layout, lake, f"s{number}-s00000", pool[number * 15 : number * 15 + 30])
        if number == 5:  # a shard replaced: images and sources removed, counts lowered
            earlier = datetime.now(UTC) - timedelta(days=1)
            land_shard(layout, lake, "s2-s00000", pool[100:110], seed=3, ingested_at=earlier)
        synced = _refresh(layout, lake)
        merged += synced.runs_merged
        assert 1 <= synced.runs < FAN_IN
        library = Library(layout.root)
        _assert_store_is_the_lake(library)
        some = _every_md5(library)[number]
        assert reader.lookup(some) == library.lookup(some)
        assert reader.lookup(some)["answered_by"] == "store"
        for value in ("cat", "dog", "bird"):
            rows, after = [], ""
            while page := library.store_attribute_page(
                "label", value, origin=None, after=after, limit=5, images=True
            ):
                rows, after = rows + page, page[-1]["md5"]
            assert rows == library.lake_attribute_page(
                "label", value, origin=None, after="", limit=1000, images=True
            )
        if synced.runs == 1 and synced.runs_merged:  # merged whole: no removal kept
            with sqlite3.connect(layout.serving_store_path) as connection:
                (runs,) = connection.execute("SELECT value FROM meta WHERE key = 'runs'").fetchone()
                (run,) = parse_runs(runs)
                assert not connection.execute(
                    f"SELECT count(*) FROM images_{run.id} WHERE record IS NULL"
                ).fetchone()[0]
                assert not connection.execute(
                    f"SELECT count(*) FROM sources_{run.id} WHERE source_uri IS NULL"
                ).fetchone()[0]
    assert merged >= 2 * FAN_IN
