"""Every route a user takes to re-run a failed shard runs all of it, and its runs carry the batch
and trigger tags.

The UI's routes go through the GraphQL mutations the UI sends (launching one partition of one
asset, an asset backfill, a job backfill, re-execution from failure), against the code location
loaded in process and a test instance whose runs execute as they are launched; backfills are
advanced by the daemon's own backfill iteration. Each shard first fails for a real reason (its
plan file is missing) in a run tagged as a sensor tags it, then is repaired and re-run.
A shard whose keys fail a check writes no lake row.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.dataset as ds
import pytest
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.backfill import execute_backfill_iteration
from dagster_graphql.test.utils import execute_dagster_graphql

from asset_library import Library
from asset_library.definitions import build_definitions
from asset_library.defs.assets.ingestion import SHARD_OUTPUTS
from asset_library.defs.resources import LocalObjectStoreResource, build_resources
from asset_library.defs.schedules import retry_failed_shards
from asset_library.defs.shard_status import shard_statuses
from asset_library.ids import shard_key
from asset_library.lake import SHARD_TABLES, Lake, row_count
from asset_library.layout import LibraryLayout
from asset_library.storage import LocalObjectStore, ObjectStore, PutResult

PROJECT = Path(__file__).resolve().parents[1]
LOCATION = "asset_library"
BATCH = "photos_001"
SENSOR_TRIGGER = "landing-20261130T000000-test"
SHARDS = 6
FOLDER = "github_recurser_exif-orientation-examples"
REPOSITORY = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__"}
FROM_UI = {"key": "dagster/from_ui", "value": "true"}
#: Launched runs start at once (no queue, no daemon needed) and run to their end in the launch.
IMMEDIATE = {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}

LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""

#: What the launch dialog asks before launching: the assets that must run with the chosen ones.
REQUIRED = """
query Required($keys: [AssetKeyInput!]!) {
  assetNodeAdditionalRequiredKeys(assetKeys: $keys) { path }
}
"""

REEXECUTE = """
mutation Reexecute($params: ReexecutionParams!) {
  launchPipelineReexecution(reexecutionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message }
  }
}
"""

BACKFILL = """
mutation Backfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on PartitionSetNotFoundError { message }
  }
}
"""


@dataclass
class Setup:
    instance: dg.DagsterInstance
    workspace: WorkspaceProcessContext
    root: Path
    shards: list[str]

    def graphql(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        context = self.workspace.create_request_context()
        result = execute_dagster_graphql(context, query, variables)
        return next(iter(result.data.values()))

    def with_required(self, asset: str) -> list[str]:
        """The asset and those the launch dialog adds because they must run with it."""
        required = self.graphql(REQUIRED, {"keys": [{"path": [asset]}]})
        return [asset, *sorted(key["path"][0] for key in required)]

    def launch(
        self,
        job: str,
        tags: list[dict[str, str]],
        shard: str | None = None,
        assets: list[str] | None = None,
    ) -> str:
        """What the UI's launch button sends; returns the run id."""
        selector: dict[str, Any] = {**REPOSITORY, "pipelineName": job}
        if assets is not None:
            selector["assetSelection"] = [{"path": [key]} for key in assets]
        if shard is not None:
            tags = [{"key": "dagster/partition", "value": shard}, *tags]
        answer = self.graphql(
            LAUNCH,
            {
                "params": {
                    "selector": selector,
                    "mode": "default",
                    "runConfigData": {},
                    "executionMetadata": {"tags": tags},
                }
            },
        )
        assert answer["__typename"] == "LaunchRunSuccess", answer
        return answer["run"]["runId"]

    def fail(self, shard: str) -> dg.DagsterRun:
        """A run of the shard, launched as the shard sensor launches it, that fails for a real
        reason: its plan file is missing while it runs."""
        plan_file = self.root / "plans" / BATCH / f"{shard}.parquet"
        moved = plan_file.with_suffix(".away")
        plan_file.rename(moved)
        try:
            run_id = self.launch(
                "ingest_shard",
                [
                    {"key": "asset_library/batch", "value": BATCH},
                    {"key": "asset_library/trigger", "value": SENSOR_TRIGGER},
                ],
                shard,
            )
        finally:
            moved.rename(plan_file)
        run = self.instance.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.FAILURE
        assert shard_statuses(self.instance, [shard])[shard] == dg.AssetPartitionStatus.FAILED
        return run

    def backfill(self, params: dict[str, Any]) -> tuple[str, list[dg.DagsterRun]]:
        answer = self.graphql(BACKFILL, {"params": {**params, "tags": [FROM_UI]}})
        assert answer["__typename"] == "LaunchBackfillSuccess", answer
        backfill_id = answer["backfillId"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            list(execute_backfill_iteration(self.workspace, logging.getLogger("backfill")))
            backfill = self.instance.get_backfill(backfill_id)
            if backfill is not None and backfill.status != BulkActionStatus.REQUESTED:
                break
        runs = self.instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), runs
        return backfill_id, list(runs)


@pytest.fixture(scope="module")
def setup(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """One batch of six one-image shards, planned; nothing ingested yet."""
    base = tmp_path_factory.mktemp("routes")
    landed = base / "landing" / BATCH
    landed.mkdir(parents=True)
    for path in sorted((corpus_dir / FOLDER).glob("*.jpg"))[:SHARDS]:
        shutil.copyfile(path, landed / path.name)
    root = base / "library"
    launcher = {
        "module": "dagster._core.launcher.sync_in_memory_run_launcher",
        "class": "SyncInMemoryRunLauncher",
    }
    with (
        pytest.MonkeyPatch.context() as env,
        dg.instance_for_test(
            overrides={"run_launcher": launcher, "run_coordinator": IMMEDIATE}
        ) as instance,
    ):
        # runs launched through the workspace load the code location from the environment
        env.setenv("ASSET_LIBRARY_HOME", str(root))
        env.setenv("ASSET_LIBRARY_WORKERS", "0")
        env.setenv("ASSET_LIBRARY_SHARD_SIZE", "1")
        for name in ("ASSET_LIBRARY_OBJECTS", "ASSET_LIBRARY_LAKE", "ASSET_LIBRARY_LANDING"):
            env.delenv(name, raising=False)
        instance.add_dynamic_partitions("batches", [BATCH])
        planned = (
            build_definitions()
            .resolve_job_def("plan_batch")
            .execute_in_process(
                partition_key=BATCH,
                run_config={"ops": {"batch_plan": {"config": {"source": str(landed)}}}},
                instance=instance,
            )
        )
        assert planned.success
        origin = InProcessCodeLocationOrigin(
            LoadableTargetOrigin(
                module_name="asset_library.definitions", working_directory=str(PROJECT)
            ),
            location_name=LOCATION,
        )
        with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as workspace:
            yield Setup(instance, workspace, root, [shard_key(BATCH, n) for n in range(SHARDS)])


def _assert_whole(setup: Setup, shard: str, runs: list[dg.DagsterRun]) -> None:
    """The shard is materialized by all of its outputs, in the runs given, and its rows are in
    the lake."""
    assert shard_statuses(setup.instance, [shard])[shard] == dg.AssetPartitionStatus.MATERIALIZED
    run_ids = {r.run_id for r in runs}
    for key in SHARD_OUTPUTS:
        [record] = setup.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[shard]), limit=1
        ).records
        assert record.run_id in run_ids, key
    lake = Lake.of(LibraryLayout.open(setup.root), {})
    occurrences = lake.open("occurrences").to_pyarrow_dataset()
    assert occurrences.count_rows(filter=ds.field("shard") == shard) == 1


def _tags(run: dg.DagsterRun) -> tuple[str | None, str | None]:
    return run.tags.get("asset_library/batch"), run.tags.get("asset_library/trigger")


def _stored(setup: Setup, run_id: str) -> dg.DagsterRun:
    run = setup.instance.get_run_by_id(run_id)
    assert run is not None
    return run


def test_launching_one_asset_of_a_shard_from_the_ui_runs_the_whole_shard(setup: Setup) -> None:
    shard = setup.shards[0]
    setup.fail(shard)
    # The partition launch dialog of the `occurrences` asset: the UI adds the assets that must
    # run with it, as Dagster names them (a launch of `occurrences` alone is refused).
    selection = setup.with_required("occurrences")
    assert sorted(selection) == sorted(SHARD_OUTPUTS)
    run = _stored(setup, setup.launch("__ASSET_JOB", [FROM_UI], shard, selection))
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert _tags(run) == (BATCH, "ui")
    _assert_whole(setup, shard, [run])


def test_an_asset_backfill_of_failed_shards_runs_them_whole(setup: Setup) -> None:
    shards = setup.shards[1:3]
    for shard in shards:
        setup.fail(shard)
    # Partitions tab of `shard_keys` -> Failed -> Materialize: an asset backfill of the asset
    # and the shard's other outputs, which the dialog adds.
    selection = setup.with_required("shard_keys")
    assert sorted(selection) == sorted(SHARD_OUTPUTS)
    backfill_id, runs = setup.backfill(
        {"assetSelection": [{"path": [key]} for key in selection], "partitionNames": shards}
    )
    assert sorted(r.tags["dagster/partition"] for r in runs) == shards
    assert {_tags(r) for r in runs} == {(BATCH, f"backfill-{backfill_id}")}
    for shard in shards:
        _assert_whole(setup, shard, runs)


def test_a_job_backfill_runs_the_shard_whole(setup: Setup) -> None:
    shard = setup.shards[3]
    setup.fail(shard)
    backfill_id, [run] = setup.backfill(
        {
            "selector": {
                "partitionSetName": "ingest_shard_partition_set",
                "repositorySelector": REPOSITORY,
            },
            "partitionNames": [shard],
        }
    )
    assert run.job_name == "ingest_shard"
    assert _tags(run) == (BATCH, f"backfill-{backfill_id}")
    _assert_whole(setup, shard, [run])


def test_reexecution_from_failure_runs_the_shard_whole_with_the_sensors_tags(
    setup: Setup,
) -> None:
    shard = setup.shards[4]
    failed = setup.fail(shard)
    answer = setup.graphql(
        REEXECUTE, {"params": {"parentRunId": failed.run_id, "strategy": "FROM_FAILURE"}}
    )
    assert answer["__typename"] == "LaunchRunSuccess", answer
    run = _stored(setup, answer["run"]["runId"])
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert _tags(run) == (BATCH, SENSOR_TRIGGER)
    _assert_whole(setup, shard, [run])


def test_the_retry_schedule_judges_and_reruns_the_shard_whole(setup: Setup) -> None:
    shard = setup.shards[5]
    setup.fail(shard)
    context = dg.build_schedule_context(
        instance=setup.instance, scheduled_execution_time=datetime(2026, 11, 30, 3, tzinfo=UTC)
    )
    requests = {r.partition_key: r for r in retry_failed_shards(context)}
    assert shard in requests
    request = requests[shard]
    result = (
        build_definitions()
        .resolve_job_def("ingest_shard")
        .execute_in_process(
            partition_key=shard, tags=request.tags, instance=setup.instance, raise_on_error=False
        )
    )
    assert result.success
    run = _stored(setup, result.run_id)
    assert _tags(run) == (BATCH, "schedule-20261130T0300")
    _assert_whole(setup, shard, [run])

    # a refresh launched from the UI brings every whole shard into the library, and tags itself
    refresh = _stored(setup, setup.launch("refresh_library", [FROM_UI]))
    assert refresh.status == dg.DagsterRunStatus.SUCCESS
    assert _tags(refresh)[1] == "ui"
    statuses = shard_statuses(setup.instance, setup.shards)
    whole = [s for s in setup.shards if statuses[s] == dg.AssetPartitionStatus.MATERIALIZED]
    assert shard in whole
    rows = Library(setup.root).query("SELECT shard, count(*) AS n FROM images GROUP BY shard")
    assert {r["shard"]: r["n"] for r in rows} == dict.fromkeys(whole, 1)
    assert _tags(refresh)[0] == BATCH  # the batch of the shards it merged


class ForgetfulStore(LocalObjectStore):
    """A store that acknowledges writes it does not keep (a lost disk, a bucket's lifecycle
    rule gone wrong): what ``uploads_present`` is there to catch."""

    def put_if_absent(
        self, key: str, data: bytes, md5_hex: str, *, suspect: bool = False
    ) -> PutResult:
        result = super().put_if_absent(key, data, md5_hex, suspect=suspect)
        Path(self.uri(key)).unlink()
        return result


class ForgetfulStoreResource(LocalObjectStoreResource):
    def open(self) -> ObjectStore:
        return ForgetfulStore(Path(self.path))


def test_a_shard_whose_keys_fail_a_check_writes_no_lake_row(corpus_dir: Path, tmp_path: Path):
    landed = tmp_path / BATCH
    landed.mkdir()
    for path in sorted((corpus_dir / FOLDER).glob("*.jpg"))[:2]:
        shutil.copyfile(path, landed / path.name)
    root = tmp_path / "library"
    resources = build_resources({}, root=str(root))
    resources["object_store"] = ForgetfulStoreResource(path=str(root / "objects"))
    defs = build_definitions(resources)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("batches", [BATCH])
        assert (
            defs.resolve_job_def("plan_batch")
            .execute_in_process(
                partition_key=BATCH,
                run_config={"ops": {"batch_plan": {"config": {"source": str(landed)}}}},
                instance=instance,
            )
            .success
        )
        shard = shard_key(BATCH, 0)
        result = defs.resolve_job_def("ingest_shard").execute_in_process(
            partition_key=shard, instance=instance, raise_on_error=False
        )
        assert not result.success
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks == {"hash_coverage": True, "uploads_present": False}  # shown in the UI
        assert result.get_asset_materialization_events() == []
        assert shard_statuses(instance, [shard])[shard] == dg.AssetPartitionStatus.FAILED
    lake = Lake.of(LibraryLayout.open(root), {})
    # the plan created the tables a shard writes (empty); the shard wrote no row to any
    opened = {table: lake.open(table) for table in SHARD_TABLES}
    assert None not in opened.values() and not any(row_count(t) for t in opened.values())
