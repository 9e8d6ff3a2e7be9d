"""Triggers against a real Dagster instance: landing, planning, shard runs, refreshes, daily
retries."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pandas as pd

from asset_library import Library
from asset_library.definitions import build_definitions
from asset_library.defs.resources import build_resources
from asset_library.defs.schedules import retry_failed_shards
from asset_library.defs.sensors import landing_sensor, refresh_sensor, shard_sensor
from asset_library.defs.shard_status import shard_statuses
from asset_library.ingest.landing import find_ready_batches


def _tick(sensor, instance, resources, cursor=None) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return sensor(context)


def _land(corpus_dir: Path, batch_dir: Path, count: int) -> None:
    batch_dir.mkdir(parents=True)
    for path in sorted((corpus_dir / "github_recurser_exif-orientation-examples").glob("*"))[
        :count
    ]:
        shutil.copyfile(path, batch_dir / path.name)


def test_a_landed_batch_becomes_shard_runs_without_a_person(tmp_path, corpus_dir):
    landing = tmp_path / "landing"
    _land(corpus_dir, landing / "photos_001", 5)
    resources = build_resources(
        {"ASSET_LIBRARY_LANDING": str(landing), "ASSET_LIBRARY_SHARD_SIZE": "2"},
        root=str(tmp_path / "library"),
    )
    defs = build_definitions(resources)
    with dg.instance_for_test() as instance:
        # no marker yet: the batch is still landing
        first = _tick(landing_sensor, instance, resources)
        assert first.run_requests == []

        (landing / "photos_001" / "_READY").touch()
        tick = _tick(landing_sensor, instance, resources, first.cursor)
        [request] = tick.run_requests
        assert request.partition_key == "photos_001"
        assert request.tags["asset_library/batch"] == "photos_001"
        trigger = request.tags["asset_library/trigger"]
        assert trigger.startswith("landing-")
        [add] = tick.dynamic_partitions_requests
        assert list(add.partition_keys) == ["photos_001"]

        # the same batch never triggers twice
        again = _tick(landing_sensor, instance, resources, tick.cursor)
        assert again.run_requests == []

        # what the daemon does with the request: add the partition, launch the plan run
        instance.add_dynamic_partitions("batches", list(add.partition_keys))
        planned = defs.resolve_job_def("plan_batch").execute_in_process(
            partition_key=request.partition_key,
            run_config=request.run_config,
            tags=request.tags,
            instance=instance,
        )
        assert planned.success

        shards = _tick(shard_sensor, instance, resources)
        keys = [r.partition_key for r in shards.run_requests]
        assert keys == ["photos_001-s00000", "photos_001-s00001", "photos_001-s00002"]
        assert all(r.tags["asset_library/trigger"] == trigger for r in shards.run_requests)
        assert set(instance.get_dynamic_partitions("shards")) == set(keys)
        later = _tick(shard_sensor, instance, resources, shards.cursor)
        assert later.run_requests == []

        # one shard ran, one failed, one never ran: the daily schedule retries the last two
        shard_job = defs.resolve_job_def("ingest_shard")
        assert shard_job.execute_in_process(partition_key=keys[0], instance=instance).success
        # a sensor started afresh (no cursor) does not ingest an ingested shard a second time
        fresh = _tick(shard_sensor, instance, resources)
        assert [r.partition_key for r in fresh.run_requests] == keys[1:]
        (tmp_path / "library" / "plans" / "photos_001" / f"{keys[1]}.parquet").unlink()
        failed = shard_job.execute_in_process(
            partition_key=keys[1], instance=instance, raise_on_error=False
        )
        assert not failed.success
        context = dg.build_schedule_context(
            instance=instance, scheduled_execution_time=datetime(2026, 11, 24, 3, tzinfo=UTC)
        )
        retries = retry_failed_shards(context)
        assert sorted(r.partition_key for r in retries) == keys[1:]
        assert all(r.tags["asset_library/trigger"] == "schedule-20261124T0300" for r in retries)


def test_manifests_and_marked_folders_are_ready_batches(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "_READY").touch()
    (tmp_path / "c.csv").write_text("uri\nx.jpg\n")
    (tmp_path / ".hidden.csv").write_text("uri\n")
    found = find_ready_batches(str(tmp_path))
    assert [(b.name, Path(b.source).name) for b in found] == [("b", "b"), ("c.csv", "c.csv")]
    assert [b.name for b in find_ready_batches(str(tmp_path), skip=["b"])] == ["c.csv"]


def test_sensors_and_schedule_start_running(tmp_path):
    defs = build_definitions(build_resources({}, root=str(tmp_path)))
    with dg.instance_for_test():
        for name in ("landing_sensor", "shard_sensor", "refresh_sensor"):
            sensor = defs.resolve_sensor_def(name)
            assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
        schedule = defs.resolve_schedule_def("retry_failed_shards")
        assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
        assert defs.resolve_job_def("ingest_shard").executor_def.name == "in_process"


def test_good_shards_reach_the_library_while_a_sibling_is_still_failing(tmp_path, corpus_dir):
    landed = tmp_path / "landing" / "photos_002"
    _land(corpus_dir, landed, 3)
    resources = build_resources({"ASSET_LIBRARY_SHARD_SIZE": "1"}, root=str(tmp_path / "library"))
    defs = build_definitions(resources)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("batches", ["photos_002"])
        assert (
            defs.resolve_job_def("plan_batch")
            .execute_in_process(
                partition_key="photos_002",
                run_config={"ops": {"batch_plan": {"config": {"source": str(landed)}}}},
                instance=instance,
            )
            .success
        )
        good, bad, other = [f"photos_002-s{n:05d}" for n in range(3)]
        shard_job = defs.resolve_job_def("ingest_shard")
        for shard in (good, other):
            assert shard_job.execute_in_process(partition_key=shard, instance=instance).success
        plan_file = tmp_path / "library" / "plans" / "photos_002" / f"{bad}.parquet"
        away = plan_file.rename(plan_file.with_suffix(".away"))  # this shard fails, and its
        # retry is still running
        assert not shard_job.execute_in_process(
            partition_key=bad, instance=instance, raise_on_error=False
        ).success
        retry = shard_job.execute_in_process(
            partition_key=bad, instance=instance, raise_on_error=False
        )
        instance.handle_run_event(  # the daemon's retry of it, started and not ended
            retry.run_id,
            dg.DagsterEvent(dg.DagsterEventType.RUN_START.value, job_name="ingest_shard"),
        )
        assert instance.get_run_by_id(retry.run_id).status == dg.DagsterRunStatus.STARTED

        tick = _tick(refresh_sensor, instance, resources)
        [request] = tick.run_requests
        assert request.tags == {
            "asset_library/batch": "photos_002",
            "asset_library/trigger": "sensor",
        }
        refreshed = defs.resolve_job_def("refresh_library").execute_in_process(
            instance=instance, tags=request.tags
        )
        assert refreshed.success
        shards = Library(tmp_path / "library").frame(
            "SELECT shard, count(*) AS images FROM images GROUP BY shard ORDER BY shard"
        )
        assert isinstance(shards, pd.DataFrame)
        assert shards.to_dict("records") == [
            {"shard": good, "images": 1},
            {"shard": other, "images": 1},
        ]
        assert shard_statuses(instance, [bad])[bad] == dg.AssetPartitionStatus.IN_PROGRESS

        # nothing new landed: no second refresh
        assert isinstance(_tick(refresh_sensor, instance, resources, tick.cursor), dg.SkipReason)

        # the failing shard lands while a refresh is about to start: its refresh waits for it
        away.rename(plan_file)
        assert shard_job.execute_in_process(partition_key=bad, instance=instance).success
        pending = instance.create_run_for_job(
            defs.resolve_job_def("refresh_library"), status=dg.DagsterRunStatus.NOT_STARTED
        )
        waiting = _tick(refresh_sensor, instance, resources, tick.cursor)
        assert isinstance(waiting, dg.SkipReason) and pending.run_id in waiting.skip_message
        instance.report_run_canceled(pending)
        [later] = _tick(refresh_sensor, instance, resources, tick.cursor).run_requests
        assert later.tags["asset_library/batch"] == "photos_002"


def test_a_refresh_of_several_batches_names_them_all():
    from asset_library.defs.tags import MAX_BATCHES_TAG_CHARS, batch_tags

    assert batch_tags(["b1", "b1"]) == {"asset_library/batch": "b1"}
    assert batch_tags(["b2", "b1", "b2"]) == {
        "asset_library/batch": "several",
        "asset_library/batches": "b1,b2",
    }
    many = batch_tags([f"photos_{n:04d}" for n in range(500)])
    assert len(many["asset_library/batches"]) == MAX_BATCHES_TAG_CHARS
    assert many["asset_library/batches"].endswith("...")
