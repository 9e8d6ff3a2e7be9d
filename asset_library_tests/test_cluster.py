"""Shards on a real Ray cluster: two nodes, one lost mid-shard, the library complete and exact.

Everything runs in a network namespace with only loopback (Ray binds every interface): the S3
server, Postgres, a Ray head and a worker node of one CPU each, and Dagster's daemon on the
deploy/ray profile. A batch lands; its shard runs are Ray jobs on both nodes at once. While the
worker node runs a shard, its whole process tree is killed: that run fails, the daemon re-runs
the shard, and it completes on the head with the other shards. Where each run ran is asked of
Ray's job server; whether a shard is done is read from the lake's commits, never from a run's
status. The library then equals one built from the same batch on one machine.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from asset_library import Library
from asset_library.ids import shard_key
from asset_library.runs.orchestrate import ingest_batch
from asset_library_tests.support.cluster import (
    RayCluster,
    call_in_child,
    images_by_shard,
    interfaces,
    lookups,
    loopback_namespace,
    rows_by_shard,
    shard_commits,
)
from asset_library_tests.support.corpus import corpus_jpegs
from asset_library_tests.support.dagster_processes import script, start_daemon
from asset_library_tests.support.postgres import PostgresServer
from asset_library_tests.support.seaweedfs import SeaweedS3

pytestmark = [pytest.mark.cluster, pytest.mark.postgres, pytest.mark.s3, pytest.mark.daemon]

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "deploy" / "ray" / "dagster.yaml"
SHARDS = 4
IMAGES_PER_SHARD = 12
BATCH = "photos_001"
BUCKET = "cluster"


def _wait(what: str, condition: Callable[[], Any], timeout: float, *alive: Any) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        for process in alive:
            process.check_alive()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.log_path.name}\n{p.tail()}" for p in alive)
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(1)


def _shard_runs(instance: dg.DagsterInstance) -> list[dg.RunRecord]:
    return list(instance.get_run_records(dg.RunsFilter(job_name="ingest_shard"), ascending=True))


def _jobs(cluster: RayCluster, runs: list[dg.RunRecord]) -> dict[str, Any]:
    """Each run's Ray job (where and when it ran), by run id, for the runs Ray knows."""
    found = {}
    client = cluster.client()
    for record in runs:
        try:
            found[record.dagster_run.run_id] = client.get_job_info(
                f"dagster-run-{record.dagster_run.run_id}"
            )
        except RuntimeError:  # not submitted yet
            continue
    return found


def _started_step(instance: dg.DagsterInstance, run_id: str) -> bool:
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.STEP_START, limit=1
    ).records
    return bool(records)


@dataclass
class Expected:
    """What the one-machine library of the batch holds: the cluster's must hold the same."""

    rows: dict[tuple[str, str], int]
    images: dict[str, int]
    lookups: dict[str, dict[str, Any]]


def test_shards_run_on_a_ray_cluster_and_survive_a_lost_node(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    began = time.monotonic()
    timeline: list[tuple[float, str]] = []

    def mark(what: str) -> None:
        timeline.append((time.monotonic() - began, what))

    for name in ("ASSET_LIBRARY_OBJECTS", "ASSET_LIBRARY_LAKE", "ASSET_LIBRARY_HOME"):
        monkeypatch.delenv(name, raising=False)
    images = corpus_jpegs(corpus_dir, SHARDS * IMAGES_PER_SHARD)
    shutil.copyfile(REPO / "workspace.yaml", tmp_path / "workspace.yaml")
    root = tmp_path / "library"
    home = root / ".dagster"
    home.mkdir(parents=True)
    landed = root / "landing" / BATCH
    landed.mkdir(parents=True)
    for number, (path, _) in enumerate(images):
        shutil.copyfile(path, landed / f"{number:02d}_{path.name}")
    shards = [shard_key(BATCH, n) for n in range(SHARDS)]

    # The same batch built on one machine first: the cluster's library must answer as it does.
    reference = tmp_path / "reference"
    with dg.instance_for_test() as local:
        summary = ingest_batch(
            str(landed),
            library=reference,
            max_images_per_shard=IMAGES_PER_SHARD,
            workers=1,
            batch=BATCH,
            environ={},
            instance=local,
            progress=lambda _: None,
        )
    assert summary.success
    md5s = sorted({md5 for _, md5 in images})
    assert Library(reference).query("SELECT count(*) AS n FROM images") == [{"n": len(md5s)}]
    expected = Expected(
        rows=rows_by_shard(reference),
        images=images_by_shard(reference),
        lookups=lookups(reference, md5s),
    )
    assert sorted({shard for _, shard in expected.rows}) == shards
    mark("the same batch built on one machine")

    with loopback_namespace():
        assert interfaces() == ["lo"]
        postgres = PostgresServer()
        seaweed = SeaweedS3()
        cluster: RayCluster | None = None
        daemon = None
        try:
            postgres.start()
            seaweed.start()
            seaweed.make_bucket(BUCKET)
            mark("postgres and s3 up")
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("AWS_", "S3_", "DAGSTER_", "ASSET_LIBRARY_", "RAY_"))
                and k != "PWD"
            }
            env.update(postgres.env())
            env.update(seaweed.env())
            env.update(
                PATH=f"{Path(script('dagster')).parent}:{env.get('PATH', '')}",
                DAGSTER_HOME=str(home),
                ASSET_LIBRARY_HOME=str(root),
                ASSET_LIBRARY_OBJECTS=f"s3://{BUCKET}/objects",
                ASSET_LIBRARY_LAKE=f"s3://{BUCKET}/lake",
                ASSET_LIBRARY_SHARD_SIZE=str(IMAGES_PER_SHARD),
                ASSET_LIBRARY_WORKERS="1",
                ASSET_LIBRARY_SENSOR_INTERVAL="3",
            )
            # The checks (in child processes, see call_in_child) read the lake the runs write:
            # library.json names it only once a shard has recorded it.
            lake_env = {"ASSET_LIBRARY_LAKE": env["ASSET_LIBRARY_LAKE"]}
            for name, value in {**postgres.env(), **seaweed.env(), **lake_env}.items():
                monkeypatch.setenv(name, value)

            cluster = RayCluster(env, tmp_path)
            head = cluster.start_head()
            mark("ray head up")
            worker = cluster.start_worker()
            mark("ray worker node up")
            assert len(cluster.alive_nodes()) == 2

            config = yaml.safe_load(PROFILE.read_text())
            config["run_launcher"]["config"]["ray"]["address"] = cluster.address
            config["run_monitoring"]["poll_interval_seconds"] = 3
            (home / "dagster.yaml").write_text(yaml.safe_dump(config))
            with dg.DagsterInstance.from_config(str(home)) as instance:
                assert type(instance.run_launcher).__name__ == "RayRunLauncher"
                daemon = start_daemon(env, tmp_path, tmp_path / "daemon.log")
                (landed / "_READY").touch()
                mark("batch landed")
                _run(instance, cluster, head, worker, daemon, root, shards, expected, mark)
                # the same answers, image by image
                assert call_in_child(lookups, root, md5s) == expected.lookups
                mark("every lookup equal to the one-machine library's")
        finally:
            if daemon is not None:
                daemon.stop()
            if cluster is not None:
                cluster.stop()
            seaweed.close()
            postgres.stop()

    print("\n" + "\n".join(f"{t:6.1f} s  {what}" for t, what in timeline))


def _run(instance, cluster, head, worker, daemon, root, shards, expected, mark) -> None:
    """Both nodes run shards; the worker is lost mid-shard; the shard is re-run on the head."""
    nodes = {head.node_id: "head", worker.node_id: "worker"}

    # The first shard the worker node runs is the victim, once it is under way (its step
    # started): the head runs another shard at the same time.
    def victim() -> dg.RunRecord | None:
        runs = _shard_runs(instance)
        jobs = _jobs(cluster, runs)
        for record in runs:
            job = jobs.get(record.dagster_run.run_id)
            if job is not None and job.driver_node_id == worker.node_id:
                started = _started_step(instance, record.dagster_run.run_id)
                return record if job.status == "RUNNING" and started else None
        return None

    doomed = _wait("a shard under way on the worker node", victim, 240, daemon, head)
    shard = doomed.dagster_run.tags["dagster/partition"]
    committed_before = call_in_child(shard_commits, root).get(shard, [])
    killed = worker.kill()
    mark(f"worker node killed ({len(killed)} processes) mid-shard {shard}")
    assert committed_before == [], f"{shard} was already written before the kill"

    def failed() -> bool:
        run = instance.get_run_by_id(doomed.dagster_run.run_id)
        return run is not None and run.status == dg.DagsterRunStatus.FAILURE

    _wait(f"the run of {shard} to fail", failed, 120, daemon, head)
    mark(f"run of {shard} failed")

    def retried() -> dg.RunRecord | None:
        runs = [
            r
            for r in _shard_runs(instance)
            if r.dagster_run.tags.get("dagster/partition") == shard
            and r.dagster_run.run_id != doomed.dagster_run.run_id
        ]
        done = [r for r in runs if r.dagster_run.status == dg.DagsterRunStatus.SUCCESS]
        return done[-1] if done else None

    rerun = _wait(f"{shard} re-run to success", retried, 240, daemon, head)
    mark(f"{shard} re-run finished")
    assert rerun.dagster_run.tags.get("dagster/parent_run_id") == doomed.dagster_run.run_id

    # Done means written: every shard's rows are in the lake by its own commits.
    def complete() -> bool:
        return call_in_child(rows_by_shard, root) == expected.rows

    _wait("every shard in the lake", complete, 240, daemon, head)
    commits = call_in_child(shard_commits, root)
    assert sorted(commits) == shards
    assert all(len(commits[s]) == 1 for s in shards), commits
    mark("every shard committed")

    def refreshed() -> bool:
        return call_in_child(images_by_shard, root) == expected.images

    _wait("the library refreshed", refreshed, 240, daemon, head)
    mark("library refreshed")

    # Where and when each shard ran, as Ray saw it.
    runs = _shard_runs(instance)
    jobs = _jobs(cluster, runs)
    now = time.time() * 1e3
    ran = {
        run_id: (nodes[job.driver_node_id], job.start_time / 1e3, (job.end_time or now) / 1e3)
        for run_id, job in jobs.items()
    }
    by_node: dict[str, list[str]] = {}
    for r in runs:
        run_id = r.dagster_run.run_id
        if r.dagster_run.status == dg.DagsterRunStatus.SUCCESS:
            by_node.setdefault(ran[run_id][0], []).append(r.dagster_run.tags["dagster/partition"])
    assert {node for node, _, _ in ran.values()} == {"head", "worker"}, ran
    assert ran[rerun.dagster_run.run_id][0] == "head"
    assert ran[doomed.dagster_run.run_id][0] == "worker"
    on_head = [v for v in ran.values() if v[0] == "head"]
    on_worker = [v for v in ran.values() if v[0] == "worker"]
    # side by side: a shard on the head while the worker ran its shard
    overlap = max(min(h[2], w[2]) - max(h[1], w[1]) for h in on_head for w in on_worker)
    assert overlap > 0, ran
    first = min(v[1] for v in ran.values())
    spans = {
        r.dagster_run.tags["dagster/partition"] + f" [{r.dagster_run.status.value}]": (
            ran[r.dagster_run.run_id][0],
            round(ran[r.dagster_run.run_id][1] - first, 1),
            round(ran[r.dagster_run.run_id][2] - first, 1),
        )
        for r in runs
    }
    overheads = [ran[r.dagster_run.run_id][1] - r.create_timestamp.timestamp() for r in runs]
    starts = [r.start_time - ran[r.dagster_run.run_id][1] for r in runs if r.start_time]
    print(f"\nshard runs (node, Ray job submitted, ended; s after the first submission): {spans}")
    print(
        f"per run: created -> Ray job started {min(overheads):.1f}-{max(overheads):.1f} s; "
        f"Ray job started -> run started {min(starts):.1f}-{max(starts):.1f} s; "
        f"shards per node {by_node}; longest overlap across nodes {overlap:.1f} s"
    )
