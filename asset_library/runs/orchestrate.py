"""Run the ingestion graph from a terminal: the same Dagster jobs, on a local instance.

``asset-library ingest`` plans a batch, runs its shards side by side, each as its own
``ingest_shard`` run, then the ``refresh_library`` run (images merge, similarity index), all
recorded in the library's Dagster instance, so ``dagster dev`` on the same library shows them as
if the sensors had launched them. Runs execute in run workers (:mod:`asset_library.runs.worker`)
through Dagster's public execution API; no daemon and no server are needed.

No daemon watches these runs, so the runner looks after them itself: a failed shard is run again
(up to the retries asked for), Ctrl-C stops the running shards (their runs end failed or
canceled, never in progress), and runs whose process was killed are marked failed by the next
``ingest`` or ``status``.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import dagster as dg

from asset_library.defs.partitions import BATCHES
from asset_library.defs.resources import build_resources
from asset_library.defs.tags import (
    ATTEMPT_TAG,
    BATCH_TAG,
    MAX_RETRIES_TAG,
    PARTITION_TAG,
    TRIGGER_TAG,
)
from asset_library.ids import batch_id_for, check_batch_id
from asset_library.ingest.plan import BatchPlan, check_new_batch, read_plan
from asset_library.ingest.pool import default_workers
from asset_library.ingest.progress import ShardProgress, read_progress
from asset_library.ingest.sources import check_source
from asset_library.ingest.triggers import new_trigger_id
from asset_library.layout import CACHE_ENV, LibraryLayout, cache_home
from asset_library.runs.instance import NOT_ENDED, local_instance, reap_dead_runs
from asset_library.runs.processes import stop_signals_deferred
from asset_library.runs.worker import INSTANCE_ENV, RunWorkers
from asset_library.storage import bind_store

Progress = Callable[[str], None]

#: Retries of a failed shard when neither the caller nor the instance's ``run_retries`` says.
DEFAULT_RETRIES = 2
#: Seconds a stopped run may take to end before its worker is killed.
STOP_TIMEOUT = 60.0

#: The settings a worker takes from the caller's ``environ`` rather than from this process.
_SETTING_PREFIXES = ("ASSET_LIBRARY_", "S3_", "AWS_")


@dataclass
class RunningShard:
    """A shard whose run is under way, for a progress display."""

    shard: str
    attempt: int
    started: float  # time.monotonic() when its run was requested
    progress: ShardProgress | None = None


Live = Callable[[list[RunningShard]], None]


@dataclass
class IngestSummary:
    batch: str
    trigger: str
    shards: int = 0
    failed_shards: list[str] = field(default_factory=list)
    #: The first line of each failed shard's last failure.
    failures: dict[str, str] = field(default_factory=dict)
    #: Shards that failed at least once and then succeeded, with their number of attempts.
    retried: dict[str, int] = field(default_factory=dict)
    images: int = 0
    ok: int = 0
    uploaded: int = 0
    already_stored: int = 0
    repaired: int = 0
    rejects_by_reason: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    parallel: int = 1
    checks: dict[str, bool] = field(default_factory=dict)
    catalog: dict[str, Any] = field(default_factory=dict)
    #: Why the library refresh failed (the first line of its error); empty if it did not.
    refresh_failure: str = ""
    #: Set when a stop signal (Ctrl-C) ended the ingest early.
    interrupted: bool = False
    #: Shards without a successful run when the ingest stopped (all of them if planning stopped).
    unfinished_shards: list[str] = field(default_factory=list)
    #: Runs of killed processes that this ingest found in progress and marked failed.
    reaped_runs: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return (
            not self.interrupted
            and not self.failed_shards
            and all(self.checks.values())
            and bool(self.checks)
        )


def default_parallel() -> int:
    """Shards run side by side by default: half the cores, each shard fingerprinting with the
    other half's share (see :func:`workers_per_shard`)."""
    return max(1, default_workers() // 2)


def workers_per_shard(parallel: int) -> int:
    """Fingerprinting processes per shard so ``parallel`` shards do not oversubscribe the cores."""
    return max(1, default_workers() // parallel)


def default_retries(instance: dg.DagsterInstance) -> int:
    """The instance's ``run_retries.max_retries`` when retries are enabled there, else 2."""
    settings = instance.get_settings("run_retries") or {}
    if settings.get("enabled") and "max_retries" in settings:
        return int(settings["max_retries"])
    return DEFAULT_RETRIES


def ingest_batch(
    source: str,
    *,
    library: str | Path,
    max_images_per_shard: int | None = None,
    workers: int | None = None,
    parallel: int | None = None,
    retries: int | None = None,
    batch: str | None = None,
    replace: bool = False,
    environ: dict[str, str] | None = None,
    instance: dg.DagsterInstance | None = None,
    progress: Progress = print,
    live: Live | None = None,
) -> IngestSummary:
    """Plan ``source`` as a new batch, ingest its shards ``parallel`` at a time (a failed one
    up to ``retries`` more times), refresh the library, and gather the checks.

    ``workers`` is fingerprinting processes per shard (default: the cores shared out among the
    parallel shards). A named ``batch`` that already exists is refused
    (:class:`BatchExistsError`) unless ``replace``: then it is re-planned and its shards re-run.
    ``live`` is called about twice a second with the shards under way."""
    if batch is not None:
        check_batch_id(batch)
    if max_images_per_shard is not None and max_images_per_shard < 1:
        raise ValueError(f"max_images_per_shard must be at least 1, not {max_images_per_shard}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be 0 (in-process) or more, not {workers}")
    if parallel is not None and parallel < 1:
        raise ValueError(f"parallel must be at least 1, not {parallel}")
    if retries is not None and retries < 0:
        raise ValueError(f"retries must be 0 or more, not {retries}")
    check_source(source)  # before the library is created for it
    started = time.perf_counter()
    env = dict(os.environ if environ is None else environ)
    resources = build_resources(env, root=str(library))
    layout = resources["library"].layout()
    # A store other than the library's own fails here, before planning or uploading anything.
    bind_store(layout, resources["object_store"].location(), record=False)
    instance = instance or local_instance(layout)
    parallel = parallel or default_parallel()
    retries = default_retries(instance) if retries is None else retries
    batch = batch or batch_id_for(source, datetime.now(UTC))
    check_new_batch(layout, batch, replace=replace)
    trigger = new_trigger_id("cli")
    summary = IngestSummary(batch=batch, trigger=trigger, parallel=parallel)
    # This process retries its shards itself; a daemon on the same instance must not as well.
    tags = {BATCH_TAG: batch, TRIGGER_TAG: trigger, MAX_RETRIES_TAG: "0"}

    for run in reap_dead_runs(instance):
        summary.reaped_runs.append(run.run_id)
        progress(f"run {run.run_id} ({_run_label(run)}) marked failed: its process is gone")

    worker_env = _worker_env(env, layout, workers, parallel, instance)
    plan: BatchPlan | None = None
    with (
        tempfile.TemporaryDirectory(prefix="asset-library-workers-") as logs,
        RunWorkers(parallel, worker_env, Path(logs)) as pool,
        _sigterm_as_interrupt(),
    ):
        try:
            instance.add_dynamic_partitions(BATCHES, [batch])
            plan_config: dict[str, Any] = {
                "source": source,
                "trigger": trigger,
                "trigger_kind": "cli",
                "replace": replace,
            }
            if max_images_per_shard is not None:
                plan_config["max_images_per_shard"] = max_images_per_shard
            config = {"ops": {"batch_plan": {"config": plan_config}}}
            plan_tags = {**tags, PARTITION_TAG: batch}
            planned = _run_one(pool, instance, "plan_batch", plan_tags, config)
            if not planned["success"]:
                raise PlanningFailed(planned["failure"] or f"planning {source} failed")
            plan = read_plan(layout, batch)
            summary.shards = len(plan.shards)
            progress(
                f"batch {batch}: {plan.images:,} images in {len(plan.shards)} shard(s), "
                f"{min(parallel, len(plan.shards))} at a time"
            )
            _run_shards(pool, plan, tags, retries, layout, instance, summary, progress, live)
            refreshed = _run_one(pool, instance, "refresh_library", tags, {})
        except KeyboardInterrupt:
            with stop_signals_deferred():  # a second Ctrl-C must not cut the bookkeeping short
                pool.stop(STOP_TIMEOUT)
                return _stopped(summary, instance, plan, started)
    if not refreshed["success"]:
        summary.checks["refresh_library"] = False
        summary.refresh_failure = refreshed["failure"] or "the refresh_library run failed"
        progress(f"library refresh FAILED: {summary.refresh_failure}")
    summary.checks.update(refreshed.get("checks", {}))
    summary.catalog = _metadata(instance, "images", None, refreshed["run_id"])
    summary.seconds = time.perf_counter() - started
    return summary


def _run_one(
    pool: RunWorkers,
    instance: dg.DagsterInstance,
    job: str,
    tags: dict[str, str],
    config: dict[str, Any],
) -> dict[str, Any]:
    """One run on the first idle worker, waited for."""
    worker = pool.idle()
    assert worker is not None, "every worker is busy"
    worker.submit(job, job, tags, config)
    while True:
        for _, answer in _answers(pool, instance, timeout=1.0):
            return answer


def _answers(
    pool: RunWorkers, instance: dg.DagsterInstance, timeout: float
) -> list[tuple[Any, dict[str, Any]]]:
    """The runs that ended within ``timeout``; a run whose worker died (killed, out of memory)
    is marked failed at once rather than left in progress."""
    answers = pool.answers(timeout)
    if any(answer.get("ended") for _, answer in answers):
        reap_dead_runs(instance)
    return answers


def _run_shards(
    pool: RunWorkers,
    plan: BatchPlan,
    tags: dict[str, str],
    retries: int,
    layout: LibraryLayout,
    instance: dg.DagsterInstance,
    summary: IngestSummary,
    progress: Progress,
    live: Live | None,
) -> None:
    """Every shard of the plan, as many at a time as there are workers; a failed shard goes
    to the back of the queue as a new run of its partition until its attempts are used up."""
    waiting: deque[tuple[str, int]] = deque((shard.key, 1) for shard in plan.shards)
    running: dict[str, RunningShard] = {}
    done = 0
    while waiting or running:
        while waiting and (worker := pool.idle()) is not None:
            shard, attempt = waiting.popleft()
            layout.progress_path(shard).unlink(missing_ok=True)
            shard_tags = {**tags, PARTITION_TAG: shard, ATTEMPT_TAG: str(attempt)}
            worker.submit(shard, "ingest_shard", shard_tags, {})
            running[shard] = RunningShard(shard, attempt, time.monotonic())
        for shard, answer in _answers(pool, instance, timeout=0.5):
            attempt = running.pop(shard).attempt
            layout.progress_path(shard).unlink(missing_ok=True)
            if not answer["success"] and attempt <= retries:
                progress(
                    f"      {shard}: attempt {attempt} failed ({answer['failure']}); "
                    f"running it again"
                )
                waiting.append((shard, attempt + 1))
                continue
            done += 1
            counter = f"[{done}/{len(plan.shards)}]"
            _add_shard(summary, instance, shard, attempt, answer, counter, progress)
        if live is not None:
            for state in running.values():
                state.progress = read_progress(layout.progress_path(state.shard))
            live(list(running.values()))


def _add_shard(
    summary: IngestSummary,
    instance: dg.DagsterInstance,
    shard: str,
    attempt: int,
    answer: dict[str, Any],
    counter: str,
    progress: Progress,
) -> None:
    """Count a shard's last run into the summary, from what the run recorded, and say so."""
    for name, passed in answer.get("checks", {}).items():  # the shard's own checks
        summary.checks[name] = summary.checks.get(name, True) and passed
    label = f"{counter} {shard}"
    tries = f" (after {attempt} attempts)" if attempt > 1 else ""
    if not answer["success"]:
        summary.failed_shards.append(shard)
        summary.failures[shard] = answer["failure"]
        progress(f"{label}: FAILED {answer['failure']}{tries}")
        return
    if attempt > 1:
        summary.retried[shard] = attempt
    keys = _metadata(instance, "shard_keys", shard, answer["run_id"])
    uploads = _metadata(instance, "shard_uploads", shard, answer["run_id"])
    summary.images += keys.get("images", 0)
    summary.ok += keys.get("ok", 0)
    summary.uploaded += uploads.get("uploaded", 0)
    summary.already_stored += uploads.get("already_stored", 0)
    summary.repaired += uploads.get("repaired", 0)
    summary.rejects_by_reason.update(keys.get("rejects_by_reason", {}))
    progress(
        f"{label}: {keys.get('images', 0):,} images, "
        f"{keys.get('ok', 0):,} ok, {keys.get('rejected', 0):,} rejected, "
        f"{uploads.get('uploaded', 0):,} uploaded, "
        f"{keys.get('images_per_second', 0):.1f} img/s{tries}"
    )


def _metadata(
    instance: dg.DagsterInstance, asset: str, partition: str | None, run_id: str | None
) -> dict[str, Any]:
    """The metadata ``run_id`` recorded with its materialization of ``asset`` (empty if none)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey(asset),
            asset_partitions=[partition] if partition is not None else None,
        ),
        limit=1,
    ).records
    if not records or records[0].run_id != run_id or records[0].asset_materialization is None:
        return {}
    metadata = records[0].asset_materialization.metadata
    return {name: getattr(value, "value", value) for name, value in metadata.items()}


def _stopped(
    summary: IngestSummary,
    instance: dg.DagsterInstance,
    plan: BatchPlan | None,
    started: float,
) -> IngestSummary:
    """End an ingest that a stop signal (Ctrl-C) interrupted.

    Its runs end failed or canceled, never in progress; the shards without a successful run are
    named, so the user knows what to run again. A run interrupted inside a step has already
    failed (Dagster's own handling); one interrupted while Dagster was starting it is canceled.
    """
    succeeded = set()
    for run in instance.get_runs(filters=dg.RunsFilter(tags={TRIGGER_TAG: summary.trigger})):
        if run.status in NOT_ENDED:
            instance.report_run_canceled(run, "Interrupted (Ctrl-C) before the run finished.")
        elif run.status == dg.DagsterRunStatus.SUCCESS and run.job_name == "ingest_shard":
            succeeded.add(run.tags.get(PARTITION_TAG))
    summary.interrupted = True
    if plan is not None:
        summary.unfinished_shards = [s.key for s in plan.shards if s.key not in succeeded]
    summary.seconds = time.perf_counter() - started
    return summary


def _worker_env(
    env: dict[str, str],
    layout: LibraryLayout,
    workers: int | None,
    parallel: int,
    instance: dg.DagsterInstance,
) -> dict[str, str]:
    """The environment of the run workers: this process's, with the library settings of
    ``env`` only, the library root, the instance to record in, and the fingerprinting processes
    per shard (``workers``, else ``ASSET_LIBRARY_WORKERS``, else the cores' share)."""
    worker_env = {k: v for k, v in os.environ.items() if not k.startswith(_SETTING_PREFIXES)}
    worker_env.update(env)
    worker_env["ASSET_LIBRARY_HOME"] = layout.location
    # The same cache folder: an S3 library's working copies and the progress files read here.
    worker_env[CACHE_ENV] = env.get(CACHE_ENV) or str(cache_home())
    if workers is not None or not env.get("ASSET_LIBRARY_WORKERS"):
        worker_env["ASSET_LIBRARY_WORKERS"] = str(
            workers if workers is not None else workers_per_shard(parallel)
        )
    worker_env[INSTANCE_ENV] = dg.serialize_value(instance.get_ref())
    return worker_env


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the ingest the way Ctrl-C does (in the main thread; elsewhere as it is)."""

    def interrupt(_number: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_label(run: dg.DagsterRun) -> str:
    partition = run.tags.get(PARTITION_TAG)
    return f"{run.job_name} {partition}" if partition else run.job_name


class PlanningFailed(RuntimeError):
    """The batch could not be planned (a bad manifest, an empty or missing source)."""
