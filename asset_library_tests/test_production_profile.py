"""The production profile for real: Postgres storage, the daemon, the run queue, a webserver.

A batch lands; the daemon's sensors plan it and run its shards side by side; two shards fail
for a real reason (their object folder is blocked by a file); once unblocked, one is backfilled
through GraphQL over HTTP and the other with the `dagster job backfill` command that
docs/operations.md gives, and the library ends complete. Written against job names, the
landing zone, run records and `Library` queries, so asset names may change underneath.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from pydantic_core import to_jsonable_python

from asset_library import Library
from asset_library.ids import shard_key
from asset_library.layout import LibraryLayout
from asset_library.serving import STORE_SETTING
from asset_library.serving.backend import PASSWORD_SETTING
from asset_library.storage import object_key
from asset_library_tests.support.corpus import corpus_jpegs
from asset_library_tests.support.dagster_processes import Webserver, start_daemon
from asset_library_tests.support.deployment import (
    REPO,
    deployed_env,
    make_clone,
    shard_runs,
    wait_for,
)
from asset_library_tests.support.postgres import PostgresServer
from asset_library_tests.support.serve_process import ServeReplica

DEPLOY = REPO / "deploy"
SHARDS = 3
IMAGES_PER_SHARD = 4
BATCH = "photos_001"
LOCATION = "asset_library"  # pinned in workspace.yaml

STAND_IN_KUBECONFIG = {
    "apiVersion": "v1",
    "kind": "Config",
    "current-context": "stand-in",
    "clusters": [{"name": "stand-in", "cluster": {"server": "https://127.0.0.1:1"}}],
    "users": [{"name": "stand-in", "user": {"token": "not-a-secret"}}],
    "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "stand-in"}}],
}

LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
    ... on PartitionSetNotFoundError { message }
    ... on InvalidSubsetError { message }
    ... on RunConflict { message }
  }
}
"""


def _machine_home(tmp_path: Path) -> Path:
    """deploy/dagster.yaml in a home of its own: an instance writes local files beside it."""
    home = tmp_path / "machine-home"
    home.mkdir()
    shutil.copyfile(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    return home


def _k8s_home(tmp_path: Path) -> Path:
    """deploy/k8s/dagster.yaml with its kubeconfig_file pointed at a stand-in file."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(STAND_IN_KUBECONFIG))
    config = yaml.safe_load((DEPLOY / "k8s" / "dagster.yaml").read_text())
    config["run_launcher"]["config"]["kubeconfig_file"] = str(kubeconfig)
    home = tmp_path / "k8s-home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


def test_every_deploy_profile_loads_with_credentials_from_the_environment(
    postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in postgres.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ASSET_LIBRARY_IMAGE", "registry.example/asset-library:1")
    homes = {"machine": _machine_home(tmp_path), "k8s": _k8s_home(tmp_path)}
    for profile, home in homes.items():
        storage = yaml.safe_load((home / "dagster.yaml").read_text())["storage"]["postgres"]
        credentials = storage["postgres_db"]
        assert all(
            isinstance(credentials[f], dict) and "env" in credentials[f]
            for f in ("hostname", "port", "username", "password", "db_name")
        ), f"{profile}: a credential written into the file"
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage", profile
            assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
            assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
            coordinator = instance.run_coordinator
            assert isinstance(coordinator, dg.QueuedRunCoordinator), profile
            # a launch waits for the run process to load the code: launch from several threads
            assert coordinator.dequeue_use_threads and coordinator.dequeue_num_workers > 1
            assert instance.get_sensor_settings()["num_submit_workers"] > 1
            queue = instance.get_concurrency_config().run_queue_config
            assert queue is not None
            assert queue.tag_concurrency_limits == [{"key": "asset_library/serial", "limit": 1}]
            assert queue.max_concurrent_runs > 1
            # Postgres really answers: a partition written here is read back.
            instance.add_dynamic_partitions("shards", [f"{profile}_001-s00000"])
            assert instance.has_dynamic_partition("shards", f"{profile}_001-s00000")
            launcher = instance.run_launcher
            if profile == "machine":
                assert isinstance(launcher, dg.DefaultRunLauncher)
            else:
                from dagster_k8s import K8sRunLauncher

                assert isinstance(launcher, K8sRunLauncher)
                assert launcher.instance_config_map == "asset-library-instance"
                assert launcher.load_incluster_config is False
                assert launcher.kubeconfig_file == str(tmp_path / "kubeconfig")
                assert launcher.job_image == "registry.example/asset-library:1"


def test_postgres_partition_costs_per_key(
    postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a sensor tick pays per shard key on Postgres (printed; run with -s to see)."""
    for name, value in postgres.env().items():
        monkeypatch.setenv(name, value)
    keys = [shard_key("costs_001", n) for n in range(2000)]
    with dg.DagsterInstance.from_config(str(_machine_home(tmp_path))) as instance:
        start = time.perf_counter()
        instance.add_dynamic_partitions("shards", keys)
        add = (time.perf_counter() - start) / len(keys)
        start = time.perf_counter()
        found = [instance.has_dynamic_partition("shards", key) for key in keys[:100]]
        has = (time.perf_counter() - start) / 100
        assert all(found)
        assert set(keys) <= set(instance.get_dynamic_partitions("shards"))
    print(
        f"\npostgres: add_dynamic_partitions {add * 1e3:.3f} ms/key (2,000 in one call), "
        f"has_dynamic_partition {has * 1e3:.1f} ms/key: {60 / has:,.0f} keys per 60 s"
    )


# --- the end-to-end run ----------------------------------------------------------------------


def _object_folder(layout: LibraryLayout, md5: str) -> Path:
    """`objects/images/<md5[0:2]>`: the folder every object of that prefix goes under."""
    return layout.objects_dir.joinpath(*object_key(md5).split("/")[:2])


def _max_overlap(records: list[dg.RunRecord]) -> int:
    """The most runs that were running at one moment."""
    edges = sorted(
        [(r.start_time, 1) for r in records] + [(r.end_time, -1) for r in records],
        key=lambda edge: (edge[0], edge[1]),
    )
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def _library_count(root: Path) -> dict[str, int] | None:
    """Images per shard, once the catalog exists and every shard is in it."""
    try:
        rows = Library(root).query("SELECT shard, count(*) AS n FROM images GROUP BY shard")
    except Exception:  # no catalog yet (refresh_sensor requests it once shards land)
        return None
    return {row["shard"]: row["n"] for row in rows}


@pytest.mark.daemon
def test_a_landed_batch_runs_on_the_production_profile(
    postgres: PostgresServer,
    corpus_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The working folder is laid out like a clone, so the documented backfill command runs
    # verbatim.
    clone = make_clone(tmp_path)
    config = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    config["run_retries"] = {"enabled": False}  # the backfill, not a retry, repairs the shards
    (clone.home / "dagster.yaml").write_text(yaml.safe_dump(config))
    # The serving store in the same server, a database of its own (its password apart).
    store = {
        STORE_SETTING: postgres.new_database("serving_store"),
        PASSWORD_SETTING: postgres.password,
    }
    env = deployed_env(clone, {**postgres.env(), **store}, shard_size=IMAGES_PER_SHARD)
    for name, value in {**postgres.env(), **store}.items():
        monkeypatch.setenv(name, value)

    # The batch lands without its marker; two shards' object folders are blocked by files.
    images = corpus_jpegs(corpus_dir, SHARDS * IMAGES_PER_SHARD)
    landed = clone.land(BATCH, images)
    shards = [shard_key(BATCH, n) for n in range(SHARDS)]
    layout = LibraryLayout.open(clone.root)
    blocked: dict[str, Path] = {}
    for number in (1, 2):
        own = images[number * IMAGES_PER_SHARD : (number + 1) * IMAGES_PER_SHARD]
        others = {md5[:2] for _, md5 in images} - {md5[:2] for _, md5 in own}
        # the shard's last image: its run reads the others first, then fails at the upload
        md5 = next(md5 for _, md5 in reversed(own) if md5[:2] not in others)
        folder = _object_folder(layout, md5)
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.write_text("a file where a folder of objects must be\n")
        blocked[shards[number]] = folder

    with dg.DagsterInstance.from_config(str(clone.home)) as instance:  # creates the schema once
        daemon = start_daemon(env, tmp_path, tmp_path / "daemon.log")
        webserver = Webserver(env, tmp_path, tmp_path / "webserver.log")
        try:
            _run(instance, daemon, webserver, env, tmp_path, landed, shards, blocked, images)
        finally:
            webserver.stop()
            daemon.stop()


#: The operations page, where the backfill command is documented.
OPERATIONS_DOC = REPO / "docs" / "operations.md"


def _documented_backfill_command() -> str:
    """The `dagster job backfill` command exactly as the operations page gives it."""
    for line in OPERATIONS_DOC.read_text().splitlines():
        if "dagster job backfill" in line and line.strip().startswith("DAGSTER_HOME="):
            return line.strip()
    raise AssertionError(f"{OPERATIONS_DOC} gives no `DAGSTER_HOME=... dagster job backfill` line")


def _run(instance, daemon, webserver, env, clone, landed, shards, blocked, images) -> None:
    root = clone / "library"
    started = time.monotonic()
    (landed / "_READY").touch()

    # The sensors plan the batch and run its shards, side by side.
    def first_runs_done() -> list[dg.RunRecord] | None:
        runs = shard_runs(instance)
        finished = [r for r in runs if r.dagster_run.is_finished]
        return runs if len(runs) >= len(shards) and len(finished) == len(runs) else None

    runs = wait_for("the shard runs", first_runs_done, 240, daemon)
    landed_to_runs = time.monotonic() - started
    by_shard = {r.dagster_run.tags["dagster/partition"]: r for r in runs}
    assert sorted(by_shard) == shards and len(runs) == len(shards)
    [plan_run] = instance.get_run_records(dg.RunsFilter(job_name="plan_batch"))
    trigger = plan_run.dagster_run.tags["asset_library/trigger"]
    assert trigger.startswith("landing-")
    assert plan_run.dagster_run.tags["asset_library/batch"] == BATCH
    for record in runs:
        assert record.dagster_run.tags["asset_library/batch"] == BATCH
        assert record.dagster_run.tags["asset_library/trigger"] == trigger
    statuses = {shard: r.dagster_run.status for shard, r in by_shard.items()}
    assert statuses == {
        shards[0]: dg.DagsterRunStatus.SUCCESS,
        shards[1]: dg.DagsterRunStatus.FAILURE,
        shards[2]: dg.DagsterRunStatus.FAILURE,
    }
    overlap = _max_overlap(runs)
    first = min(r.create_timestamp.timestamp() for r in runs)
    spans = {s: (r.start_time - first, r.end_time - first) for s, r in by_shard.items()}
    print(f"\nshard runs (s after the first was created): {spans}")
    assert overlap >= 2, spans

    # Unblock both; backfill one through GraphQL over HTTP, the other with the documented command.
    for folder in blocked.values():
        folder.unlink()
    repaired = time.monotonic()
    command = _documented_backfill_command().replace("KEY1,KEY2", shards[2])
    cli_env = {k: v for k, v in env.items() if k != "DAGSTER_HOME"}  # the command sets it
    cli = subprocess.Popen(
        ["bash", "-c", command],
        cwd=clone,
        env=cli_env,
        stdout=subprocess.PIPE,
        text=True,
        stderr=subprocess.STDOUT,
    )
    webserver.wait_ready(120)
    answer = webserver.graphql(
        LAUNCH_BACKFILL,
        {
            "params": {
                "selector": {
                    "partitionSetName": "ingest_shard_partition_set",
                    "repositorySelector": {
                        "repositoryLocationName": LOCATION,
                        "repositoryName": "__repository__",
                    },
                },
                "partitionNames": [shards[1]],
            }
        },
    )["launchPartitionBackfill"]
    assert answer["__typename"] == "LaunchBackfillSuccess", answer
    backfill_id = answer["backfillId"]
    output, _ = cli.communicate(timeout=180)
    assert cli.returncode == 0 and "Launched backfill job" in output, output

    def repaired_runs() -> dict[str, dg.RunRecord] | None:
        latest = {r.dagster_run.tags["dagster/partition"]: r for r in shard_runs(instance)}
        done = all(latest[s].dagster_run.status == dg.DagsterRunStatus.SUCCESS for s in shards[1:])
        return latest if done else None

    latest = wait_for("the backfilled shards", repaired_runs, 240, daemon, webserver)
    assert latest[shards[1]].dagster_run.tags.get("dagster/backfill") == backfill_id
    assert latest[shards[2]].dagster_run.tags.get("dagster/backfill")
    assert latest[shards[2]].dagster_run.tags["dagster/backfill"] != backfill_id
    for shard in shards[1:]:  # launched without them, the runs tagged themselves
        tags = latest[shard].dagster_run.tags
        assert tags["asset_library/batch"] == BATCH
        assert tags["asset_library/trigger"] == f"backfill-{tags['dagster/backfill']}"

    expected = {shard: IMAGES_PER_SHARD for shard in shards}
    counts = wait_for("the complete library", lambda: _library_count(root) == expected, 180, daemon)
    assert counts
    [total] = Library(root).query("SELECT count(*) AS n FROM images")
    assert total["n"] == len({md5 for _, md5 in images})
    refreshes = instance.get_runs(dg.RunsFilter(job_name="refresh_library"))
    assert refreshes and all(
        r.tags["asset_library/trigger"] == "sensor" and r.tags["asset_library/batch"] == BATCH
        for r in refreshes
    )
    # The refresh wrote the serving store to PostgreSQL (no SQLite file beside the lake); two
    # serve replicas, each on a machine of its own, answer every lookup from it.
    md5s = sorted({md5 for _, md5 in images})
    complete = time.monotonic()
    wait_for("the serving store", lambda: Library(root).lookup(md5s[0])["answered_by"] == "store",
          120, daemon)  # fmt: skip
    assert not (root / "serving" / "store.sqlite").exists()
    reference = Library(root)
    store = {k: env[k] for k in (STORE_SETTING, PASSWORD_SETTING)}
    replicas = [ServeReplica(str(root), clone / f"machine-{n}", store) for n in (1, 2)]
    try:
        for replica in replicas:
            replica.start()
        for md5 in md5s:
            expected = to_jsonable_python(reference.lookup(md5))
            assert expected["answered_by"] == "store"
            for replica in replicas:
                status, body = replica.get(f"/images/{md5}")
                assert status == 200 and body == expected, (md5, body, replica.tail())
    finally:
        for replica in replicas:
            replica.stop()
    served = time.monotonic() - complete
    print(
        f"\nproduction profile: landing -> {len(shards)} shard runs finished "
        f"{landed_to_runs:.0f} s (at most {overlap} at once); unblock -> backfilled "
        f"and complete {complete - repaired:.0f} s; landing -> complete "
        f"{complete - started:.0f} s; then the store level and two replicas answering "
        f"from it {served:.0f} s"
    )


def test_sensor_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from asset_library.defs.sensors import INTERVAL_ENV, sensor_interval

    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert sensor_interval(30) == 30
    monkeypatch.setenv(INTERVAL_ENV, "3")
    assert sensor_interval(30) == 3
    for bad in ("0", "-5", "2.5", "soon"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=INTERVAL_ENV):
            sensor_interval(30)


def test_the_shard_sensor_requests_only_missing_shard_keys(tmp_path: Path) -> None:
    """The plan run adds its keys in one call; the daemon would check each requested key with
    its own query (~30 ms on Postgres), so the sensor leaves known keys out of its request."""
    from asset_library.definitions import build_definitions
    from asset_library.defs.resources import build_resources
    from asset_library.defs.sensors import shard_sensor

    manifest = tmp_path / "big.csv"
    manifest.write_text("uri\n" + "".join(f"img{n}.jpg\n" for n in range(5)))
    resources = build_resources({"ASSET_LIBRARY_SHARD_SIZE": "1"}, root=str(tmp_path / "lib"))
    defs = build_definitions(resources)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("batches", ["big"])
        planned = defs.resolve_job_def("plan_batch").execute_in_process(
            partition_key="big",
            instance=instance,
            run_config={"ops": {"batch_plan": {"config": {"source": str(manifest)}}}},
        )
        assert planned.success
        keys = [shard_key("big", n) for n in range(5)]
        instance.delete_dynamic_partition("shards", keys[3])
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            tick = shard_sensor(context)
        assert [r.partition_key for r in tick.run_requests] == keys
        [add] = tick.dynamic_partitions_requests
        assert list(add.partition_keys) == [keys[3]]
