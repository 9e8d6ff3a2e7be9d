"""Shards on a real Ray cluster: both nodes ingest side by side, one is lost mid-shard, and the
library ends complete and exact.

Everything runs in a network namespace with only loopback (Ray binds every interface): the S3
server, Postgres, a Ray head and a worker node of one CPU each, and Dagster's daemon on the
deploy/ray profile. The library is ``s3://cluster/library``; the daemon, each node and the
checks are machines of their own (an empty HOME, working folder and cache folder each, no folder
shared), so a run that needed a file another machine wrote fails, and any run failing but the
one the lost node ends fails the test at once with its error. A batch of small shards lands in
the library's S3 landing zone; its shard runs are Ray jobs on both nodes.
Once the worker node has written a shard, its whole process tree is killed during its next
one: that run fails, the daemon re-runs the shard, and it completes on the head.

A shard counts as done by its lake commits, never by a run's status (a run worker orphaned by a
lost node was seen to record success later): each shard's rows are written by exactly one
commit a table, and the commits are given to the run that was ingesting when they were made
(between its step's start and its Ray job's end). Where a run ran is asked of Ray's job server.
"Side by side" means a shard on each node was ingesting (step start to its last commit) at the
same moment. The test prints a timeline of every shard run; it asserts no timing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from asset_library import Library
from asset_library.ids import shard_key
from asset_library.runs.orchestrate import ingest_batch
from asset_library_tests.support.cluster import (
    SHARD_TABLES,
    Machine,
    RayCluster,
    RayNode,
    call_in_child,
    images_by_shard,
    interfaces,
    lookups,
    loopback_namespace,
    rows_by_shard,
    shard_commits,
)
from asset_library_tests.support.corpus import corpus_jpegs
from asset_library_tests.support.dagster_processes import DagsterProcess, start_daemon
from asset_library_tests.support.deployment import (
    REPO,
    Clone,
    deployed_env,
    shard_runs,
    step_started_at,
    wait_for,
)
from asset_library_tests.support.postgres import PostgresServer
from asset_library_tests.support.seaweedfs import SeaweedS3

pytestmark = [pytest.mark.cluster, pytest.mark.postgres, pytest.mark.s3, pytest.mark.daemon]

PROFILE = REPO / "deploy" / "ray" / "dagster.yaml"
#: Enough shards that the worker node finishes one and is lost in its next while the head has
#: more to do; small, so the test stays a few minutes.
SHARDS = 5
IMAGES_PER_SHARD = 6
BATCH = "photos_001"
BUCKET = "cluster"
PREFIX = "library"
#: The library: everything durable is here, a machine keeps only caches.
HOME = f"s3://{BUCKET}/{PREFIX}"
#: The batch in the library's own landing zone (``<home>/landing``), which the sensor watches.
LANDING = f"{PREFIX}/landing/{BATCH}"
#: Where the profile's S3 compute log manager keeps each run's step logs.
LOGS = "compute-logs/storage"


@dataclass
class Expected:
    """What the one-machine library of the batch holds: the cluster's must hold the same."""

    rows: dict[tuple[str, str], int]
    images: dict[str, int]
    lookups: dict[str, dict[str, Any]]


@dataclass
class Run:
    """One shard run: where Ray ran it and when, and when its step started."""

    record: dg.RunRecord
    node: str | None = None
    job_start: float | None = None
    job_end: float | None = None
    step_start: float | None = None

    @property
    def id(self) -> str:
        return self.record.dagster_run.run_id

    @property
    def shard(self) -> str:
        return self.record.dagster_run.tags["dagster/partition"]

    def ingesting_at(self, moment: float) -> bool:
        """Whether this run could have made a commit at ``moment``: its step had started and
        its Ray job had not ended."""
        if self.step_start is None or moment < self.step_start:
            return False
        return self.job_end is None or moment <= self.job_end


@dataclass
class Done:
    """A shard as the lake shows it: its commits and the run that was ingesting then."""

    shard: str
    run: Run
    first_commit: float
    last_commit: float
    images: int = 0

    @property
    def seconds(self) -> float:
        """Step start to the shard's last commit: reading, fingerprinting, uploading, writing."""
        assert self.run.step_start is not None
        return self.last_commit - self.run.step_start


@dataclass
class Cluster:
    """The cluster under test and what the test watches."""

    instance: dg.DagsterInstance
    ray: RayCluster
    head: RayNode
    worker: RayNode
    daemon: DagsterProcess
    names: dict[str, str] = field(default_factory=dict)
    #: When the worker node was killed: nothing on it ran after.
    lost_at: float | None = None
    #: The run the node loss is meant to fail; any other run failing fails the test at once.
    doomed: str | None = None

    def __post_init__(self) -> None:
        self.names = {self.head.node_id or "": "head", self.worker.node_id or "": "worker"}

    @property
    def alive(self) -> tuple[Any, ...]:
        return (self.daemon, self.head, self)

    # A watched process of wait_for: the deployment itself, which must fail no run but the one
    # the lost node ends (a run needing a file only another machine wrote fails here, named).
    @property
    def log_path(self) -> Path:
        return self.daemon.log_path

    def check_alive(self) -> None:
        failed = self.instance.get_run_records(
            dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE])
        )
        for record in failed:
            run = record.dagster_run
            if run.run_id != self.doomed:
                raise AssertionError(
                    f"run {run.run_id} of {run.job_name} {run.tags.get('dagster/partition', '')} "
                    f"failed:\n{_failure(self.instance, run.run_id)}"
                )

    def tail(self) -> str:
        return ""

    def runs(self) -> list[Run]:
        """Every shard run with what Ray and the event log say of it."""
        jobs = {job.submission_id: job for job in self.ray.client().list_jobs()}
        found = []
        for record in shard_runs(self.instance):
            run = Run(record)
            job = jobs.get(f"dagster-run-{run.id}")
            if job is not None:
                run.node = self.names.get(job.driver_node_id or "")
                run.job_start = job.start_time / 1e3 if job.start_time else None
                run.job_end = job.end_time / 1e3 if job.end_time else None
                if run.node == "worker" and self.lost_at is not None:
                    run.job_end = min(run.job_end or self.lost_at, self.lost_at)
            run.step_start = step_started_at(self.instance, run.id)
            found.append(run)
        return found

    def done(self) -> dict[str, Done]:
        """The shards the lake shows written, each given to the one run ingesting when all
        its commits were made."""
        commits = call_in_child(shard_commits, HOME)
        runs = self.runs()
        found = {}
        for shard, tables in commits.items():
            times = [at for marks in tables.values() for _, at in marks]
            first, last = min(times), max(times)
            makers = [r for r in runs if r.shard == shard and r.ingesting_at(first)]
            makers = [r for r in makers if r.ingesting_at(last)]
            assert len(makers) == 1, (shard, tables, [(r.id, r.node) for r in makers])
            found[shard] = Done(shard, makers[0], first, last)
        return found


def test_shards_run_on_a_ray_cluster_side_by_side_and_survive_a_lost_node(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    began = time.monotonic()
    timeline: list[tuple[float, str]] = []

    def mark(what: str) -> None:
        timeline.append((time.monotonic() - began, what))

    for name in ("ASSET_LIBRARY_OBJECTS", "ASSET_LIBRARY_LAKE", "ASSET_LIBRARY_HOME"):
        monkeypatch.delenv(name, raising=False)
    images = corpus_jpegs(corpus_dir, SHARDS * IMAGES_PER_SHARD)
    landed = tmp_path / "landing" / BATCH
    landed.mkdir(parents=True)
    for name, (path, _) in _landing_names(images).items():
        shutil.copyfile(path, landed / name)
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
        lookups=lookups(reference, md5s, str(landed)),
    )
    assert sorted({shard for _, shard in expected.rows}) == shards
    mark("the same batch built on one machine")

    # Each machine has its own empty HOME, working folder and cache; they share no folder.
    daemon_side, head_side, worker_side, checker = (
        Machine(tmp_path / "machines" / name) for name in ("daemon", "head", "worker", "checks")
    )
    shutil.copyfile(REPO / "workspace.yaml", daemon_side.work / "workspace.yaml")
    dagster_home = daemon_side.root / "dagster"
    dagster_home.mkdir()

    with loopback_namespace():
        assert interfaces() == ["lo"]
        postgres = PostgresServer()
        seaweed = SeaweedS3()
        ray: RayCluster | None = None
        daemon = None
        try:
            postgres.start()
            seaweed.start()
            seaweed.make_bucket(BUCKET)
            mark("postgres and s3 up")
            env = deployed_env(
                Clone(daemon_side.work, daemon_side.work, dagster_home),
                {**postgres.env(), **seaweed.env()},
                shard_size=IMAGES_PER_SHARD,
                ASSET_LIBRARY_HOME=HOME,
                DAGSTER_COMPUTE_LOGS_BUCKET=BUCKET,
            )
            # The checks (in child processes, see call_in_child) are a machine of their own too.
            for name, value in {**postgres.env(), **seaweed.env(), **checker.env()}.items():
                monkeypatch.setenv(name, value)

            # The nodes have no Dagster home: each run's instance travels with it.
            ray = RayCluster({k: v for k, v in env.items() if k != "DAGSTER_HOME"}, tmp_path)
            head = ray.start_head(head_side)
            mark("ray head up")
            worker = ray.start_worker(worker_side)
            mark("ray worker node up")
            assert len(ray.alive_nodes()) == 2

            config = yaml.safe_load(PROFILE.read_text())
            config["run_launcher"]["config"]["ray"]["address"] = ray.address
            config["run_monitoring"]["poll_interval_seconds"] = 3
            (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config))
            with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
                assert type(instance.run_launcher).__name__ == "RayRunLauncher"
                daemon = start_daemon(
                    {**env, **daemon_side.env()}, daemon_side.work, tmp_path / "daemon.log"
                )
                # The batch lands in the library's S3 landing zone, its _READY marker last.
                s3 = seaweed.client()
                for name, (path, _) in _landing_names(images).items():
                    s3.upload_file(str(path), BUCKET, f"{LANDING}/{name}")
                s3.put_object(Bucket=BUCKET, Key=f"{LANDING}/_READY", Body=b"")
                landed_at = time.time()
                mark("batch landed in s3")
                cluster = Cluster(instance, ray, head, worker, daemon)
                done = _run(cluster, shards, expected, mark, landed_at)
                # the same answers, image by image, read by a machine of its own
                found = call_in_child(lookups, HOME, md5s, f"s3://{BUCKET}/{LANDING}")
                assert found == expected.lookups
                mark("every lookup equal to the one-machine library's")
                # Each node worked from its own cache of the library, and no run left a file
                # on the machine that launched it: its step logs are in S3, for the UI.
                for side in (head_side, worker_side):
                    assert (side.cache / "libraries" / BUCKET / PREFIX).is_dir(), side.files()
                run_ids = [run.id for run in cluster.runs()]
                assert not [f for f in daemon_side.files() if any(r in f for r in run_ids)]
                for d in done.values():
                    logs = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{LOGS}/{d.run.id}/")
                    assert logs.get("KeyCount", 0) > 0, d.run.id
        finally:
            if daemon is not None:
                daemon.stop()
            if ray is not None:
                ray.stop()
            seaweed.close()
            postgres.stop()

    print("\n" + "\n".join(f"{t:6.1f} s  {what}" for t, what in timeline))


def _landing_names(images: list[tuple[Path, str]]) -> dict[str, tuple[Path, str]]:
    """The batch's files, numbered so the plan keeps their order (folder and S3 alike)."""
    return {f"{number:02d}_{path.name}": (path, md5) for number, (path, md5) in enumerate(images)}


def _run(
    cluster: Cluster,
    shards: list[str],
    expected: Expected,
    mark: Callable[[str], None],
    landed_at: float,
) -> dict[str, Done]:
    """The worker node writes a shard, then is lost during its next; the shard is re-run on the
    head; every shard ends written once, both nodes having ingested side by side. Returns each
    shard's writing."""

    # The worker node has written a shard (by the lake).
    def worker_wrote() -> dict[str, Done] | None:
        done = cluster.done()
        return done if any(d.run.node == "worker" for d in done.values()) else None

    written = wait_for("a shard written by the worker node", worker_wrote, 300, *cluster.alive)
    mark(f"worker node wrote {[s for s, d in written.items() if d.run.node == 'worker']}")

    # Its next shard, once under way (its step started), is the victim: polled fast, for the
    # shard must not reach its commits before the node is lost.
    def victim() -> Run | None:
        for run in cluster.runs():
            under_way = run.job_end is None and run.step_start is not None
            if run.node == "worker" and under_way and run.shard not in written:
                return run
        return None

    doomed = wait_for("the next shard on the worker", victim, 300, *cluster.alive, every=0.2)
    cluster.doomed = doomed.id
    killed = cluster.worker.kill()
    lost_at = cluster.lost_at = time.time()
    mark(f"worker node killed ({len(killed)} processes) mid-shard {doomed.shard}")
    assert doomed.shard not in call_in_child(shard_commits, HOME), (
        f"{doomed.shard} was already written before the kill"
    )

    def failed() -> bool:
        run = cluster.instance.get_run_by_id(doomed.id)
        return run is not None and run.status == dg.DagsterRunStatus.FAILURE

    wait_for(f"the run of {doomed.shard} to fail", failed, 180, *cluster.alive)
    failed_at = time.time()
    mark(f"run of {doomed.shard} failed")

    # Done means written: every shard's rows are in the lake, each by one commit a table.
    def complete() -> bool:
        return call_in_child(rows_by_shard, HOME) == expected.rows

    wait_for("every shard in the lake", complete, 300, *cluster.alive, every=2)
    commits = call_in_child(shard_commits, HOME)
    assert sorted(commits) == shards
    once = {s: sorted(t for t, marks in commits[s].items() if len(marks) == 1) for s in shards}
    assert once == {s: sorted(SHARD_TABLES) for s in shards}, commits
    mark("every shard written")

    def refreshed() -> bool:
        return call_in_child(images_by_shard, HOME) == expected.images

    wait_for("the library refreshed", refreshed, 300, *cluster.alive, every=2)
    mark("library refreshed")

    done = cluster.done()
    assert sorted(done) == shards
    for shard, d in done.items():
        d.images = sum(n for (_, s), n in expected.rows.items() if s == shard)
    # The lost shard: written once, by its retry on the head, never by the run that was lost.
    repaired = done[doomed.shard]
    assert repaired.run.node == "head", repaired
    assert repaired.run.id != doomed.id
    assert repaired.run.record.dagster_run.tags.get("dagster/root_run_id") == doomed.id
    # Shards written on both nodes, and one on each ingesting at the same moment.
    on = {node: [d for d in done.values() if d.run.node == node] for node in ("head", "worker")}
    assert on["head"] and on["worker"], {s: d.run.node for s, d in done.items()}
    overlap = max(
        min(h.last_commit, w.last_commit) - max(h.run.step_start or 0, w.run.step_start or 0)
        for h in on["head"]
        for w in on["worker"]
    )
    assert overlap > 0, _timeline(cluster.runs(), done, landed_at)

    print("\n" + _timeline(cluster.runs(), done, landed_at))
    per_node = ", ".join(
        f"{node} {len(ds)} shards, {sum(d.images for d in ds)} images in "
        f"{sum(d.seconds for d in ds):.1f} s of ingest "
        f"({sum(d.images for d in ds) / sum(d.seconds for d in ds):.2f} images/s)"
        for node, ds in on.items()
    )
    print(
        f"per node: {per_node}; longest overlap of a head and a worker shard {overlap:.1f} s; "
        f"node lost -> its run failed {failed_at - lost_at:.1f} s -> its shard written on "
        f"the head {repaired.last_commit - lost_at:.1f} s after the loss"
    )
    return done


def _failure(instance: dg.DagsterInstance, run_id: str) -> str:
    """Why a run failed: its steps' errors, else the run's failure message."""
    errors = []
    for kind in (dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE):
        for record in instance.get_records_for_run(run_id, of_type=kind).records:
            event = record.event_log_entry.dagster_event
            error = getattr(event.event_specific_data, "error", None) if event else None
            errors.append(error.to_string() if error else record.event_log_entry.message)
    return "\n".join(errors)


def _timeline(runs: list[Run], done: dict[str, Done], landed_at: float) -> str:
    """One line a shard run, times in seconds after the batch landed."""
    lines = [
        "run       shard                node    created  job   step  written  "
        "created->step  ingest s  images  images/s  lake"
    ]
    for run in runs:
        created = run.record.create_timestamp.timestamp()
        wrote = done.get(run.shard)
        mine = wrote is not None and wrote.run.id == run.id

        def at(moment: float | None) -> str:
            return f"{moment - landed_at:5.1f}" if moment is not None else "    -"

        overhead = f"{run.step_start - created:5.1f}" if run.step_start else "    -"
        if mine and wrote is not None:
            figures = (
                f"{at(wrote.last_commit)}    {overhead}          {wrote.seconds:6.1f}  "
                f"{wrote.images:6d}  {wrote.images / wrote.seconds:8.2f}  written"
            )
        else:
            figures = f"    -    {overhead}               -       -         -  not written"
        lines.append(
            f"{run.id[:8]}  {run.shard:<20} {run.node or '-':<7} {at(created)}  "
            f"{at(run.job_start)} {at(run.step_start)}  {figures}"
        )
    return "\n".join(lines)
