"""Shards side by side in their own runs, a failed shard run again, figures from what the runs
recorded: on real corpus images, a real Dagster instance and the real lake."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest

from asset_library.defs.tags import ATTEMPT_TAG
from asset_library.library import Library
from asset_library.runs.orchestrate import ingest_batch

#: Twelve JPEGs of a few hundred KB: shards of two take a second or two each.
ORIENTATION = "github_recurser_exif-orientation-examples"
FOREST = "github_jenssegers_imagehash/forest"


@pytest.fixture(scope="module")
def twelve_images(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("twelve")
    sources = sorted((corpus_dir / ORIENTATION).glob("*.jpg"))[:8]
    sources += sorted((corpus_dir / FOREST).glob("*.jpg"))[:4]
    for path in sources:
        shutil.copy(path, folder / f"{path.parent.name}-{path.name}")
    assert len(list(folder.iterdir())) == 12
    return folder


def _lake_counts(root: Path) -> dict[str, int]:
    return Library(root).query(
        "SELECT (SELECT count(*) FROM occurrences) AS occurrences, "
        "(SELECT count(*) FROM rejects) AS rejects, (SELECT count(*) FROM images) AS images"
    )[0]


def test_the_cli_runs_shards_side_by_side_and_its_figures_are_the_lakes(
    run_cli, twelve_images, tmp_path
):
    code, out, err = run_cli(
        "ingest", str(twelve_images), "--batch", "side", "--shard-size", "2", "--parallel", "2"
    )
    assert code == 0, out + err
    assert "batch side: 12 images in 6 shard(s), 2 at a time" in out
    assert "shards    6 ok, 0 failed, 2 at a time" in out
    assert sorted(line.split()[0] for line in out.splitlines() if line.startswith("[")) == [
        f"[{n}/6]" for n in range(1, 7)
    ]

    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))
    try:
        records = instance.get_run_records(dg.RunsFilter(tags={"asset_library/batch": "side"}))
    finally:
        instance.dispose()
    jobs = sorted(r.dagster_run.job_name for r in records)
    assert jobs == ["ingest_shard"] * 6 + ["plan_batch", "refresh_library"]
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
    shards = [r for r in records if r.dagster_run.job_name == "ingest_shard"]
    assert {r.dagster_run.tags["dagster/partition"] for r in shards} == {
        f"side-s{n:05d}" for n in range(6)
    }
    # Two shard runs were under way at the same moment, in two processes.
    overlapping = [
        (a, b)
        for a in shards
        for b in shards
        if a.dagster_run.run_id < b.dagster_run.run_id
        and a.start_time < b.end_time
        and b.start_time < a.end_time
    ]
    assert overlapping
    assert len({r.dagster_run.tags["asset_library/process"] for r in shards}) == 2

    # The summary's figures are the lake's.
    lake = _lake_counts(tmp_path / "library")
    assert lake == {"occurrences": 12, "rejects": 0, "images": 12}
    assert "images    12 read, 12 ingested, 12 new, 0 already stored" in out
    assert "library   12 images, 0 rejects" in out


def test_a_shard_that_fails_is_run_again_and_the_retry_succeeds(twelve_images, tmp_path):
    """The object store's folder is a file on the first attempt (the shard fails storing); the
    operator removes the file when told the attempt failed; the second attempt succeeds."""
    root = tmp_path / "library"
    objects = tmp_path / "objects"
    objects.write_text("a file where the object store's folder should be")
    lines: list[str] = []

    def operator(line: str) -> None:
        lines.append(line)
        if "attempt 1 failed" in line:
            objects.unlink(missing_ok=True)

    with dg.instance_for_test() as instance:
        summary = ingest_batch(
            str(twelve_images),
            library=root,
            max_images_per_shard=12,
            workers=0,
            parallel=1,
            retries=1,
            batch="again",
            environ={"ASSET_LIBRARY_OBJECTS": str(objects)},
            instance=instance,
            progress=operator,
        )
        runs = instance.get_runs(dg.RunsFilter(job_name="ingest_shard"))
        attempts = sorted((r.tags[ATTEMPT_TAG], r.status) for r in runs)
    assert summary.success, (summary, lines)
    [failed] = [line for line in lines if "attempt 1 failed" in line]
    assert failed.startswith(
        "      again-s00000: attempt 1 failed (shard again-s00000 failed storing"
    )
    assert "[1/1] again-s00000: 12 images, 12 ok" in lines[-1] and "(after 2 attempts)" in lines[-1]
    assert summary.retried == {"again-s00000": 2} and summary.failed_shards == []
    assert attempts == [("1", dg.DagsterRunStatus.FAILURE), ("2", dg.DagsterRunStatus.SUCCESS)]
    assert (summary.images, summary.ok, summary.uploaded) == (12, 12, 12)
    assert _lake_counts(root) == {"occurrences": 12, "rejects": 0, "images": 12}
    assert len(list(objects.rglob("*"))) >= 12


def test_a_shard_that_keeps_failing_is_named_with_its_failure(twelve_images, tmp_path):
    objects = tmp_path / "objects"
    objects.write_text("a file where the object store's folder should be")
    with dg.instance_for_test() as instance:
        summary = ingest_batch(
            str(twelve_images),
            library=tmp_path / "library",
            max_images_per_shard=6,
            workers=0,
            parallel=2,
            retries=1,
            batch="never",
            environ={"ASSET_LIBRARY_OBJECTS": str(objects)},
            instance=instance,
            progress=lambda _: None,
        )
        runs = instance.get_runs(dg.RunsFilter(job_name="ingest_shard"))
    assert not summary.success
    assert sorted(summary.failed_shards) == ["never-s00000", "never-s00001"]
    assert all(
        summary.failures[shard].startswith(f"shard {shard} failed storing")
        for shard in summary.failed_shards
    )
    assert len(runs) == 4 and {r.status for r in runs} == {dg.DagsterRunStatus.FAILURE}
