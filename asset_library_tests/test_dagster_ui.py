"""What the Dagster UI shows names what it is about: each shard's check results name the shard,
a failed shard's run failure says its cause on its first line, and the assets' kinds are those
of the stores configured.

Read through the GraphQL queries the UI sends, against the code location loaded in process and
a test instance whose runs execute as they are launched.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster_graphql.test.utils import execute_dagster_graphql

from asset_library.definitions import build_definitions
from asset_library.ids import shard_key

PROJECT = Path(__file__).resolve().parents[1]
LOCATION = "asset_library"
BATCH = "uinames_001"
FOLDER = "github_recurser_exif-orientation-examples"
STORE_SETTINGS = ("ASSET_LIBRARY_OBJECTS", "ASSET_LIBRARY_LAKE", "ASSET_LIBRARY_LANDING")

LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message }
  }
}
"""

#: The check's execution table on the asset's Checks tab (status, partition, description).
CHECK_EXECUTIONS = """
query Executions($assetKey: AssetKeyInput!, $checkName: String!) {
  assetCheckExecutions(assetKey: $assetKey, checkName: $checkName, limit: 10) {
    runId
    evaluation {
      success
      partition
      description
      metadataEntries { label ... on TextMetadataEntry { text } }
    }
  }
}
"""

#: The run page's event log: the failure events and the error each shows.
RUN_FAILURES = """
query Logs($runId: ID!) {
  logsForRun(runId: $runId) {
    ... on EventConnection {
      events {
        __typename
        ... on ExecutionStepFailureEvent { error { message } }
        ... on RunFailureEvent { error { message } }
      }
    }
  }
}
"""

SHARD_CHECKS = {
    "shard_keys": "hash_coverage",
    "shard_uploads": "uploads_present",
    "attributes": "attribute_keys_in_occurrences",
}


@dataclass
class Location:
    instance: dg.DagsterInstance
    workspace: WorkspaceProcessContext
    root: Path

    def graphql(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        result = execute_dagster_graphql(self.workspace.create_request_context(), query, variables)
        return next(iter(result.data.values()))

    def launch_shard(self, shard: str) -> str:
        """What the UI's launch of the ``ingest_shard`` job for one partition sends."""
        selector = {
            "repositoryLocationName": LOCATION,
            "repositoryName": "__repository__",
            "pipelineName": "ingest_shard",
        }
        tags = [{"key": "dagster/partition", "value": shard}]
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


@pytest.fixture(scope="module")
def location(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Location]:
    """A batch of two one-image shards, planned; nothing ingested yet."""
    base = tmp_path_factory.mktemp("ui")
    landed = base / "landing" / BATCH
    landed.mkdir(parents=True)
    for path in sorted((corpus_dir / FOLDER).glob("*.jpg"))[:2]:
        shutil.copyfile(path, landed / path.name)
    root = base / "library"
    launcher = {
        "module": "dagster._core.launcher.sync_in_memory_run_launcher",
        "class": "SyncInMemoryRunLauncher",
    }
    immediate = {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}
    with (
        pytest.MonkeyPatch.context() as env,
        dg.instance_for_test(
            overrides={"run_launcher": launcher, "run_coordinator": immediate}
        ) as instance,
    ):
        env.setenv("ASSET_LIBRARY_HOME", str(root))
        env.setenv("ASSET_LIBRARY_WORKERS", "0")
        env.setenv("ASSET_LIBRARY_SHARD_SIZE", "1")
        for name in STORE_SETTINGS:
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
            yield Location(instance, workspace, root)


def test_each_shard_check_result_names_its_shard(location: Location) -> None:
    shard = shard_key(BATCH, 0)
    run_id = location.launch_shard(shard)
    for asset, check in SHARD_CHECKS.items():
        executions = location.graphql(
            CHECK_EXECUTIONS, {"assetKey": {"path": [asset]}, "checkName": check}
        )
        [evaluation] = [e["evaluation"] for e in executions if e["runId"] == run_id]
        assert evaluation["success"], (check, evaluation)
        # Unpartitioned checks: the UI's Partition column stays empty, so the result says it.
        assert evaluation["partition"] is None
        assert evaluation["description"].startswith(f"shard {shard}: "), evaluation
        entries = {e["label"]: e.get("text") for e in evaluation["metadataEntries"]}
        assert entries["shard"] == shard, (check, entries)


def test_a_failed_shards_run_failure_says_its_cause_first(location: Location) -> None:
    shard = shard_key(BATCH, 1)
    items = location.root / "plans" / BATCH / f"{shard}.parquet"
    moved = items.with_suffix(".away")
    items.rename(moved)
    try:
        run_id = location.launch_shard(shard)
    finally:
        moved.rename(items)
    run = location.instance.get_run_by_id(run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.FAILURE
    events = location.graphql(RUN_FAILURES, {"runId": run_id})["events"]
    failures = {
        e["__typename"]: e["error"]["message"].splitlines()[0]
        for e in events
        if e["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent")
    }
    assert set(failures) == {"ExecutionStepFailureEvent", "RunFailureEvent"}, events
    for kind, first_line in failures.items():
        _, _, cause = first_line.partition(": ")  # after the exception's class
        assert cause.startswith(f"shard {shard}: "), (kind, first_line)
        assert str(items) in cause and "No such file" in cause, (kind, first_line)


@pytest.mark.parametrize(
    ("settings", "objects", "lake"),
    [
        ({}, "filesystem", "filesystem"),
        (
            {
                "ASSET_LIBRARY_OBJECTS": "s3://images-bucket/objects",
                "ASSET_LIBRARY_LAKE": "s3://images-bucket/lake",
            },
            "s3",
            "s3",
        ),
        ({"ASSET_LIBRARY_LAKE": "s3://images-bucket/lake"}, "filesystem", "s3"),
    ],
)
def test_asset_kinds_follow_the_configured_stores(
    settings: dict[str, str],
    objects: str,
    lake: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ASSET_LIBRARY_HOME", str(tmp_path / "library"))
    for name in STORE_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    graph = build_definitions().resolve_asset_graph()
    kinds = {key.to_user_string(): graph.get(key).kinds for key in graph.get_all_asset_keys()}
    assert kinds["shard_uploads"] == {objects}
    for table in ("occurrences", "rejects", "attributes", "images", "lake_compaction"):
        assert kinds[table] == {"deltalake", lake}, table
    assert kinds["shard_keys"] == {"python", "parquet"}  # no store: as declared
