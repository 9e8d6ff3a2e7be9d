"""Ingestion against a real S3 (SeaweedFS on loopback, auth on): S3 sources, S3 object store,
an S3 landing zone, and a shard that fails when the store goes down mid-run."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import pytest

from asset_library.definitions import build_definitions
from asset_library.defs.resources import build_resources
from asset_library.ingest.landing import find_ready_batches
from asset_library.library import Library
from asset_library.runs.orchestrate import ingest_batch
from asset_library.storage import object_key
from asset_library_tests.support.seaweedfs import SeaweedS3

PHOTOS = "github_recurser_exif-orientation-examples"


def _upload_folder(client, bucket: str, prefix: str, files: list[Path]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda f: client.put_object(
                    Bucket=bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes()
                ),
                files,
            )
        )


def _corpus_files(corpus_dir: Path, count: int) -> list[Path]:
    folders = [
        PHOTOS,
        "github_jenssegers_imagehash",
        "github_libjpeg-turbo_libjpeg-turbo",
        "github_KilianB_JImageHash",
        "github_corona10_goimagehash",
    ]
    files = [p for f in folders for p in sorted((corpus_dir / f).rglob("*")) if p.is_file()]
    return files[:count]


def _env(seaweed: SeaweedS3, bucket: str) -> dict[str, str]:
    return {**seaweed.env(), "ASSET_LIBRARY_OBJECTS": f"s3://{bucket}/library"}


def test_an_s3_prefix_ingests_into_an_s3_object_store(seaweed, s3_bucket, corpus_dir, tmp_path):
    files = _corpus_files(corpus_dir, 20)
    client = seaweed.client()
    _upload_folder(client, s3_bucket, "landing/batch1", files)
    env = _env(seaweed, s3_bucket)
    with dg.instance_for_test() as instance:
        summary = ingest_batch(
            f"s3://{s3_bucket}/landing/batch1",
            library=tmp_path / "library",
            max_images_per_shard=8,
            workers=2,
            environ=env,
            instance=instance,
            progress=lambda _: None,
        )
        assert summary.success and summary.shards == 3 and summary.images == 20
        library = Library(tmp_path / "library")
        rows = library.query("SELECT md5, size_bytes, source_uri FROM images")
        assert len(rows) == summary.uploaded > 0
        for row in rows:
            head = client.head_object(Bucket=s3_bucket, Key=f"library/{object_key(row['md5'])}")
            assert head["ETag"].strip('"') == row["md5"]  # the store verified the bytes
            assert head["ContentLength"] == row["size_bytes"]
            assert row["source_uri"].startswith(f"s3://{s3_bucket}/landing/batch1/")

        again = ingest_batch(
            f"s3://{s3_bucket}/landing/batch1",
            library=tmp_path / "library",
            workers=0,
            environ=env,
            instance=instance,
            progress=lambda _: None,
        )
        assert again.success and again.uploaded == 0
        assert library.query("SELECT count(*) AS n FROM images")[0]["n"] == len(rows)


def test_an_s3_manifest_reports_missing_objects_as_rejects(
    seaweed, s3_bucket, corpus_dir, tmp_path
):
    files = _corpus_files(corpus_dir, 3)
    client = seaweed.client()
    _upload_folder(client, s3_bucket, "imgs", files)
    lines = [
        f'{{"uri": "s3://{s3_bucket}/imgs/{f.name}", "camera": "c{i}"}}'
        for i, f in enumerate(files)
    ]
    lines.append(f'{{"uri": "s3://{s3_bucket}/imgs/not-there.jpg", "camera": "none"}}')
    client.put_object(Bucket=s3_bucket, Key="batch.jsonl", Body="\n".join(lines).encode())
    with dg.instance_for_test() as instance:
        summary = ingest_batch(
            f"s3://{s3_bucket}/batch.jsonl",
            library=tmp_path / "library",
            workers=0,
            environ=_env(seaweed, s3_bucket),
            instance=instance,
            progress=lambda _: None,
        )
    assert summary.success and summary.rejects_by_reason == {"missing": 1}
    library = Library(tmp_path / "library")
    cameras = library.query("SELECT value FROM attributes WHERE attribute = 'camera' ORDER BY 1")
    assert [r["value"] for r in cameras] == ["c0", "c1", "c2"]


def test_an_s3_landing_zone_lists_ready_batches(seaweed, s3_bucket):
    client = seaweed.client()
    client.put_object(Bucket=s3_bucket, Key="landing/a/x.jpg", Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="landing/b/x.jpg", Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="landing/b/_READY", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="landing/m.parquet", Body=b"")
    found = find_ready_batches(f"s3://{s3_bucket}/landing", client)
    assert [(b.name, b.source) for b in found] == [
        ("b", f"s3://{s3_bucket}/landing/b"),
        ("m.parquet", f"s3://{s3_bucket}/landing/m.parquet"),
    ]


def _stop_when(seaweed: SeaweedS3, bucket: str, prefix: str, count: int) -> threading.Thread:
    """Kill the store once ``count`` objects are under ``prefix``: a failure part-way."""
    client = seaweed.client(max_attempts=1)

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0)
            if listed >= count:
                seaweed.kill()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_shard_fails_alone_when_the_store_stops_and_its_rerun_matches_a_clean_run(
    seaweed, s3_bucket, corpus_dir, tmp_path
):
    files = _corpus_files(corpus_dir, 36)
    source = tmp_path / "batch"
    source.mkdir()
    for file in files:
        (source / file.name).write_bytes(file.read_bytes())
    env = {**_env(seaweed, s3_bucket), "ASSET_LIBRARY_SHARD_SIZE": "12"}
    root = tmp_path / "library"
    resources = build_resources(env, root=str(root))
    defs = build_definitions(resources)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("batches", ["batch"])
        assert (
            defs.resolve_job_def("plan_batch")
            .execute_in_process(
                partition_key="batch",
                run_config={"ops": {"batch_plan": {"config": {"source": str(source)}}}},
                instance=instance,
            )
            .success
        )
        shards = ["batch-s00000", "batch-s00001", "batch-s00002"]
        job = defs.resolve_job_def("ingest_shard")
        assert job.execute_in_process(partition_key=shards[0], instance=instance).success
        stored = seaweed.client().list_objects_v2(Bucket=s3_bucket, Prefix="library/")["KeyCount"]

        watcher = _stop_when(seaweed, s3_bucket, "library/", stored + 2)
        try:
            failed = job.execute_in_process(
                partition_key=shards[1], instance=instance, raise_on_error=False
            )
        finally:
            watcher.join(timeout=60)
            seaweed.start()
        assert not failed.success
        assert not (root / "shards" / f"{shards[1]}.parquet").exists()  # nothing half-written
        assert job.execute_in_process(partition_key=shards[2], instance=instance).success

        rerun = job.execute_in_process(partition_key=shards[1], instance=instance)
        assert rerun.success
        statuses = instance.get_status_by_partition(
            dg.AssetKey("shard_keys"), shards, defs.resolve_job_def("ingest_shard").partitions_def
        )
        assert set(statuses.values()) == {dg.AssetPartitionStatus.MATERIALIZED}

    clean_root = tmp_path / "clean"
    with dg.instance_for_test() as instance:
        clean = ingest_batch(
            str(source),
            library=clean_root,
            max_images_per_shard=12,
            workers=0,
            batch="batch",
            environ={},
            instance=instance,
            progress=lambda _: None,
        )
    assert clean.success
    query = (
        "SELECT shard, ordinal, md5, size_bytes, phash, ahash, dhash, width, height, source_uri "
        "FROM occurrences ORDER BY shard, ordinal"
    )
    assert Library(root).query(query) == Library(clean_root).query(query)


@pytest.fixture(autouse=True)
def _store_running(seaweed: SeaweedS3):
    """A test that stops the store must not leave it stopped for the next one."""
    yield
    if not seaweed.running:
        seaweed.start()
