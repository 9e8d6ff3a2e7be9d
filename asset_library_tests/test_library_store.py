"""A library and its object store: the store it records, and objects damaged after they landed.

Real folders, a real Dagster instance and a real S3 (SeaweedFS on loopback, auth on).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from asset_library.cli import main
from asset_library.definitions import build_definitions
from asset_library.defs.resources import (
    LocalObjectStoreResource,
    S3ObjectStoreResource,
    build_resources,
)
from asset_library.layout import LibraryLayout
from asset_library.library import Library
from asset_library.runs.orchestrate import IngestSummary, ingest_batch
from asset_library.storage import (
    LocalObjectStore,
    ObjectStore,
    S3ObjectStore,
    StoreMismatchError,
    object_key,
)
from asset_library_tests.support.seaweedfs import SeaweedS3

FOLDER = "github_jenssegers_imagehash"  # 8 small JPEGs


def _ingest(source: Path, root: Path, environ: dict[str, str], instance) -> IngestSummary:
    return ingest_batch(
        str(source),
        library=root,
        workers=0,
        environ=environ,
        instance=instance,
        progress=lambda _: None,
    )


def _keys_in(client, bucket: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", ())]


# -- the store a library records ----------------------------------------------------------------


def test_the_layout_names_every_file_existing_libraries_hold(tmp_path: Path) -> None:
    """Each file of a library is named in one place, with the names libraries already hold."""
    layout = LibraryLayout.open(tmp_path)
    root = layout.root
    assert layout.settings_path == root / "library.json" and layout.settings_path.is_file()
    assert layout.plan_path("b1") == root / "plans" / "b1" / "plan.json"
    assert layout.segments_manifest_path == root / "index" / "segments.json"
    assert layout.near_duplicates_path == root / "index" / "near_duplicates.parquet"
    assert layout.dagster_home == root / ".dagster"


def test_a_library_records_its_store_so_a_moved_copy_still_finds_its_bytes(tmp_path: Path):
    root = tmp_path / "library"
    layout = LibraryLayout.open(root)
    assert layout.recorded_objects() is None
    layout.record_objects(str(root / "objects"))
    assert json.loads(layout.settings_path.read_text())["objects"] == "objects"

    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert LibraryLayout(moved).recorded_objects() == str(moved / "objects")
    store = build_resources({}, root=str(moved))["object_store"]
    assert isinstance(store, LocalObjectStoreResource)
    assert store.location() == str(moved / "objects")
    assert Library(moved).object_store().describe() == f"local folder {moved / 'objects'}"

    outside = tmp_path / "shared-objects"
    layout.record_objects(str(outside))
    assert json.loads(layout.settings_path.read_text())["objects"] == str(outside)
    layout.record_objects("s3://images/lib")
    assert LibraryLayout(moved).recorded_objects() == str(moved / "objects")  # a copy: its own
    # With ASSET_LIBRARY_OBJECTS unset, the library's recorded store is the one used.
    store = build_resources({}, root=str(root))["object_store"]
    assert isinstance(store, S3ObjectStoreResource)
    assert (store.bucket, store.prefix) == ("images", "lib")
    assert json.loads(layout.settings_path.read_text())["n_buckets"] == layout.n_buckets


def test_a_local_library_refuses_another_folder_from_the_command_line(
    tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    root = tmp_path / "library"
    # The CLI sets both for the process: restored after the test.
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("ASSET_LIBRARY_HOME", str(root))
    (tmp_path / "dagster").mkdir()
    monkeypatch.delenv("ASSET_LIBRARY_OBJECTS", raising=False)
    assert main(["ingest", str(corpus_dir / FOLDER), "--library", str(root)]) == 0
    assert LibraryLayout(root).settings()["objects"] == "objects"
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("ASSET_LIBRARY_OBJECTS", str(elsewhere))
    capsys.readouterr()
    assert main(["ingest", str(corpus_dir / FOLDER), "--library", str(root)]) == 2
    error = capsys.readouterr().err
    assert str(root / "objects") in error and str(elsewhere) in error, error
    assert str(root / "library.json") in error
    assert not elsewhere.exists()
    assert len(list((root / "plans").iterdir())) == 1  # refused before planning


def test_an_s3_library_refuses_another_bucket_before_uploading_anything(
    seaweed: SeaweedS3, s3_bucket: str, corpus_dir: Path, tmp_path: Path
):
    client = seaweed.client()
    other = seaweed.make_bucket(f"{s3_bucket}-typo")
    root = tmp_path / "library"
    env_a = {**seaweed.env(), "ASSET_LIBRARY_OBJECTS": f"s3://{s3_bucket}/library"}
    env_b = {**seaweed.env(), "ASSET_LIBRARY_OBJECTS": f"s3://{other}/library"}
    with dg.instance_for_test() as instance:
        first = _ingest(corpus_dir / FOLDER, root, env_a, instance)
        assert first.success and first.uploaded > 0
        stored = sorted(_keys_in(client, s3_bucket))
        assert len(stored) == first.uploaded
        assert LibraryLayout(root).settings()["objects"] == f"s3://{s3_bucket}/library"

        # The command line: refused before planning.
        with pytest.raises(StoreMismatchError) as raised:
            _ingest(corpus_dir / FOLDER, root, env_b, instance)
        message = str(raised.value)
        assert f"s3://{s3_bucket}/library" in message and f"s3://{other}/library" in message
        assert "library.json" in message and "ASSET_LIBRARY_OBJECTS" in message
        assert len(list((root / "plans").iterdir())) == 1  # no second batch was planned

        # A shard run (sensor, UI, backfill) with the wrong store: refused before any upload.
        defs = build_definitions(build_resources(env_b, root=str(root)))
        rerun = defs.resolve_job_def("ingest_shard").execute_in_process(
            partition_key=f"{first.batch}-s00000", instance=instance, raise_on_error=False
        )
        assert not rerun.success
        failure = next(e for e in rerun.all_events if e.is_step_failure)
        assert f"s3://{other}/library" in failure.step_failure_data.error.to_string()
        assert _keys_in(client, other) == []
        assert sorted(_keys_in(client, s3_bucket)) == stored
        assert LibraryLayout(root).settings()["objects"] == f"s3://{s3_bucket}/library"

        # Without ASSET_LIBRARY_OBJECTS the library uses the store it recorded.
        again = _ingest(corpus_dir / FOLDER, root, seaweed.env(), instance)
        assert again.success and again.uploaded == 0 and again.already_stored == first.ok
        assert again.checks["uploads_present"]
    store = Library(root).object_store()
    assert isinstance(store, S3ObjectStore) and store.bucket == s3_bucket


# -- damaged objects ----------------------------------------------------------------------------


def _damage(store: ObjectStore, md5: str, data: bytes, how: str) -> None:
    body = data[: len(data) // 2] if how == "truncated" else data[:-1] + bytes([data[-1] ^ 1])
    key = object_key(md5)
    if isinstance(store, LocalObjectStore):
        Path(store.uri(key)).write_bytes(body)
    else:
        assert isinstance(store, S3ObjectStore)
        store.client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=body)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_damaged_object_fails_the_check_and_reingesting_repairs_it(
    where: str, request: pytest.FixtureRequest, corpus_dir: Path, tmp_path: Path
):
    env: dict[str, str] = {}
    if where == "s3":
        bucket: str = request.getfixturevalue("s3_bucket")
        s3_env = request.getfixturevalue("s3_env")  # for Library.object_store()'s client
        env = {**s3_env, "ASSET_LIBRARY_OBJECTS": f"s3://{bucket}/library"}
    root = tmp_path / "library"
    source = corpus_dir / FOLDER
    with dg.instance_for_test() as instance:
        assert _ingest(source, root, env, instance).success
        library = Library(root)
        rows = library.query("SELECT md5, source_uri FROM images ORDER BY md5 LIMIT 2")
        (short, short_uri), (flipped, flipped_uri) = [(r["md5"], r["source_uri"]) for r in rows]
        store = Library(root).object_store()
        _damage(store, short, Path(short_uri).read_bytes(), "truncated")
        _damage(store, flipped, Path(flipped_uri).read_bytes(), "same size")

        defs = build_definitions(build_resources(env, root=str(root)))
        audited = defs.resolve_job_def("audit_library").execute_in_process(
            instance=instance, raise_on_error=False
        )
        check = {e.check_name: e for e in audited.get_asset_check_evaluations()}
        assert not check["uploads_present"].passed
        assert check["uploads_present"].metadata["damaged"].value == 2
        named = check["uploads_present"].metadata["damaged_examples"].value
        assert short in named and flipped in named
        assert short in check["uploads_present"].description

        repaired = _ingest(source, root, env, instance)
        assert repaired.repaired == 2 and repaired.uploaded == 0
        assert repaired.checks["uploads_present"], repaired.checks
    for md5, uri in [(short, short_uri), (flipped, flipped_uri)]:
        assert store.get(object_key(md5)) == Path(uri).read_bytes()
