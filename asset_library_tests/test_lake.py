"""The lake on Delta Lake: shard commits, the images merge, readers through the log, S3."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, Field, write_deltalake
from deltalake.exceptions import CommitFailedError

from asset_library import Library
from asset_library.cli import main
from asset_library.defs.assets.library import lake_compaction
from asset_library.defs.resources import LibraryResource
from asset_library.ids import bucket_of
from asset_library.ingest.shard import KEYS_SCHEMA
from asset_library.lake import (
    IMAGE_COUNTS_SCHEMA,
    IMAGES_APP,
    SCHEMAS,
    Lake,
    attribute_part_sql,
    compact,
    is_outdated_index,
    merge_images,
    read_changes,
    row_count,
    value_type_of,
    write_shard,
)
from asset_library.lake.catalog import ATTRIBUTE_IMAGE_COLUMNS, LakeReadError
from asset_library.lake.compaction import _bucket_files, _merge_buckets
from asset_library.lake.merge import _merged_to
from asset_library.lake.scan import lake_dataset
from asset_library.lake.schemas import SORTED_BY_MD5
from asset_library.lake.table import write_settled
from asset_library.lake.tiers import DataFile, tier_of, within_budget
from asset_library.layout import LibraryLayout
from asset_library.serving import RECORD_SOURCES, sync
from asset_library.serving.runs import newest, parse_runs, union
from asset_library.similarity import IndexNotReady, SimilarityIndex
from asset_library_tests.support.synthetic import land_shard, random_md5s, write_keys

BUCKETS = 16
COUNTS = (
    "SELECT (SELECT count(*) FROM images) AS images, "
    "(SELECT coalesce(sum(occurrences), 0) FROM images) AS counted, "
    "(SELECT count(*) FROM occurrences) AS occurrences, "
    "(SELECT count(DISTINCT md5) FROM occurrences) AS distinct_md5s, "
    "(SELECT count(*) FROM rejects) AS rejects, "
    "(SELECT count(*) FROM attribute_occurrences) AS attribute_rows"
)


def _library(root: Path) -> tuple[LibraryLayout, Lake]:
    layout = LibraryLayout.open(root, BUCKETS)
    return layout, Lake.of(layout, {})


def _refresh(layout: LibraryLayout, lake: Lake) -> None:
    merge_images(lake)
    SimilarityIndex(layout).sync(lake)


def test_two_shards_land_at_once_and_merge_into_one_row_per_md5(tmp_path):
    layout, lake = _library(tmp_path / "library")
    lake.ensure()
    rng = np.random.default_rng(1)
    shared = random_md5s(rng, 50)
    a = shared + random_md5s(rng, 450)
    b = shared + random_md5s(rng, 250)
    start = threading.Barrier(2)

    def land(args):
        shard, md5s, seed = args
        start.wait()
        return land_shard(layout, lake, shard, md5s, seed=seed, rejects=2)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(land, [("a-s00000", a, 1), ("b-s00000", b, 2)]))
    merged = merge_images(lake)
    assert merged.inserted == 750 and merged.duplicated_md5s == 0
    assert sorted(merged.shards) == ["a-s00000", "b-s00000"]
    counts = Library(layout.root).query(COUNTS)[0]
    assert counts == {
        "images": 750,
        "counted": 800,
        "occurrences": 800,
        "distinct_md5s": 750,
        "rejects": 4,
        "attribute_rows": 800 * 6,
    }
    assert merge_images(lake).changed is False  # nothing new: no commit


def test_a_write_refused_by_a_commit_that_changed_no_shape_writes_again(tmp_path):
    """Machines whose first shards start side by side on a new lake each create its tables:
    delta-rs lands the later creations as metadata commits of the same shape, which refuse the
    commit of a writer that read the table before them. Such a writer writes again; a commit
    that changed the table's shape still refuses it."""
    layout, lake = _library(tmp_path / "library")
    uri = lake.uri("rejects")
    tries: list[int] = []

    def write(target: DeltaTable) -> None:
        tries.append(target.version())
        if len(tries) == 1:  # another writer's metadata commit lands after this one read
            DeltaTable(uri).alter.set_table_description("touched")
        write_deltalake(target, SCHEMAS["rejects"].empty_table(), mode="append")

    written = write_settled(lake, "rejects", write)
    assert tries == [0, 1] and written.version() == 2
    # A commit that changed the table's schema is never written over.
    tries.clear()

    def widen(target: DeltaTable) -> None:
        tries.append(target.version())
        DeltaTable(uri).alter.add_columns([Field("extra", "string")])
        write_deltalake(target, SCHEMAS["rejects"].empty_table(), mode="append")

    with pytest.raises(CommitFailedError):
        write_settled(lake, "rejects", widen)
    assert tries == [2]


def test_the_same_shard_written_twice_at_once_never_mixes(tmp_path):
    layout, lake = _library(tmp_path / "library")
    lake.ensure()
    rng = np.random.default_rng(2)
    one, two = random_md5s(rng, 300), random_md5s(rng, 300)
    keys = {}
    for name, md5s in (("one", one), ("two", two)):
        keys[name] = write_keys(
            tmp_path / f"{name}.parquet",
            batch="x",
            shard="x-s00000",
            n_buckets=BUCKETS,
            md5s=md5s,
        )
    start = threading.Barrier(2)

    def run(name):
        start.wait()
        try:
            write_shard(lake, "x-s00000", keys[name])
            return "ok"
        except CommitFailedError as error:
            return f"conflict: {error}"

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(run, ["one", "two"]))
    assert "ok" in outcomes
    rows = DeltaTable(lake.uri("occurrences")).to_pyarrow_table(columns=["md5"])
    found = set(rows["md5"].to_pylist())
    assert found in (set(one), set(two)) and rows.num_rows == 300  # one of them, whole


def test_a_replaced_shard_changes_exactly_its_counts_before_any_vacuum(tmp_path):
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(3)
    first = random_md5s(rng, 400)
    second = first[:100] + random_md5s(rng, 200)
    land_shard(layout, lake, "b-s00000", first, rejects=3)
    land_shard(layout, lake, "b-s00001", second, rejects=1)
    _refresh(layout, lake)
    library = Library(layout.root)
    phash = library.query("SELECT phash FROM images WHERE md5 = ?", [second[150]])[0]["phash"]
    assert library.query(COUNTS)[0] == {
        "images": 600,
        "counted": 700,
        "occurrences": 700,
        "distinct_md5s": 600,
        "rejects": 4,
        "attribute_rows": 700 * 6,
    }
    # the second shard again, other content: 20 of the first shard's md5s and 30 new ones,
    # ingested earlier than the first shard (so it becomes their first occurrence)
    replaced = first[380:] + random_md5s(rng, 30)
    land_shard(
        layout,
        lake,
        "b-s00001",
        replaced,
        seed=9,
        rejects=5,
        ingested_at=datetime.now(UTC) - timedelta(days=1),
    )
    # occurrences are newer than images until the merge: images still counts the old shard
    assert library.query("SELECT count(*) AS n FROM images")[0]["n"] == 600
    assert library.query("SELECT count(*) AS n FROM occurrences")[0]["n"] == 450
    merged = merge_images(lake)
    assert merged.shards == ["b-s00001"]
    assert library.query(COUNTS)[0] == {
        "images": 430,
        "counted": 450,
        "occurrences": 450,
        "distinct_md5s": 430,
        "rejects": 8,
        "attribute_rows": 450 * 6,
    }
    # an added occurrence counts, but the first seen stays (images rows are written once) ...
    gained = library.query("SELECT occurrences, shard FROM images WHERE md5 = ?", [first[390]])
    assert gained == [{"occurrences": 2, "shard": "b-s00000"}]
    assert library.lookup(first[390])["occurrences"] == 2
    # ... and an md5 that lost an occurrence is recomputed from the ones left
    kept = library.query("SELECT occurrences, shard FROM images WHERE md5 = ?", [first[10]])
    assert kept == [{"occurrences": 1, "shard": "b-s00000"}]
    assert library.lookup(first[10])["occurrences"] == 1
    assert library.query("SELECT count(*) AS n FROM images WHERE md5 = ?", [second[150]]) == [
        {"n": 0}
    ]
    # the index follows: gone md5s are not found, new ones are
    SimilarityIndex(layout).sync(lake)
    assert [r["md5"] for r in library.similar(replaced[-1], max_distance=0)] == [replaced[-1]]
    with pytest.raises(ValueError, match="no image"):
        library.similar(second[150])
    index = SimilarityIndex(layout)
    assert len(index) == 430
    # compaction keeps every count and leaves about one file per bucket; the index, following
    # the rewritten images files, holds each image once still
    before = library.query(COUNTS)[0]
    versions = {t: DeltaTable(lake.uri(t)).version() for t in ("occurrences", "images")}
    compact(lake, fan_in=2)
    assert library.query(COUNTS)[0] == before
    # its sorted rewrite changes no row: the change feed the merge and the index read skips it
    moved = [name for name, version in versions.items()
             if DeltaTable(lake.uri(name)).version() > version]  # fmt: skip
    assert moved
    for name in moved:
        table = DeltaTable(lake.uri(name))
        assert read_changes(lake, table, versions[name] + 1, table.version(), ["md5"]).num_rows == 0
    assert merge_images(lake).md5s == 0  # a merge over nothing but a compaction
    files = DeltaTable(lake.uri("occurrences")).file_uris()
    assert len(files) <= BUCKETS
    synced = SimilarityIndex(layout).sync(lake)
    assert synced.added == [] and synced.removed == [] and synced.images == 430
    # an md5 that left and comes back keeps its one entry (its hashes are its bytes'; the
    # synthetic rows draw other ones, so the entry is found by the hash it had)
    land_shard(layout, lake, "b-s00002", [second[150]])
    _refresh(layout, lake)
    index = SimilarityIndex(layout)
    assert len(index) == 431 and second[150] not in index.removed
    assert index.query(int(phash, 16), 0) == [(second[150], 0)]


TRUE_COUNTS = (
    "SELECT (SELECT list((md5, n) ORDER BY md5) FROM (SELECT md5, count(*) AS n "
    "FROM occurrences GROUP BY md5)) AS truth, "
    "(SELECT list((md5, occurrences) ORDER BY md5) FROM images) AS shown"
)


def _counts_are_true(library: Library) -> None:
    found = library.query(TRUE_COUNTS)[0]
    assert found["shown"] == found["truth"]


def test_repeats_append_counts_and_rewrite_no_images_file(tmp_path):
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(14)
    first = random_md5s(rng, 300)
    land_shard(layout, lake, "r-s00000", first)
    _refresh(layout, lake)
    files = set(DeltaTable(lake.uri("images")).file_uris())
    second = first[:60] + random_md5s(rng, 140)
    land_shard(layout, lake, "r-s00001", second)
    third = first[:30] + second[100:130] + random_md5s(rng, 40)
    land_shard(layout, lake, "r-s00002", third)
    merged = merge_images(lake)
    assert (merged.inserted, merged.updated, merged.deleted) == (180, 60, 0)
    after = set(DeltaTable(lake.uri("images")).file_uris())
    assert files <= after  # appended only: every file of the first merge is still live
    counts = DeltaTable(lake.uri("image_counts")).to_pyarrow_table()
    assert counts.num_rows == 60  # first[:60] gained; the new md5s carry their count
    assert merged.duplicated_md5s == 0
    library = Library(layout.root)
    _counts_are_true(library)
    assert library.query("SELECT count(*) AS n FROM images")[0]["n"] == 480
    assert library.lookup(first[0])["occurrences"] == 3
    assert library.query("SELECT occurrences FROM image(?)", [first[0]]) == [{"occurrences": 3}]
    assert library.lookup(second[100])["occurrences"] == 2
    # a merge cut after its image_counts commit finishes without counting twice
    land_shard(layout, lake, "r-s00003", first[:10])

    cut = lake.open("occurrences").version()
    rows = pa.table(
        {
            "md5": first[:10],
            "occurrences": [1] * 10,
            "bucket": [bucket_of(m, BUCKETS) for m in first[:10]],
        }
    ).cast(IMAGE_COUNTS_SCHEMA)
    write_deltalake(
        lake.table("image_counts"), rows, mode="append", commit_properties=_merged_to(cut)
    )
    assert lake.open("image_counts").transaction_version(IMAGES_APP) == cut
    merge_images(lake)
    _counts_are_true(Library(layout.root))
    # a shard replaced (before any vacuum): its md5s are recomputed, the others untouched
    land_shard(layout, lake, "r-s00001", second[:30] + random_md5s(rng, 5))
    merged = merge_images(lake)
    assert merged.deleted == 140 - 30  # second[100:130] stay: they are in r-s00002 too
    library = Library(layout.root)
    _counts_are_true(library)
    assert library.lookup(first[0])["occurrences"] == 4
    assert library.lookup(second[140]) is None
    assert library.lookup(second[110])["occurrences"] == 1
    # compaction sums image_counts per md5 and keeps every count
    compact(lake, fan_in=1)
    summed = DeltaTable(lake.uri("image_counts")).to_pyarrow_table()
    assert summed.num_rows == len(set(summed["md5"].to_pylist()))
    _counts_are_true(Library(layout.root))
    assert Library(layout.root).query("SELECT count(*) AS n FROM images")[0]["n"] == 480 - 110 + 5


def test_the_change_feed_skips_rewrites_by_their_true_version(tmp_path):
    """A handle loaded before a compaction's rewrite committed still reads the shard commit
    before it (delta-rs numbers a stale handle's history from its own version)."""
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(24)
    land_shard(layout, lake, "v-s00000", random_md5s(rng, 100))
    land_shard(layout, lake, "v-s00001", random_md5s(rng, 100), seed=1)
    stale = DeltaTable(lake.uri("occurrences"))
    shard_version = stale.version()
    compact(lake, fan_in=2)  # rewrites occurrences' buckets: the next version
    assert DeltaTable(lake.uri("occurrences")).version() == shard_version + 1
    inserted = read_changes(lake, stale, shard_version, shard_version, ["md5"])
    assert inserted.num_rows == 100
    rewrite = read_changes(lake, stale, shard_version + 1, shard_version + 1, ["md5"])
    assert rewrite.num_rows == 0 and "_commit_timestamp" in rewrite.column_names


def test_a_merge_reports_an_md5_its_buckets_hold_twice(tmp_path):
    layout, lake = _library(tmp_path / "library")
    md5s = random_md5s(np.random.default_rng(21), 200)
    land_shard(layout, lake, "u-s00000", md5s)
    assert merge_images(lake).duplicated_md5s == 0
    # an images row written twice (what a broken writer would leave)
    twice = DeltaTable(lake.uri("images")).to_pyarrow_table(filters=[("md5", "=", md5s[7])])
    write_deltalake(lake.table("images"), twice, mode="append")
    # the next merge touches that md5 (another occurrence of it) and an unrelated new one
    land_shard(layout, lake, "u-s00001", [md5s[7], *random_md5s(np.random.default_rng(22), 5)])
    merged = merge_images(lake)
    assert merged.duplicated_md5s == 1 and merged.inserted == 5


def test_a_lake_without_image_counts_reads_and_merges(tmp_path):
    """A lake of the layout before image_counts (images rewritten by each merge) is read as
    it is, and the next merge starts the table."""
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(15)
    first = random_md5s(rng, 100)
    land_shard(layout, lake, "o-s00000", first + first[:20])
    _refresh(layout, lake)
    shutil.rmtree(lake.uri("image_counts"))
    library = Library(layout.root)
    _counts_are_true(library)
    assert library.lookup(first[0])["occurrences"] == 2
    land_shard(layout, lake, "o-s00001", first[:50])
    _refresh(layout, lake)
    _counts_are_true(Library(layout.root))
    assert Library(layout.root).lookup(first[0])["occurrences"] == 3


def test_manifest_values_are_text_typed_by_their_spelling(tmp_path):
    layout, lake = _library(tmp_path / "library")
    values = {
        "i": ("42", "integer"),
        "neg": ("-7", "integer"),
        "zero_lead": ("007", "string"),
        "d": ("3.5", "double"),
        "trail": ("1.10", "string"),
        "exp": ("1e5", "string"),
        "t": ("true", "boolean"),
        "T": ("True", "string"),
        "day": ("2024-02-29", "timestamp"),
        "when": ("2024-02-29 12:30:00", "timestamp"),
        "bad_day": ("2023-02-29", "string"),
        "s": ("cat", "string"),
    }
    extras = {k: v for k, (v, _) in values.items()}
    extras.update(num=12, flt=0.25, flag=False, gone=None)
    md5 = random_md5s(np.random.default_rng(4), 1)
    keys = write_keys(
        layout.keys_path("t-s00000"), batch="t", shard="t-s00000", n_buckets=BUCKETS, md5s=md5
    )
    table = pq.read_table(keys).to_pylist()
    table[0]["extras"] = json.dumps(extras)
    pq.write_table(pa.Table.from_pylist(table, schema=KEYS_SCHEMA), keys)
    write_shard(lake, "t-s00000", keys)
    found = Library(layout.root).query(
        "SELECT attribute, value, value_type FROM attribute_occurrences WHERE origin = 'manifest'"
    )
    typed = {r["attribute"]: (r["value"], r["value_type"]) for r in found}
    expected = dict(values)
    expected.update(num=("12", "integer"), flt=("0.25", "double"), flag=("false", "boolean"))
    assert typed == expected


def test_the_cube_writer_is_vectorised(tmp_path):
    """20k images, 6 attributes each, in well under a second of Python (no row loop)."""
    import time

    layout, lake = _library(tmp_path / "library")
    md5s = random_md5s(np.random.default_rng(5), 20_000)
    keys = write_keys(
        layout.keys_path("c-s00000"), batch="c", shard="c-s00000", n_buckets=BUCKETS, md5s=md5s
    )
    started = time.perf_counter()
    written = write_shard(lake, "c-s00000", keys)
    assert written["attributes"]["rows"] == 120_000
    assert time.perf_counter() - started < 30


def _expected_cube(keys: Path) -> list[tuple]:
    """The cube's rows of a keys file, spelled out in Python for plain values (text typed by
    its spelling, :func:`value_type_of`)."""
    typed = {bool: "boolean", int: "integer", float: "double"}
    spelled: dict[str, str] = {}
    rows = []
    for r in pq.read_table(keys).to_pylist():
        if r["status"] != "ok":
            continue
        common = (r["source_uri"], r["batch"], r["shard"], r["bucket"])
        for key, value in json.loads(r["extras"] or "{}").items():
            if value is not None:
                if isinstance(value, str):
                    if value not in spelled:
                        spelled[value] = value_type_of(value)
                    text, kind = value, spelled[value]
                else:
                    text, kind = json.dumps(value), typed[type(value)]
                rows.append((r["md5"], key, text, kind, "manifest", *common))
        when = r["captured_at"] or ""
        derived = {
            "exif.make": (r["camera_make"] or None, "string"),
            "exif.model": (r["camera_model"] or None, "string"),
            "exif.captured_at": (
                when[:10].replace(":", "-") + when[10:] if when.startswith("20") else None,
                "timestamp",
            ),
            "image.aspect_ratio": (str(round(r["width"] / r["height"], 4)), "double"),
            "image.megapixels": (str(round(r["width"] * r["height"] / 1e6, 3)), "double"),
            "image.animated": ("true" if r["frames"] > 1 else "false", "boolean"),
        }
        for name, (value, kind) in derived.items():
            if value is not None:
                rows.append((r["md5"], name, value, kind, "derived", *common))
    return rows


def test_the_cube_holds_each_images_rows_sorted_by_md5_in_every_file(tmp_path):
    """Manifest values of every JSON kind (a null is no row) and odd keys, EXIF present, empty,
    or not a date, images without extras, and a repeated md5: the cube's rows are exactly these, and
    every bucket file is sorted by md5 (a lookup reads one row group of it)."""
    layout, lake = _library(tmp_path / "library")
    md5s = random_md5s(np.random.default_rng(9), 3000)
    md5s[7] = md5s[3]  # the same image twice in a shard: its rows twice
    keys = write_keys(
        layout.keys_path("o-s00000"),
        batch="o",
        shard="o-s00000",
        n_buckets=BUCKETS,
        md5s=md5s,
        rejects=5,
    )
    rows = pq.read_table(keys).to_pylist()
    for n, row in enumerate(rows[:3000]):
        row["extras"] = [
            None,
            json.dumps({}),
            json.dumps({"label": "cat", "gone": None, "n": 12, "ok": True, "x": 0.25}),
            json.dumps({"tags": "a,b", "": "empty key", 'q"/~': "odd key"}),
            json.dumps({"note": "49.25", "code": "007", "day": "2024-02-29", "count": "42"}),
        ][n % 5]
        row["width"], row["height"] = [(300, 200), (100, 300), (640, 480), (4000, 3000)][n % 4]
        row["camera_make"] = ["Canon", "", None][n % 3]
        row["camera_model"] = ["EOS 5D", None][n % 2]
        row["captured_at"] = ["2024:02:29 12:30:00", "0000:00:00 00:00:00", None][n % 3]
        row["frames"] = 1 + n % 2
    pq.write_table(pa.Table.from_pylist(rows, schema=KEYS_SCHEMA), keys)
    written = write_shard(lake, "o-s00000", keys)

    cube = DeltaTable(lake.uri("attributes"))
    found = pa.table(cube.to_pyarrow_table()).select(SCHEMAS["attributes"].names).to_pylist()
    assert written["attributes"]["rows"] == len(found)
    assert sorted(tuple(r.values()) for r in found) == sorted(_expected_cube(keys))
    for uri in cube.file_uris():
        in_file = pq.read_table(uri.removeprefix("file://"), columns=["md5"])["md5"].to_pylist()
        assert len(in_file) > 100 and in_file == sorted(in_file)


def test_lookup_reads_one_bucket_and_a_damaged_bucket_breaks_only_itself(tmp_path):
    layout, lake = _library(tmp_path / "library")
    md5s = random_md5s(np.random.default_rng(6), 400)
    land_shard(layout, lake, "d-s00000", md5s)
    _refresh(layout, lake)
    compact(lake, fan_in=2)
    library = Library(layout.root)
    target = md5s[0]
    damaged_bucket = (bucket_of(target, BUCKETS) + 1) % BUCKETS
    for table in ("images", "occurrences", "attributes"):
        for uri in DeltaTable(lake.uri(table)).file_uris():
            if f"bucket={damaged_bucket}/" in uri:
                path = Path(uri.removeprefix("file://"))
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # truncated
    fresh = Library(layout.root)
    image = fresh.lookup(target)
    assert image is not None and image["md5"] == target and image["sources"]
    victim = next(m for m in md5s if bucket_of(m, BUCKETS) == damaged_bucket)
    with pytest.raises(LakeReadError, match=f"cannot read bucket {damaged_bucket} of images"):
        fresh.lookup(victim)
    other = (damaged_bucket + 2) % BUCKETS
    assert fresh.query(f"SELECT count(*) AS n FROM images WHERE bucket = {other}")[0]["n"] > 0
    # a count is the log's per-file row counts: no data file is opened, the damaged ones neither
    assert fresh.query("SELECT count(*) AS n FROM images")[0]["n"] == 400
    damaged = sum(bucket_of(m, BUCKETS) == damaged_bucket for m in md5s)
    by_bucket = f"SELECT count(*) AS n FROM occurrences WHERE bucket = {damaged_bucket}"
    assert fresh.query(by_bucket)[0]["n"] == damaged
    # a text filter beside the bucket goes down too, and still opens only that bucket's files
    assert fresh.query(f"SELECT md5 FROM image('{target}')") == [{"md5": target}]
    cube = f"SELECT count(*) AS n FROM attribute_occurrences WHERE bucket = {other} AND "
    assert fresh.query(cube + "attribute = 'label' AND value >= 'a'")[0]["n"] > 0
    # an attribute query reads the attribute index alone, which no damaged file is part of
    cats = fresh.query("SELECT count(*) AS n FROM images_with_attribute('label', 'cat')")
    indexed = fresh.query("SELECT count(*) AS n FROM md5s_with_attribute('label', 'cat')")
    assert cats == indexed and cats[0]["n"] > 0
    with pytest.raises(duckdb.Error):
        fresh.query("SELECT count(*) AS n FROM images WHERE width > 0")
    del library


def _md5_row_groups(lake: Lake, table: str, md5: str) -> tuple[int, int, int]:
    """(files, row groups, row groups statistics leave for md5 = X) of a table's bucket of X."""
    dataset = lake_dataset(lake.open(table), lake)
    key = (pc.field("bucket") == bucket_of(md5, lake.n_buckets)) & (pc.field("md5") == md5)
    fragments = list(dataset.get_fragments(filter=key))
    groups = sum(f.num_row_groups for f in fragments)
    kept = sum(f.subset(filter=key, schema=dataset.schema).num_row_groups for f in fragments)
    return len(fragments), groups, kept


def _index_row_groups(lake: Lake) -> tuple[int, int, int]:
    """(files, row groups, row groups statistics leave) of the attribute index that a query
    for label = 'cat' reads: its partition's files only."""
    dataset = lake_dataset(lake.open("attribute_index"), lake)
    with duckdb.connect() as connection:
        part = connection.sql("SELECT " + attribute_part_sql("'label'")).fetchall()[0][0]
    cat = (
        (pc.field("part") == part)
        & (pc.field("attribute") == "label")
        & (pc.field("value") == "cat")
    )
    fragments = list(dataset.get_fragments(filter=cat))
    assert len(fragments) < len(list(dataset.get_fragments()))
    groups = sum(f.num_row_groups for f in fragments)
    kept = sum(f.subset(filter=cat, schema=dataset.schema).num_row_groups for f in fragments)
    return len(fragments), groups, kept


def test_text_filters_reach_pyarrow_and_skip_row_groups(tmp_path):
    layout = LibraryLayout.open(tmp_path / "library", 2)
    lake = Lake.of(layout, {})
    rng = np.random.default_rng(12)
    cats: set[str] = set()
    for shard, md5s in (
        ("p-s00000", random_md5s(rng, 14_000)),
        ("p-s00001", random_md5s(rng, 6000)),
    ):
        keys = write_keys(
            layout.keys_path(shard), batch="p", shard=shard, n_buckets=2, md5s=md5s, seed=len(md5s)
        )
        rows = pq.read_table(keys, columns=["md5", "extras"]).to_pylist()
        cats |= {r["md5"] for r in rows if json.loads(r["extras"])["label"] == "cat"}
        write_shard(lake, shard, keys)
        merge_images(lake)
    again = write_keys(  # a re-run, later: its md5s are rewritten by a MERGE
        layout.keys_path("p-s00001"),
        batch="p",
        shard="p-s00001",
        n_buckets=2,
        md5s=md5s,
        seed=len(md5s),
        ingested_at=datetime.now(UTC) + timedelta(hours=1),
    )
    write_shard(lake, "p-s00001", again)
    merge_images(lake)
    # the MERGE wrote images with text as string_view: the case pyarrow cannot prune itself
    image_files = [u.removeprefix("file://") for u in DeltaTable(lake.uri("images")).file_uris()]
    assert any(pq.read_schema(f).field("md5").type == pa.string_view() for f in image_files)
    library = Library(layout.root)
    query = "SELECT md5 FROM images_with_attribute('label', 'cat')"
    assert {r["md5"] for r in library.query(query)} == cats
    some = sorted(cats)[len(cats) // 2]
    assert library.query(f"SELECT md5 FROM images WHERE md5 = '{some}'") == [{"md5": some}]
    above = library.query(f"SELECT count(*) AS n FROM images WHERE md5 > '{some}' AND bucket = 1")
    assert above[0]["n"] == sum(
        1 for m in library.query("SELECT md5 FROM images WHERE bucket = 1") if m["md5"] > some
    )
    # the attribute index: one partition's files (one per shard) of the table's many
    files, groups, kept = _index_row_groups(lake)
    assert files == 2 and kept <= 2 * files, (files, groups, kept)
    # occurrences and the cube are written by md5 (images too, but for the MERGE's files): a
    # lookup reads one row group of each of its bucket's files, statistics skip the others
    for table in ("occurrences", "attributes"):
        files, groups, kept = _md5_row_groups(lake, table, some)
        assert kept <= files < groups, (table, files, groups, kept)
    # compaction sorts each bucket's merged files again (images' in plain string): still
    # pruned, same answers (every bucket merged whole: fan-in 1)
    compact(lake, fan_in=1)
    for table in ("images", "occurrences", "attributes"):
        files, groups, kept = _md5_row_groups(lake, table, some)
        assert files == 1 and kept == 1 < groups, (table, files, groups, kept)
    library = Library(layout.root)
    assert {r["md5"] for r in library.query(query)} == cats
    assert library.lookup(some)["md5"] == some


def _expected_with_value(library: Library, attribute: str, value: str) -> list[dict]:
    """``images_with_attribute`` worked out from the occurrences and the cube, in Python: per
    md5 the first occurrence (by ingested_at, shard, ordinal) that carried the value."""
    carried = {
        (row["md5"], row["shard"], row["source_uri"])
        for row in library.query(
            "SELECT md5, shard, source_uri FROM attribute_occurrences WHERE attribute = ? "
            "AND value = ?",
            [attribute, value],
        )
    }
    first: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for row in library.query("SELECT * FROM occurrences"):
        key = (row["md5"], row["shard"], row["source_uri"])
        if key not in carried:
            continue
        counts[row["md5"]] = counts.get(row["md5"], 0) + 1
        best = first.get(row["md5"])
        rank = (row["ingested_at"], row["shard"], row["ordinal"])
        if best is None or rank < (best["ingested_at"], best["shard"], best["ordinal"]):
            first[row["md5"]] = row
    columns = [c for c in ATTRIBUTE_IMAGE_COLUMNS if c != "occurrences_with_value"]
    return [
        {**{c: first[m][c] for c in columns}, "occurrences_with_value": counts[m]}
        for m in sorted(first)
    ]


def test_an_attribute_query_reads_the_index_alone_and_agrees_with_the_occurrences(tmp_path):
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(21)
    first = random_md5s(rng, 300)
    land_shard(layout, lake, "w-s00000", first, seed=1)
    # later: 100 of them again (their label drawn again), and one source listed twice
    keys = write_keys(
        layout.keys_path("w-s00001"),
        batch="w",
        shard="w-s00001",
        n_buckets=BUCKETS,
        md5s=first[:100] + random_md5s(rng, 100),
        seed=2,
        ingested_at=datetime.now(UTC) + timedelta(hours=1),
    )
    rows = pq.read_table(keys)
    earlier = pq.read_table(layout.keys_path("w-s00000")).slice(0, 100)
    for name in ("size_bytes", "format", "width", "height", "orientation", "frames", "quality"):
        # an image's own columns come from its bytes: the same in each of its occurrences
        same = pa.concat_arrays([earlier[name].combine_chunks(), rows[name][100:].combine_chunks()])
        rows = rows.set_column(rows.schema.get_field_index(name), name, same)
    # ordinals count across a batch: far from 0 in a later shard
    far = pc.add(rows["ordinal"], pa.scalar(10**12, pa.int64()))
    rows = rows.set_column(rows.schema.get_field_index("ordinal"), "ordinal", far)
    twin = rows.slice(0, 1)
    twin = twin.set_column(
        twin.schema.get_field_index("ordinal"), "ordinal", pa.array([10**12 + 999])
    )
    # a manifest key named as a derived attribute, with the derived value: one occurrence
    extras = rows["extras"].to_pylist()
    extras[150] = json.dumps({**json.loads(extras[150]), "image.animated": "false"})
    rows = rows.set_column(rows.schema.get_field_index("extras"), "extras", pa.array(extras))
    pq.write_table(pa.concat_tables([rows, twin]), keys)
    write_shard(lake, "w-s00001", keys)
    _refresh(layout, lake)
    library = Library(layout.root)
    twice = library.query(
        "SELECT occurrences_with_value AS n FROM images_with_attribute('label', ?) WHERE md5 = ?",
        [json.loads(rows["extras"][0].as_py())["label"], first[0]],
    )
    assert twice[0]["n"] >= 2  # both listings of the source carried it; no row twice
    animated = library.query(
        "SELECT occurrences_with_value AS n FROM images_with_attribute(?, ?) WHERE md5 = ?",
        ["image.animated", "false", rows["md5"][150].as_py()],
    )
    assert animated == [{"n": 1}]
    found = library.query(
        "SELECT * FROM images_with_attribute(?, ?) ORDER BY md5", ["image.animated", "false"]
    )
    assert found == _expected_with_value(library, "image.animated", "false")
    labels = library.query(
        "SELECT DISTINCT value FROM attribute_occurrences WHERE attribute = ?", ["label"]
    )
    for label in sorted(r["value"] for r in labels):
        query = "SELECT * FROM images_with_attribute('label', ?) ORDER BY md5"
        found = library.query(query, [label])
        assert found == _expected_with_value(library, "label", label) and found, label
        # an image seen once has its images row's columns
        single = library.query(
            f"SELECT {', '.join(ATTRIBUTE_IMAGE_COLUMNS[:-1])} FROM images "
            "WHERE occurrences = 1 AND md5 IN "
            "(SELECT md5 FROM md5s_with_attribute('label', ?)) ORDER BY md5",
            [label],
        )
        by_md5 = {r["md5"]: r for r in found}
        assert single and all({k: by_md5[r["md5"]][k] for k in r} == r for r in single), label


def _outdate_index(lake: Lake) -> None:
    """Make the attribute index one of the layout before it covered the image."""
    old = DeltaTable(lake.uri("attributes")).to_pyarrow_table(
        columns=["attribute", "value", "md5", "bucket", "shard"]
    )
    old = old.append_column("part", pa.array([0] * old.num_rows, pa.int32()))
    write_deltalake(
        lake.uri("attribute_index"),
        old,
        mode="overwrite",
        schema_mode="overwrite",
        partition_by=["part"],
    )


def test_a_lake_without_the_attribute_index_answers_and_gains_it_whole(tmp_path, capsys):
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(16)
    for number in range(2):
        land_shard(layout, lake, f"i-s0000{number}", random_md5s(rng, 200), seed=number)
    _refresh(layout, lake)
    truth = (
        "SELECT (SELECT list(DISTINCT md5 ORDER BY md5) FROM attribute_occurrences "
        "WHERE attribute = 'label' AND value = 'cat') AS truth, "
        "(SELECT list(md5 ORDER BY md5) FROM images_with_attribute('label', 'cat')) AS found, "
        "(SELECT list(md5 ORDER BY md5) FROM md5s_with_attribute('label', 'cat')) AS indexed"
    )
    found = Library(layout.root).query(truth)[0]
    assert found["found"] == found["indexed"] == found["truth"] and len(found["truth"]) > 20
    shutil.rmtree(lake.uri("attribute_index"))  # as a lake written before the index
    found = Library(layout.root).query(truth)[0]
    assert found["found"] == found["indexed"] == found["truth"]
    # the next shard's write starts the index from the cube, then replaces its own rows
    land_shard(layout, lake, "i-s00001", random_md5s(rng, 100), seed=5)
    land_shard(layout, lake, "i-s00002", random_md5s(rng, 100), seed=6)
    _refresh(layout, lake)
    index = DeltaTable(lake.uri("attribute_index")).to_pyarrow_table(columns=["shard"])
    assert index.num_rows == 400 * 6  # i-s00001 replaced: 200 + 100 + 100 images
    found = Library(layout.root).query(truth)[0]
    assert found["found"] == found["indexed"] == found["truth"]
    # an index of the layout before it covered the image's columns: read from the cube until
    # the next shard's write rebuilds it
    rows = "SELECT * FROM images_with_attribute('label', 'cat') ORDER BY md5"
    library = Library(layout.root)
    covered = library.query(rows)
    assert covered == _expected_with_value(library, "label", "cat")
    _outdate_index(lake)
    assert Library(layout.root).query(rows) == covered
    compact(lake, fan_in=1)  # leaves it to the next write to rebuild, and answers the same
    assert is_outdated_index("attribute_index", lake.open("attribute_index"))
    assert Library(layout.root).query(rows) == covered
    land_shard(layout, lake, "i-s00002", random_md5s(rng, 100), seed=6)
    rebuilt = DeltaTable(lake.uri("attribute_index"))
    assert "size_bytes" in {f.name for f in rebuilt.schema().fields}
    library = Library(layout.root)
    assert library.query(rows) == _expected_with_value(library, "label", "cat") != covered
    found = Library(layout.root).query(truth)[0]
    assert found["found"] == found["indexed"] == found["truth"]
    assert rebuilt.to_pyarrow_table(columns=["shard"]).num_rows == 400 * 6
    # or at once, by the migrate command, before shards are written side by side
    _outdate_index(lake)
    capsys.readouterr()
    assert main(["migrate", "--library", str(layout.root)]) == 0
    assert "attribute index rebuilt to cover the image (2,400 rows)" in capsys.readouterr().out
    library = Library(layout.root)
    assert library.query(rows) == _expected_with_value(library, "label", "cat")
    assert main(["migrate", "--library", str(layout.root)]) == 0
    assert "nothing to migrate" in capsys.readouterr().out


def test_sorting_the_cube_from_an_older_version_never_brings_back_replaced_rows(tmp_path):
    """Compaction's commit removes the files it read: one removed meanwhile fails it."""
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(13)
    land_shard(layout, lake, "q-s00000", random_md5s(rng, 300))
    land_shard(layout, lake, "q-s00001", random_md5s(rng, 300))
    read = lake.open("attributes")  # what the compaction read
    land_shard(layout, lake, "q-s00000", random_md5s(rng, 100))  # the shard replaced meanwhile
    plan = _bucket_files(read, "attributes")
    with pytest.raises(CommitFailedError):  # it removed files the sort would rewrite
        _merge_buckets(read, "attributes", plan)
    found = Library(layout.root).query(
        "SELECT shard, count(*) AS n FROM attribute_occurrences GROUP BY shard ORDER BY shard"
    )
    assert found == [{"shard": "q-s00000", "n": 600}, {"shard": "q-s00001", "n": 1800}]
    # a shard that only adds files meanwhile does not conflict, and its rows stay
    read = lake.open("attributes")
    land_shard(layout, lake, "q-s00002", random_md5s(rng, 50))
    _merge_buckets(read, "attributes", _bucket_files(read, "attributes"))
    assert row_count(lake.open("attributes")) == (100 + 300 + 50) * 6


def _unreferenced(lake: Lake, table: str) -> set[str]:
    """Data files in the table's folder that its log does not list as live."""
    root = Path(lake.uri(table))
    live = set(pa.table(lake.open(table).get_add_actions(flatten=True))["path"].to_pylist())
    return {p.relative_to(root).as_posix() for p in root.rglob("*.parquet")} - live


def test_a_merge_that_cannot_commit_or_never_did_leaves_no_file_behind(tmp_path):
    """A merge refused by a concurrent replace deletes the files it wrote; a file a crashed
    merge wrote and never committed (listed by no commit) is vacuumed once old enough."""
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(17)
    land_shard(layout, lake, "o-s00000", random_md5s(rng, 200))
    land_shard(layout, lake, "o-s00001", random_md5s(rng, 200))
    read = lake.open("occurrences")
    land_shard(layout, lake, "o-s00000", random_md5s(rng, 100))  # replaced meanwhile
    replaced = _unreferenced(lake, "occurrences")  # the replaced shard's files, tombstoned
    with pytest.raises(CommitFailedError):
        _merge_buckets(read, "occurrences", _bucket_files(read, "occurrences"))
    assert _unreferenced(lake, "occurrences") == replaced
    # a crashed merge's file, a month old: listed by no commit, not even as removed
    root = Path(lake.uri("occurrences"))
    (live, *_) = sorted(_paths(lake, "occurrences", 3))
    crashed = root / "bucket=3" / "part-00000-0c2a5e0e-0000-4000-8000-000000000000-c000.parquet"
    shutil.copyfile(root / live, crashed)
    month_ago = (datetime.now(UTC) - timedelta(days=30)).timestamp()
    os.utime(crashed, (month_ago, month_ago))
    compact(lake)
    assert not crashed.exists()
    assert _unreferenced(lake, "occurrences") == replaced  # removed too recently: kept


def _paths(lake: Lake, table: str, bucket: int) -> set[str]:
    """The live files of one bucket of a table, by the add actions' paths."""
    actions = pa.table(lake.open(table).get_add_actions(flatten=True))
    return {
        path
        for path, found in zip(
            actions["path"].to_pylist(), actions["partition.bucket"].to_pylist(), strict=True
        )
        if found == bucket
    }


def _file_sizes(lake: Lake, table: str) -> dict[str, int]:
    actions = pa.table(lake.open(table).get_add_actions(flatten=True))
    return dict(zip(actions["path"].to_pylist(), actions["size_bytes"].to_pylist(), strict=True))


def _each_file_sorted(lake: Lake, table: str, written: set[str]) -> None:
    """Every live file of a table holds its rows by md5 (then as its writer sorts them, for the
    files compaction wrote: ``written``), and the log's md5 bounds of each are its least and
    greatest md5."""
    declared = [c.strip() for c in SORTED_BY_MD5[table].split(",") if c.strip() != "bucket"]
    actions = pa.table(lake.open(table).get_add_actions(flatten=True))
    for path, low, high in zip(
        *(actions[c].to_pylist() for c in ("path", "min.md5", "max.md5")), strict=True
    ):
        order = declared if path in written else ["md5"]
        read = pq.read_table(Path(lake.uri(table)) / path, columns=order)
        assert read.sort_by([(name, "ascending") for name in order]).equals(read), path
        assert (low, high) == (min(read["md5"].to_pylist()), max(read["md5"].to_pylist()))


def _rows(lake: Lake) -> dict[str, list[dict]]:
    """Every table's rows, in one order (``image_counts``: its sum per md5)."""
    found = {}
    for name in SCHEMAS:
        rows = lake.open(name).to_pyarrow_table().cast(SCHEMAS[name])
        if name == "image_counts":
            rows = rows.group_by("md5").aggregate([("occurrences", "sum")])
            rows = rows.filter(pc.field("occurrences_sum") != 0)
        found[name] = rows.sort_by([(c, "ascending") for c in rows.column_names]).to_pylist()
    return found


def _store_rows(path: Path) -> dict[str, list[tuple]]:
    """What a serving store holds, its runs combined (each image's newest record, counts
    added up, attribute values held, first sources), in one order."""
    key = "md5, origin, attribute, value, value_type"
    with contextlib.closing(sqlite3.connect(path)) as connection:
        (text,) = connection.execute("SELECT value FROM meta WHERE key = 'runs'").fetchone()
        runs = parse_runs(text)
        found = {
            "images": f"SELECT md5, record FROM ({newest('images', runs, 'record')}) latest "
            "WHERE record IS NOT NULL",
            "counts": f"SELECT md5, sum(n) FROM ({union('counts', runs, 'md5, n')}) u "
            "GROUP BY md5 HAVING sum(n) <> 0",
            "attributes": f"SELECT {key}, sum(n) FROM ({union('attributes', runs, f'{key}, n')}) u "
            f"GROUP BY {key} HAVING sum(n) > 0",
            "sources": "SELECT md5, ingested_at, shard, ordinal, source_uri FROM (SELECT *, "
            "row_number() OVER (PARTITION BY md5 ORDER BY ingested_at, shard, ordinal) AS place "
            f"FROM ({newest('sources', runs, 'source_uri')}) latest "
            f"WHERE source_uri IS NOT NULL) placed WHERE place <= {RECORD_SOURCES}",
        }
        return {name: sorted(connection.execute(sql).fetchall()) for name, sql in found.items()}


def test_compaction_merges_tiers_and_leaves_large_files_alone(tmp_path):
    """One bucket, a large shard then small shards, compacted after each (fan-in 3): the small
    files are merged once three are there, their merged files once three of those are, and
    the large file is never rewritten (the whole-bucket rewrite read it every time); rows,
    order, statistics, lookups and the change feeds' readers (the images merge, the serving
    store, the similarity index) hold."""
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(31)
    bucket = 5
    pool = [m for m in random_md5s(rng, 16 * 800) if bucket_of(m, BUCKETS) == bucket]
    large_md5s, small_md5s = pool[:500], pool[500:]
    land_shard(layout, lake, "g-s00000", large_md5s)
    (large,) = _paths(lake, "occurrences", bucket)
    # tiers of 16 rows up: a shard's 20 rows are tier 1, three merged (60) tier 2, nine
    # (180) tier 3, the large shard's 500 tier 4
    policy = {"fan_in": 3, "tier_rows": 16}
    assert [tier_of(n, **policy) for n in (20, 60, 180, 500)] == [1, 2, 3, 4]
    merge_images(lake)
    sync(lake, layout.serving_store_path)  # the serving store follows from here
    assert compact(lake, **policy)["occurrences"]["bytes_rewritten"] == 0
    history: list[set[str]] = [_paths(lake, "occurrences", bucket)]
    for n in range(1, 10):  # small shards 1..9, each compacted after it lands
        land_shard(layout, lake, f"g-s{n:05d}", small_md5s[20 * (n - 1) : 20 * n], seed=n)
        landed = _paths(lake, "occurrences", bucket)
        if n % 3:  # fewer than three small files: nothing merged
            assert compact(lake, **policy)["occurrences"]["bytes_rewritten"] == 0
            history.append(_paths(lake, "occurrences", bucket))
            assert history[-1] == landed and large in landed
        else:
            rows = _rows(lake)
            files = {name: set(_file_sizes(lake, name)) for name in SORTED_BY_MD5}
            done = compact(lake, **policy)["occurrences"]
            history.append(_paths(lake, "occurrences", bucket))
            assert large in history[-1]  # never read: its tier never fills
            assert _rows(lake) == rows
            for name in SORTED_BY_MD5:
                _each_file_sorted(lake, name, set(_file_sizes(lake, name)) - files[name])
            assert done["files_added"] == 1 and done["bytes_rewritten"] > 0
            assert done["bytes_rewritten"] < _file_sizes(lake, "occurrences")[large]
    # shard 3: tier 1 held three small files: merged into one (tier 2) ...
    first = history[3] - history[2]
    assert len(first) == 1 and history[3] == {large, *first}
    # ... shard 6: three small files again, the first merged file untouched
    assert first < history[6] and len(history[6]) == 3
    # shard 9: three small ones, whose merged file makes tier 2's third: all merged into one
    # of tier 3, the large file still untouched
    assert len(history[9]) == 2 and not (first & history[9]) and large in history[9]
    rows_of = pa.table(lake.open("occurrences").get_add_actions(flatten=True))
    assert sorted(rows_of["num_records"].to_pylist()) == [180, 500]

    # the merge reads the shards' commits among the compactions' and counts each image once
    assert merge_images(lake).inserted == 9 * 20
    _counts_are_true(Library(layout.root))
    # so does the serving store, from the change feeds: as a store built afresh
    store = sync(lake, layout.serving_store_path)
    assert not store.rebuilt and store.occurrences_changed == 9 * 20
    fresh = tmp_path / "fresh.sqlite"
    assert sync(lake, fresh).rebuilt
    assert _store_rows(layout.serving_store_path) == _store_rows(fresh)
    SimilarityIndex(layout).sync(lake)
    library = Library(layout.root)
    before = _rows(lake)
    some = small_md5s[5]
    looked = library.lookup(some)
    versions = {name: lake.open(name).version() for name in ("occurrences", "images")}
    # every file of every table stays sorted as its writer sorts it; a merge of every file
    # (fan-in 1) changes no row, and neither merge nor index sees a change
    files = {name: set(_file_sizes(lake, name)) for name in SORTED_BY_MD5}
    compact(lake, fan_in=1)
    assert _rows(lake) == before
    store = sync(lake, layout.serving_store_path)  # level again, with nothing to change
    assert not store.rebuilt
    assert (store.images_changed, store.occurrences_changed, store.attributes_changed) == (0, 0, 0)
    library = Library(layout.root)
    for name in SORTED_BY_MD5:
        _each_file_sorted(lake, name, set(_file_sizes(lake, name)) - files[name])
    assert library.lookup(some) == looked and looked["occurrences"] == 1
    for name, version in versions.items():
        table = lake.open(name)
        assert read_changes(lake, table, version + 1, table.version(), ["md5"]).num_rows == 0
    assert merge_images(lake).md5s == 0
    synced = SimilarityIndex(layout).sync(lake)
    assert synced.added == [] and synced.removed == [] and synced.images == 500 + 9 * 20
    # the statistics of the files compaction wrote prune a lookup: to the row group of the
    # md5, to none for an md5 below the bucket's least
    for name in ("occurrences", "attributes", "images"):
        assert _md5_row_groups(lake, name, some) == (1, 1, 1)
        assert _md5_row_groups(lake, name, "5" + "0" * 31)[2] == 0


def test_a_budget_spreads_a_carry_over_runs_the_most_crowded_buckets_first():
    """Which buckets one run merges under a byte cap: the most files first, then the lowest
    number; a merge over what is left is skipped for a smaller one; at least one bucket."""
    files = {
        b: [DataFile(f"{b}/{i}", 10, size) for i in range(n)]
        for b, n, size in ((0, 3, 100), (1, 5, 100), (2, 4, 100), (3, 3, 10))
    }
    plan = {b: found[:3] for b, found in files.items()}  # 300, 300, 300 and 30 bytes
    assert within_budget(plan, files, None) == plan
    assert list(within_budget(plan, files, 630)) == [1, 2, 3]  # 600, then 0's 300 won't fit
    assert list(within_budget(plan, files, 10)) == [1]  # one bucket, whatever its size
    with pytest.raises(ValueError, match="max_bytes 0: must be a positive number of bytes"):
        within_budget(plan, files, 0)


def test_a_capped_compaction_leaves_the_rest_for_the_next_run(tmp_path):
    """A carry in every bucket under a cap of about one bucket's merge: each run merges what
    fits, the others wait (counted), and the runs after finish the carry; rows and lookups hold
    throughout."""
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(37)
    md5s = random_md5s(rng, 240)
    for n in range(2):
        land_shard(layout, lake, f"h-s{n:05d}", md5s[120 * n : 120 * n + 120], seed=n)
    merge_images(lake)
    rows = _rows(lake)
    per_bucket = max(sum(_file_sizes(lake, "occurrences").values()) // BUCKETS, 1)
    runs, waiting = 0, []
    while True:
        done = compact(lake, fan_in=2, tables=("occurrences",), max_bytes=per_bucket * 3)
        runs += 1
        waiting.append(done["occurrences"]["buckets_waiting"])
        assert _rows(lake) == rows
        if not done["occurrences"]["buckets"]:
            break
        assert done["occurrences"]["bytes_rewritten"] <= per_bucket * 6  # a bucket may be large
    assert waiting[0] > 0 and waiting[-1] == 0 and runs > 2
    assert done["occurrences"]["max_files_in_a_bucket"] == 1
    library = Library(layout.root)
    assert library.lookup(md5s[3])["occurrences"] == 1
    # the compact_library job takes the cap as run config (in MB): the other tables, at the
    # default fan-in, have nothing due; a cap of 1 MB leaves none waiting
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [lake_compaction],
            resources={"library": LibraryResource(root=str(layout.root))},
            instance=instance,
            run_config={"ops": {"lake_compaction": {"config": {"max_megabytes_per_table": 1}}}},
        )
    assert result.success
    metrics = result.asset_materializations_for_node("lake_compaction")[0].metadata
    assert metrics["occurrences"].value["buckets_waiting"] == 0
    assert _rows(lake) == rows


def test_a_compaction_policy_that_cannot_work_is_refused(tmp_path):
    _, lake = _library(tmp_path / "library")
    with pytest.raises(ValueError, match="fan_in 0: must be 1 or more"):
        compact(lake, fan_in=0)
    with pytest.raises(ValueError, match="tier_rows 0: must be a positive number of rows"):
        compact(lake, tier_rows=0)


def test_rows_read_by_key_equal_the_rows_a_query_finds(tmp_path):
    """The key reader (md5 column first, cached footers) against a plain SQL filter, over
    several shards' files per bucket, a repeated md5 and a missing one."""
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(23)
    first = random_md5s(rng, 300)
    land_shard(layout, lake, "k-s00000", first)
    land_shard(layout, lake, "k-s00001", first[:40] + random_md5s(rng, 200), seed=1)
    _refresh(layout, lake)
    library = Library(layout.root)
    catalog = library.connect()
    wanted = first[:60] + ["0" * 32]  # 40 in two shards, 20 in one, one nowhere
    buckets = [bucket_of(m, BUCKETS) for m in wanted]
    for table, view in (("occurrences", "occurrences"), ("attributes", "attribute_occurrences")):
        read = catalog.rows_in(table, buckets, wanted)
        assert read.schema.names == SCHEMAS[table].names  # the table's order, bucket included
        found = library.query(
            f"SELECT * FROM {view} WHERE md5 IN (SELECT unnest(?::VARCHAR[]))", [wanted]
        )
        key = sorted(SCHEMAS[table].names)
        assert sorted(tuple(r[k] for k in key) for r in read.to_pylist()) == sorted(
            tuple(r[k] for k in key) for r in found
        )
    assert catalog.rows_in("occurrences", buckets, wanted).num_rows == 100


def test_a_copied_library_answers_from_its_own_data(tmp_path):
    layout, lake = _library(tmp_path / "original")
    md5s = random_md5s(np.random.default_rng(7), 200)
    land_shard(layout, lake, "m-s00000", md5s)
    _refresh(layout, lake)
    copy = tmp_path / "moved" / "library"
    shutil.copytree(layout.root, copy)
    shutil.rmtree(layout.root)
    library = Library(copy)
    assert library.query("SELECT count(*) AS n FROM images")[0]["n"] == 200
    assert library.lookup(md5s[5])["md5"] == md5s[5]
    assert library.similar(md5s[5], max_distance=0)[0]["md5"] == md5s[5]
    for path in copy.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".duckdb"):
            assert str(tmp_path) not in path.read_text(errors="ignore"), path


def test_lookup_shows_every_value_of_a_multi_valued_attribute(tmp_path):
    layout, lake = _library(tmp_path / "library")
    md5 = random_md5s(np.random.default_rng(8), 1)
    for number, tag in enumerate(("red", "green", "blue")):
        shard = f"tag{number}-s00000"
        keys = write_keys(
            layout.keys_path(shard),
            batch=f"tag{number}",
            shard=shard,
            n_buckets=BUCKETS,
            md5s=md5,
        )
        rows = pq.read_table(keys).to_pylist()
        rows[0]["extras"] = json.dumps({"tag": tag, "label": "same"})
        pq.write_table(pa.Table.from_pylist(rows, schema=KEYS_SCHEMA), keys)
        write_shard(lake, shard, keys)
    _refresh(layout, lake)
    image = Library(layout.root).lookup(md5[0])
    assert sorted(image["attributes"]["manifest"]["tag"]) == ["blue", "green", "red"]
    assert image["attributes"]["manifest"]["label"] == "same"
    assert image["occurrences"] == 3 and len(image["sources"]) == 3


def test_a_manifest_value_named_like_a_derived_one_never_passes_for_it(tmp_path):
    """A manifest column ``exif.make`` on an image without EXIF: ``lookup`` and the
    ``attributes`` view show it as the manifest's value, never as the image's EXIF make; and
    where the image has its own, both are there, each with its origin."""
    layout, lake = _library(tmp_path / "library")
    md5s = random_md5s(np.random.default_rng(9), 2)
    shard = "named-s00000"
    keys = write_keys(
        layout.keys_path(shard), batch="named", shard=shard, n_buckets=BUCKETS, md5s=md5s
    )
    rows = pq.read_table(keys).to_pylist()
    for row in rows:
        row["extras"] = json.dumps({"exif.make": "Canon", "image.width": "wide"})
    rows[1]["camera_make"] = "Canon"  # the second has its own EXIF make, the same text
    pq.write_table(pa.Table.from_pylist(rows, schema=KEYS_SCHEMA), keys)
    write_shard(lake, shard, keys)
    _refresh(layout, lake)
    library = Library(layout.root)
    without, with_exif = (library.lookup(md5) for md5 in md5s)
    assert set(without["attributes"]) == {"derived", "manifest"}
    assert "exif.make" not in without["attributes"]["derived"]
    assert without["attributes"]["manifest"] == {"exif.make": "Canon", "image.width": "wide"}
    assert with_exif["attributes"]["derived"]["exif.make"] == "Canon"
    assert with_exif["attributes"]["manifest"]["exif.make"] == "Canon"
    found = library.query(
        "SELECT md5, origin, value FROM attributes WHERE attribute = 'exif.make' "
        "ORDER BY md5, origin"
    )
    assert [(r["md5"], r["origin"], r["value"]) for r in found] == sorted(
        [
            (md5s[0], "manifest", "Canon"),
            (md5s[1], "derived", "Canon"),
            (md5s[1], "manifest", "Canon"),
        ]
    )


def test_similar_says_when_the_index_is_missing_or_behind(tmp_path, capsys, caplog):
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(9)
    first = random_md5s(rng, 100)
    land_shard(layout, lake, "s-s00000", first)
    _refresh(layout, lake)
    library = Library(layout.root)
    assert library.similar(first[0], max_distance=0)[0]["md5"] == first[0]
    shutil.rmtree(layout.index_dir)
    with pytest.raises(IndexNotReady, match="the similarity index is missing"):
        Library(layout.root).similar(first[0])
    assert main(["similar", first[0], "--library", str(layout.root)]) != 0
    assert "the similarity index is missing" in capsys.readouterr().err
    SimilarityIndex(layout).sync(lake)
    land_shard(layout, lake, "s-s00001", random_md5s(rng, 40))
    merge_images(lake)  # images moved on, the index did not
    with pytest.raises(IndexNotReady, match="behind the lake: 40 images not indexed"):
        Library(layout.root).similar(first[0])
    assert main(["similar", first[0], "--library", str(layout.root)]) != 0
    assert "behind the lake" in capsys.readouterr().err
    SimilarityIndex(layout).sync(lake)
    assert Library(layout.root).similar(first[0], max_distance=0)[0]["md5"] == first[0]
    manifest = layout.index_dir / "segments.json"
    manifest.write_text('{"segments": ')  # cut short: a cache, so it costs a rebuild, no answer
    with caplog.at_level(logging.WARNING, logger="asset_library.similarity"):
        assert main(["similar", first[0], "--library", str(layout.root)]) == 0
    assert first[0] in capsys.readouterr().out
    assert f"similarity index damaged, rebuilt from the images table: {manifest}" in caplog.text
    SimilarityIndex(layout).sync(lake)  # the next refresh rewrites the files; no hand work
    assert json.loads(manifest.read_text())["segments"]
    assert Library(layout.root).similar(first[0], max_distance=0)[0]["md5"] == first[0]


def test_a_library_of_the_previous_layout_is_migrated(tmp_path, capsys):
    layout, _ = _library(tmp_path / "library")
    md5s = random_md5s(np.random.default_rng(10), 120)
    keys = write_keys(
        layout.keys_path("old-s00000"),
        batch="old",
        shard="old-s00000",
        n_buckets=BUCKETS,
        md5s=md5s,
        rejects=2,
    )
    layout.lake_dir.mkdir(parents=True)
    with duckdb.connect() as connection:  # what the previous writer laid out
        for table in ("base", "cube"):
            connection.execute(
                f"COPY (SELECT * FROM read_parquet('{keys}') WHERE status = 'ok') TO "
                f"'{layout.lake_dir / table}' (FORMAT parquet, PARTITION_BY (bucket), "
                "FILENAME_PATTERN 'old-s0000{i}')"
            ).fetchall()
        (layout.lake_dir / "rejects").mkdir(parents=True)
        connection.execute(
            f"COPY (SELECT * FROM read_parquet('{keys}') WHERE status <> 'ok') TO "
            f"'{layout.lake_dir / 'rejects' / 'old-s00000.parquet'}' (FORMAT parquet)"
        ).fetchall()
    with duckdb.connect(str(layout.root / "catalog.duckdb")) as connection:
        connection.execute(f"CREATE VIEW x AS SELECT '{layout.root}' AS path").fetchall()
    assert main(["migrate", "--library", str(layout.root)]) == 0
    assert "1 shard(s) rewritten" in capsys.readouterr().out
    assert not (layout.lake_dir / "base").exists() and not (layout.root / "catalog.duckdb").exists()
    library = Library(layout.root)
    assert library.query(COUNTS)[0]["images"] == 120
    assert library.query(COUNTS)[0]["rejects"] == 2
    assert library.similar(md5s[0], max_distance=0)[0]["md5"] == md5s[0]
    assert main(["migrate", "--library", str(layout.root)]) == 0
    assert "nothing to migrate" in capsys.readouterr().out


def test_the_scale_benchmark_runs():
    """Both compaction policies, side by side: the same shards, each with its figures and its
    ratios against shard 2."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
    arguments = ["--shards", "2", "--shard-size", "1000", "--buckets", "16"]
    done = subprocess.run(
        [sys.executable, str(script), *arguments, "--compaction", "both", "--fan-in", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    ends = [line for line in lines if "first" in line]
    assert [(e["first"]["images"], e["last"]["images"]) for e in ends] == [(1000, 1900)] * 2
    ratios = [line for line in lines if "compact_mb_rewritten" in line]
    assert [r["shard"] for r in ratios] == [1, 2, 1, 2]
    assert [r["compact_bytes_rewritten"] for r in ratios] == [0.0, 1.0] * 2


# --------------------------------------------------------------------------------------------
# The same on S3 (SeaweedFS)


def _s3_lake(tmp_path: Path, env: dict[str, str], bucket: str) -> tuple[LibraryLayout, Lake]:
    layout = LibraryLayout.open(tmp_path / "library", BUCKETS)
    return layout, Lake.of(layout, {**env, "ASSET_LIBRARY_LAKE": f"s3://{bucket}/lake"})


def test_on_s3_two_shards_commit_at_once_and_a_reader_reads_through_a_replace(
    tmp_path, s3_env, s3_bucket, monkeypatch
):
    layout, lake = _s3_lake(tmp_path, s3_env, s3_bucket)
    assert lake.is_s3
    lake.ensure()
    rng = np.random.default_rng(11)
    a, b = random_md5s(rng, 300), random_md5s(rng, 200)
    start = threading.Barrier(2)

    def land(args):
        shard, md5s = args
        start.wait()
        return land_shard(layout, lake, shard, md5s)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(land, [("a-s00000", a), ("b-s00000", b)]))
    _refresh(layout, lake)
    monkeypatch.setenv("ASSET_LIBRARY_LAKE", lake.location)
    library = Library(layout.root)
    assert library.query("SELECT count(*) AS n FROM images")[0]["n"] == 500
    assert library.lookup(a[3])["md5"] == a[3]
    # a reader keeps reading while the shard is replaced: it sees the old or the new shard whole
    seen: list[int] = []
    stop = threading.Event()

    def read():
        reader = Library(layout.root)
        while not stop.is_set():
            seen.append(reader.query("SELECT count(*) AS n FROM occurrences")[0]["n"])

    thread = threading.Thread(target=read)
    thread.start()
    try:
        land_shard(layout, lake, "b-s00000", random_md5s(rng, 50))
        merge_images(lake)
    finally:
        stop.set()
        thread.join()
    assert seen and set(seen) <= {500, 350}
    assert library.query("SELECT count(*) AS n FROM images")[0]["n"] == 350
    # repeats on S3: counted in image_counts, images only appended
    files = set(
        DeltaTable(lake.uri("images"), storage_options=dict(lake.storage_options)).file_uris()
    )
    land_shard(layout, lake, "c-s00000", a[:40] + random_md5s(rng, 10))
    assert merge_images(lake).updated == 40
    assert files <= set(lake.open("images").file_uris())
    _counts_are_true(library)
    assert library.lookup(a[0])["occurrences"] == 2
    # the attribute index on S3, partitioned by attribute: the same answer as the cube
    found = library.query(
        "SELECT (SELECT count(DISTINCT md5) FROM attribute_occurrences a WHERE attribute = 'label' "
        "AND value = 'cat' AND md5 IN (SELECT md5 FROM images)) AS truth, "
        "(SELECT count(*) FROM images_with_attribute('label', 'cat')) AS found"
    )[0]
    assert found["found"] == found["truth"] > 0
    assert not (layout.root / "lake").exists()  # the lake is on S3 only


def test_a_batch_ingests_with_the_lake_on_s3(tmp_path, s3_env, s3_bucket, corpus_dir, monkeypatch):
    import dagster as dg

    from asset_library.runs.orchestrate import ingest_batch

    env = {**s3_env, "ASSET_LIBRARY_LAKE": f"s3://{s3_bucket}/lake"}
    with dg.instance_for_test() as instance:
        summary = ingest_batch(
            str(corpus_dir / "github_jenssegers_imagehash"),
            library=tmp_path / "library",
            workers=0,
            environ=env,
            instance=instance,
            progress=lambda _: None,
        )
    assert summary.success, summary
    settings = json.loads((tmp_path / "library" / "library.json").read_text())
    assert settings["lake"] == f"s3://{s3_bucket}/lake"  # readers find the lake here
    library = Library(tmp_path / "library")  # credentials from the environment (s3_env)
    rows = library.query("SELECT md5, occurrences FROM images")
    assert len(rows) == summary.ok
    assert rows[0]["md5"] in {r["md5"] for r in library.similar(rows[0]["md5"], max_distance=0)}
    # compaction writes its merged files through the table's own store (S3 here)
    lake = Lake.of(LibraryLayout.existing(tmp_path / "library"), env)
    before, looked = _rows(lake), library.lookup(rows[0]["md5"])
    done = compact(lake, fan_in=1)
    assert done["occurrences"]["files_added"] == done["occurrences"]["buckets"] > 0
    assert _rows(lake) == before
    assert Library(tmp_path / "library").lookup(rows[0]["md5"]) == looked


def test_two_merges_at_once_both_finish_and_count_each_occurrence_once(tmp_path):
    # two machines refreshing one library: the merge that loses the commit race merges again
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(5)
    first = random_md5s(rng, 200)
    second = first[:50] + random_md5s(rng, 200)
    land_shard(layout, lake, "a-s00000", first)
    land_shard(layout, lake, "b-s00000", second)
    start = threading.Barrier(2)

    def run(_):
        start.wait()
        return merge_images(lake).inserted

    with ThreadPoolExecutor(2) as pool:
        assert sorted(pool.map(run, range(2))) == [0, 400]
    counts = Library(layout.root).query(COUNTS)[0]
    assert counts["images"] == counts["distinct_md5s"] == 400
    assert counts["counted"] == counts["occurrences"] == 450
