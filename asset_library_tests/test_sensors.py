"""Triggers against a real Dagster instance: landing, planning, shard runs, refreshes, daily
retries."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pandas as pd
from dagster._core.scheduler.instigation import InstigatorType, TickStatus

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


class _Daemon:
    """The sensor daemon's own loop, one iteration at a time, on a real instance: partition
    requests are applied and runs submitted (queued, not launched) exactly as `dagster-daemon`
    does, and each tick is recorded with its status, reason and log."""

    def __init__(self, instance: dg.DagsterInstance, workspace) -> None:
        self.instance, self.workspace = instance, workspace
        self.now = datetime.now(UTC)

    def tick(self):
        from dagster._core.test_utils import freeze_time
        from dagster._daemon.sensor import execute_sensor_iteration

        self.now += timedelta(seconds=60)  # past every sensor's minimum interval
        with freeze_time(self.now):
            list(execute_sensor_iteration(self.workspace, logging.getLogger("daemon"), None, None))
        [state] = [
            s
            for s in self.instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
            if s.instigator_name == "landing_sensor"
        ]
        return self.instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)[0]

    def requested(self) -> list[str]:
        """The batches whose plan runs the sensor submitted."""
        runs = self.instance.get_runs(
            dg.RunsFilter(job_name="plan_batch", statuses=[dg.DagsterRunStatus.QUEUED])
        )
        return sorted(r.tags["dagster/partition"] for r in runs)

    def log(self, tick) -> str:
        from dagster._core.definitions.instigation_logger import get_instigation_log_records

        return "\n".join(r["msg"] for r in get_instigation_log_records(self.instance, tick.log_key))


@contextmanager
def _daemon(monkeypatch, library: Path, landing: Path) -> Iterator[_Daemon]:
    """The project's code location loaded as the daemon loads it, with this library and
    landing zone, on an instance whose runs queue instead of launching."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget

    monkeypatch.setenv("ASSET_LIBRARY_HOME", str(library))
    monkeypatch.setenv("ASSET_LIBRARY_LANDING", str(landing))
    queued = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}
    origin = LoadableTargetOrigin(module_name="asset_library.definitions", attribute="defs")
    target = InProcessWorkspaceLoadTarget(
        InProcessCodeLocationOrigin(origin, location_name="asset_library")
    )
    with (
        dg.instance_for_test(overrides={"run_coordinator": queued}) as instance,
        create_test_daemon_workspace_context(target, instance) as workspace,
    ):
        yield _Daemon(instance, workspace)


def _land_ready(corpus_dir: Path, folder: Path) -> None:
    _land(corpus_dir, folder, 1)
    (folder / "_READY").touch()


def test_names_that_clean_alike_landed_in_one_tick_are_separate_batches(
    tmp_path, corpus_dir, monkeypatch
):
    landing = tmp_path / "landing"
    for name in ("photos-2024", "photos_2024", "photos 2024"):
        _land_ready(corpus_dir, landing / name)
    long_name = "x" * 60
    _land_ready(corpus_dir, landing / f"{long_name}_a")
    _land_ready(corpus_dir, landing / f"{long_name}_b")
    for name in ("pics.csv", "pics.jsonl"):
        (landing / name).write_text("uri\nphotos_2024/a.jpg\n")
    with _daemon(monkeypatch, tmp_path / "library", landing) as daemon:
        tick = daemon.tick()
        assert tick.status == TickStatus.SUCCESS, tick.error
        requested = daemon.requested()
        assert len(requested) == len(set(requested)) == 7
        assert "photos_2024" in requested  # a name cleaning leaves alone keeps its id
        assert sorted(daemon.instance.get_dynamic_partitions("batches")) == requested

        # a batch landed later is requested on the next tick
        _land_ready(corpus_dir, landing / "unrelated")
        assert daemon.tick().status == TickStatus.SUCCESS
        assert daemon.requested() == sorted([*requested, "unrelated"])


def test_a_name_landed_later_that_cleans_alike_is_still_ingested(tmp_path, corpus_dir, monkeypatch):
    landing = tmp_path / "landing"
    _land_ready(corpus_dir, landing / "photos_2024")
    with _daemon(monkeypatch, tmp_path / "library", landing) as daemon:
        assert daemon.tick().status == TickStatus.SUCCESS
        _land_ready(corpus_dir, landing / "photos-2024")
        assert daemon.tick().status == TickStatus.SUCCESS
        requested = daemon.requested()
        assert len(requested) == 2 and requested[0] == "photos_2024"
        assert requested[1].startswith("photos_2024_")


def test_a_batch_whose_id_is_taken_is_skipped_with_its_reason_and_the_rest_go_on(
    tmp_path, corpus_dir, monkeypatch, run_cli
):
    library, landing = tmp_path / "library", tmp_path / "landing"
    elsewhere = tmp_path / "elsewhere"
    _land(corpus_dir, elsewhere, 1)
    with _daemon(monkeypatch, library, landing) as daemon:
        # a person planned batch "holiday" from another folder before it landed
        defs = build_definitions(build_resources({}, root=str(library)))
        daemon.instance.add_dynamic_partitions("batches", ["holiday"])
        config = {"ops": {"batch_plan": {"config": {"source": str(elsewhere)}}}}
        plan_job = defs.resolve_job_def("plan_batch")
        planned = plan_job.execute_in_process(
            partition_key="holiday", run_config=config, instance=daemon.instance
        )
        assert planned.success
        _land_ready(corpus_dir, landing / "holiday")
        _land_ready(corpus_dir, landing / "other")
        tick = daemon.tick()
        assert tick.status == TickStatus.SUCCESS, tick.error
        assert daemon.requested() == ["other"]
        skipped = str(landing / "holiday")
        reason = f"batch id holiday is taken by the batch planned from {elsewhere}"
        assert f"landed {skipped} skipped: {reason}" in daemon.log(tick)

        # alone in a tick, the skip is the tick's reason; it is never retried
        _land_ready(corpus_dir, landing / "photos_001")
        shutil.copytree(landing / "photos_001", elsewhere / "photos_001")
        daemon.instance.add_dynamic_partitions("batches", ["photos_001"])
        config = {"ops": {"batch_plan": {"config": {"source": str(elsewhere / "photos_001")}}}}
        assert plan_job.execute_in_process(
            partition_key="photos_001", run_config=config, instance=daemon.instance
        ).success
        tick = daemon.tick()
        assert tick.status == TickStatus.SKIPPED
        assert f"landed {landing / 'photos_001'} skipped: batch id photos_001" in tick.skip_reason
        assert "skipped" not in daemon.tick().skip_reason

    code, out, _ = run_cli("status")
    assert code == 0
    assert f"skipped landing {skipped} (" in out and "batch id holiday is taken" in out
    # ingested by hand under another id, it is no longer listed
    defs.resolve_job_def("plan_batch").execute_in_process(
        partition_key="holiday_2",
        run_config={"ops": {"batch_plan": {"config": {"source": skipped}}}},
        instance=_partitioned(dg.DagsterInstance.get(), "holiday_2"),
    )
    code, out, _ = run_cli("status")
    assert f"skipped landing {skipped} (" not in out
    assert f"skipped landing {landing / 'photos_001'} (" in out


def _partitioned(instance: dg.DagsterInstance, batch: str) -> dg.DagsterInstance:
    instance.add_dynamic_partitions("batches", [batch])
    return instance


def test_a_batch_an_earlier_version_never_ingested_is_ingested_now(tmp_path, corpus_dir):
    landing, library = tmp_path / "landing", tmp_path / "library"
    for name in ("photos_2024", "photos-2024"):
        _land_ready(corpus_dir, landing / name)
    resources = build_resources({"ASSET_LIBRARY_LANDING": str(landing)}, root=str(library))
    defs = build_definitions(resources)
    with dg.instance_for_test() as instance:
        # what an earlier version left: both names seen, one plan under the id they shared
        instance.add_dynamic_partitions("batches", ["photos_2024"])
        config = {"ops": {"batch_plan": {"config": {"source": str(landing / "photos_2024")}}}}
        assert (
            defs.resolve_job_def("plan_batch")
            .execute_in_process(partition_key="photos_2024", run_config=config, instance=instance)
            .success
        )
        old_cursor = json.dumps(["photos_2024", "photos-2024"])
        tick = _tick(landing_sensor, instance, resources, old_cursor)
        [request] = tick.run_requests
        assert request.partition_key.startswith("photos_2024_")
        assert request.run_config["ops"]["batch_plan"]["config"]["source"].endswith("photos-2024")
        again = _tick(landing_sensor, instance, resources, tick.cursor)
        assert again.run_requests == []
