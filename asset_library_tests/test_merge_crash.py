"""The merge killed (SIGKILL) at each of its commit boundaries, with batches landing in between:
every occurrence is counted once, md5 by md5, and a library counted twice is repaired."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from asset_library import Library
from asset_library.ids import bucket_of
from asset_library.lake import (
    CRASH_AT,
    IMAGE_COUNTS_SCHEMA,
    Lake,
    counted_version,
    merge_images,
    merged_version,
)
from asset_library.lake.recount import check_counts, recount
from asset_library.layout import LibraryLayout
from asset_library.similarity import SimilarityIndex
from asset_library_tests.support.synthetic import land_shard, random_md5s

BUCKETS = 8
#: A refresh's merge in a process of its own, as the run worker makes it.
MERGE = (
    "import sys; from asset_library.layout import LibraryLayout; "
    "from asset_library.lake import Lake, merge_images; "
    "merge_images(Lake.of(LibraryLayout(__import__('pathlib').Path(sys.argv[1])), {}))"
)


def _library(root: Path) -> tuple[LibraryLayout, Lake]:
    layout = LibraryLayout.open(root, BUCKETS)
    return layout, Lake.of(layout, {})


def _killed_merge(layout: LibraryLayout, point: str) -> None:
    """Run a merge in its own process, killed with SIGKILL at ``point``."""
    env = {**os.environ, CRASH_AT: point}
    done = subprocess.run(
        [sys.executable, "-c", MERGE, str(layout.root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, (point, done.returncode, done.stderr[-2000:])


def _shown(library: Library, md5: str) -> int:
    """The occurrence count the images view shows for an md5."""
    return library.query("SELECT occurrences FROM image(?)", [md5])[0]["occurrences"]


def _counted_once(layout: LibraryLayout, lake: Lake) -> None:
    """Every occurrence counted once: in total, md5 by md5, one images row per md5."""
    library = Library(layout.root)
    found = library.query(
        "SELECT (SELECT sum(occurrences) FROM images) AS counted, "
        "(SELECT count(*) FROM occurrences) AS occurrences, "
        "(SELECT count(*) FROM images) AS images, "
        "(SELECT count(DISTINCT md5) FROM occurrences) AS md5s, "
        "(SELECT list((md5, n) ORDER BY md5) FROM (SELECT md5, count(*) AS n "
        " FROM occurrences GROUP BY md5)) AS truth, "
        "(SELECT list((md5, occurrences) ORDER BY md5) FROM images) AS shown"
    )[0]
    assert found["counted"] == found["occurrences"]
    assert found["images"] == found["md5s"]
    assert found["shown"] == found["truth"]
    assert check_counts(lake).passed


@pytest.mark.parametrize("point", ["image_counts", "images", "image_keys"])
def test_a_merge_killed_at_a_commit_boundary_then_another_batch_counts_once(tmp_path, point):
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(7)
    first = random_md5s(rng, 300)
    land_shard(layout, lake, "a-s00000", first)
    merge_images(lake)
    land_shard(layout, lake, "b-s00000", first[:100] + random_md5s(rng, 50), seed=1)
    _killed_merge(layout, point)
    if point == "images":  # image_counts landed, images did not
        assert counted_version(lake) > merged_version(lake)
    land_shard(layout, lake, "c-s00000", first[50:150] + random_md5s(rng, 20), seed=2)
    merged = merge_images(lake)
    assert merged.duplicated_md5s == 0
    assert sorted(merged.shards) == (
        ["c-s00000"] if point == "image_keys" else ["b-s00000", "c-s00000"]
    )
    _counted_once(layout, lake)
    library = Library(layout.root)
    assert _shown(library, first[60]) == 3
    assert _shown(library, first[120]) == 2
    SimilarityIndex(layout).sync(lake)
    assert len(SimilarityIndex(layout)) == 300 + 50 + 20


def test_merges_killed_at_every_boundary_in_turn_count_every_occurrence_once(tmp_path):
    """Each refresh killed somewhere, a batch landing before each: the killed merge's own
    finishing commit killed too, a shard replaced (its md5s recomputed) in a range cut between
    its commits, the key cache left behind its table."""
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(8)
    first = random_md5s(rng, 200)
    land_shard(layout, lake, "a-s00000", first)
    merge_images(lake)
    steps = [
        ("b-s00000", first[:80] + random_md5s(rng, 30), "images"),
        ("c-s00000", first[40:120] + random_md5s(rng, 30), "images"),  # its finishing commit
        ("d-s00000", first[100:160] + random_md5s(rng, 30), "image_counts"),
        ("b-s00000", first[150:190] + random_md5s(rng, 10), "images"),  # b replaced: lost md5s
        ("e-s00000", first[:30] + random_md5s(rng, 30), "image_keys"),
        ("f-s00000", first[20:60] + random_md5s(rng, 30), "image_counts"),
    ]
    for seed, (shard, md5s, point) in enumerate(steps, 1):
        land_shard(layout, lake, shard, md5s, seed=seed)
        _killed_merge(layout, point)
    land_shard(layout, lake, "g-s00000", first[:200:3] + random_md5s(rng, 5), seed=9)
    assert merge_images(lake).duplicated_md5s == 0
    _counted_once(layout, lake)
    assert merge_images(lake).changed is False


def _counted_twice(layout: LibraryLayout, lake: Lake, md5s: list[str]) -> None:
    """What a merge killed between its commits and merged again after another batch left
    before this version: the gains of its range appended to image_counts a second time."""
    rows = pa.table(
        {
            "md5": md5s,
            "occurrences": [1] * len(md5s),
            "bucket": [bucket_of(m, BUCKETS) for m in md5s],
        }
    ).cast(IMAGE_COUNTS_SCHEMA)
    write_deltalake(lake.table("image_counts"), rows, mode="append", partition_by=["bucket"])


def _audited(root: Path, instance) -> dict:
    """The library_audit job's check of the counts, as a run reports it."""
    from asset_library.definitions import build_definitions
    from asset_library.defs.resources import build_resources

    defs = build_definitions(build_resources({}, root=str(root)))
    result = defs.resolve_job_def("audit_library").execute_in_process(
        instance=instance, raise_on_error=False
    )
    (check,) = [
        e for e in result.get_asset_check_evaluations() if e.check_name == "occurrences_counted"
    ]
    return {"passed": check.passed, **{k: v.value for k, v in check.metadata.items()}}


def test_an_over_counted_library_is_found_by_the_audit_and_recounted(tmp_path, capsys, instance):
    from asset_library.cli import main

    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(9)
    first = random_md5s(rng, 300)
    land_shard(layout, lake, "a-s00000", first)
    land_shard(layout, lake, "b-s00000", first[:100] + random_md5s(rng, 50), seed=1)
    merge_images(lake)
    _counted_twice(layout, lake, first[:100])
    library = Library(layout.root)
    assert _shown(library, first[0]) == 3
    found = check_counts(lake)
    assert not found.passed
    assert (found.counted - found.occurrences, found.wrong) == (100, 100)
    assert "asset-library recount" in found.describe()
    audited = _audited(layout.root, instance)
    assert not audited["passed"]
    assert (audited["counted"], audited["occurrences"], audited["wrong_md5s"]) == (550, 450, 100)
    # shards landed since the last merge are not counted yet: no false alarm for them
    land_shard(layout, lake, "c-s00000", first[200:260], seed=2)
    assert check_counts(lake).occurrences == 450
    assert main(["recount", "--library", str(layout.root)]) == 0
    out = capsys.readouterr().out
    assert "100 md5s" in out and "-100" in out
    _counted_once(layout, lake)
    assert _shown(Library(layout.root), first[0]) == 2
    assert _shown(Library(layout.root), first[210]) == 2
    assert recount(lake).corrected == 0  # nothing left to repair
    assert _audited(layout.root, instance)["passed"]
