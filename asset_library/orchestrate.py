"""Run the ingestion graph from a terminal: the same Dagster jobs, on a local instance.

``asset-library ingest`` plans a batch, runs each shard as its own ``ingest_shard`` run, then the
``refresh_library`` run (images merge, similarity index), all recorded in the library's Dagster
instance, so ``dagster dev`` on the same library shows them as if the sensors had launched them.

No daemon watches these runs, so the runner looks after their ends itself: Ctrl-C stops the
ingest after the current run has ended (failed or canceled, never left in progress), and runs
whose process was killed are marked failed by the next ``ingest`` or ``status``.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.storage.defs_state.base import set_defs_state_storage

from asset_library.defs.assets.ingestion import BATCH_TAG, TRIGGER_TAG
from asset_library.defs.partitions import batches_partitions
from asset_library.defs.resources import build_resources
from asset_library.ids import batch_id_for, check_batch_id
from asset_library.ingest.plan import BatchPlan, check_new_batch, load_plan
from asset_library.ingest.triggers import new_trigger_id
from asset_library.layout import LibraryLayout
from asset_library.processes import StopWatch, process_is_gone, process_token, stop_signals_deferred
from asset_library.storage import bind_store

Progress = Callable[[str], None]

#: Runs from the terminal print our progress lines, one line per failure included, not Dagster's
#: events and tracebacks; those are still in the instance for the UI.
QUIET: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}

#: Runs started from a terminal carry the identity of their process (see ``process_token``).
PROCESS_TAG = "asset_library/process"

#: Statuses of a run that has not ended; the CLI's runs never wait in a queue.
_NOT_ENDED = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


@dataclass
class IngestSummary:
    batch: str
    trigger: str
    shards: int = 0
    failed_shards: list[str] = field(default_factory=list)
    images: int = 0
    ok: int = 0
    uploaded: int = 0
    already_stored: int = 0
    repaired: int = 0
    rejects_by_reason: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    checks: dict[str, bool] = field(default_factory=dict)
    catalog: dict[str, Any] = field(default_factory=dict)
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


def instance_home(layout: LibraryLayout) -> Path:
    """The library's own Dagster instance folder, so the UI on this library sees these runs."""
    home = layout.root / ".dagster"
    home.mkdir(parents=True, exist_ok=True)
    project_yaml = Path.cwd() / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and project_yaml.exists():
        shutil.copyfile(project_yaml, home / "dagster.yaml")
    return home


def local_instance(layout: LibraryLayout) -> dg.DagsterInstance:
    home = os.environ.get("DAGSTER_HOME") or str(instance_home(layout))
    os.environ["DAGSTER_HOME"] = home
    return dg.DagsterInstance.get()


def ingest_batch(
    source: str,
    *,
    library: str | Path,
    max_images_per_shard: int | None = None,
    workers: int | None = None,
    batch: str | None = None,
    replace: bool = False,
    environ: dict[str, str] | None = None,
    instance: dg.DagsterInstance | None = None,
    progress: Progress = print,
) -> IngestSummary:
    """Plan ``source`` as a new batch, ingest every shard, refresh the catalog, run the checks.

    A named ``batch`` that already exists is refused (:class:`BatchExistsError`) unless
    ``replace``: then it is re-planned from ``source`` and its shards re-run."""
    if batch is not None:
        check_batch_id(batch)
    if max_images_per_shard is not None and max_images_per_shard < 1:
        raise ValueError(f"max_images_per_shard must be at least 1, not {max_images_per_shard}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be 0 (in-process) or more, not {workers}")
    instance = instance or local_instance(_layout_for(library))
    # Dagster resolves definitions against a process-global "current" state store, the one of
    # the most recently created instance; pin it to the instance these runs are recorded in.
    with set_defs_state_storage(instance.defs_state_storage):
        return _ingest_batch(
            source,
            library=library,
            max_images_per_shard=max_images_per_shard,
            workers=workers,
            batch=batch,
            replace=replace,
            environ=environ,
            instance=instance,
            progress=progress,
        )


def _ingest_batch(
    source: str,
    *,
    library: str | Path,
    max_images_per_shard: int | None,
    workers: int | None,
    batch: str | None,
    replace: bool,
    environ: dict[str, str] | None,
    instance: dg.DagsterInstance,
    progress: Progress,
) -> IngestSummary:
    from asset_library.definitions import build_definitions

    started = time.perf_counter()
    env = dict(os.environ if environ is None else environ)
    if workers is not None:
        env["ASSET_LIBRARY_WORKERS"] = str(workers)
    resources = build_resources(env, root=str(library))
    layout = resources["library"].layout()
    # A store other than the library's own fails here, before planning or uploading anything.
    bind_store(layout, resources["object_store"].location(), record=False)
    defs = build_definitions(resources)
    batch = batch or batch_id_for(source, datetime.now(UTC))
    check_new_batch(layout.plan_dir(batch), batch, replace=replace)
    trigger = new_trigger_id("cli")
    summary = IngestSummary(batch=batch, trigger=trigger)
    tags = {BATCH_TAG: batch, TRIGGER_TAG: trigger, PROCESS_TAG: process_token()}

    for run in reap_dead_runs(instance):
        summary.reaped_runs.append(run.run_id)
        progress(f"run {run.run_id} ({_run_label(run)}) marked failed: its process is gone")

    runs: dict[str, str] = {}  # what each run is for -> its run id
    plan = None
    with StopWatch() as stop:
        try:
            instance.add_dynamic_partitions(batches_partitions.name, [batch])
            plan_config: dict[str, Any] = {
                "source": source,
                "trigger": trigger,
                "trigger_kind": "cli",
                "replace": replace,
            }
            if max_images_per_shard is not None:
                plan_config["max_images_per_shard"] = max_images_per_shard
            planned = defs.resolve_job_def("plan_batch").execute_in_process(
                partition_key=batch,
                run_config={"ops": {"batch_plan": {"config": plan_config}}, **QUIET},
                instance=instance,
                tags=tags,
                raise_on_error=False,
                run_id=runs.setdefault("plan", _new_run_id()),
            )
            _raise_if_stopped(stop)
            if not planned.success:
                raise PlanningFailed(_failure_message(planned) or f"planning {source} failed")
            plan = load_plan(layout.plan_dir(batch))
            summary.shards = len(plan.shards)
            progress(f"batch {batch}: {plan.images:,} images in {len(plan.shards)} shard(s)")

            shard_job = defs.resolve_job_def("ingest_shard")
            for number, shard in enumerate(plan.shards, start=1):
                result = shard_job.execute_in_process(
                    partition_key=shard.key,
                    instance=instance,
                    tags=tags,
                    run_config=QUIET,
                    raise_on_error=False,
                    run_id=runs.setdefault(shard.key, _new_run_id()),
                )
                _raise_if_stopped(stop)
                _add_shard(summary, result, shard.key, f"[{number}/{len(plan.shards)}]", progress)

            refreshed = defs.resolve_job_def("refresh_library").execute_in_process(
                instance=instance,
                tags=tags,
                run_config=QUIET,
                raise_on_error=False,
                run_id=runs.setdefault("refresh", _new_run_id()),
            )
            _raise_if_stopped(stop)
        except KeyboardInterrupt:
            with stop_signals_deferred():  # a second Ctrl-C must not cut the bookkeeping short
                return _stopped(summary, instance, runs, plan, started)
    summary.catalog = _materialization_metadata(refreshed).get("images", {})
    summary.checks.update(
        {
            evaluation.check_name: evaluation.passed
            for evaluation in refreshed.get_asset_check_evaluations()
        }
    )
    summary.seconds = time.perf_counter() - started
    return summary


def _raise_if_stopped(stop: StopWatch) -> None:
    """A stop signal that Dagster turned into a failed step (or dropped) stops us as Ctrl-C."""
    if stop.received() is not None:
        raise KeyboardInterrupt


def _add_shard(
    summary: IngestSummary,
    result: dg.ExecuteInProcessResult,
    shard: str,
    counter: str,
    progress: Progress,
) -> None:
    """Count a shard run's outcome into the summary and print its line."""
    metadata = _materialization_metadata(result)
    for evaluation in result.get_asset_check_evaluations():  # the shard's own checks
        name = evaluation.check_name
        summary.checks[name] = summary.checks.get(name, True) and evaluation.passed
    keys = metadata.get("shard_keys", {})
    uploads = metadata.get("shard_uploads", {})
    label = f"{counter} {shard}"
    if not result.success:
        summary.failed_shards.append(shard)
        progress(f"{label}: FAILED {_failure_message(result)}")
        return
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
        f"{keys.get('images_per_second', 0):.1f} img/s"
    )


def _stopped(
    summary: IngestSummary,
    instance: dg.DagsterInstance,
    runs: dict[str, str],
    plan: BatchPlan | None,
    started: float,
) -> IngestSummary:
    """End an ingest that a stop signal (Ctrl-C) interrupted.

    Its runs end failed or canceled, never in progress; the shards without a successful run are
    named, so the user knows what to run again. A run interrupted inside a step has already
    failed (Dagster's own handling); one interrupted while Dagster was starting it is canceled.
    """
    succeeded = set()
    for purpose, run_id in runs.items():
        run = instance.get_run_by_id(run_id)
        if run is None:
            continue
        if run.status in _NOT_ENDED:
            instance.report_run_canceled(run, "Interrupted (Ctrl-C) before the run finished.")
        elif run.status == dg.DagsterRunStatus.SUCCESS:
            succeeded.add(purpose)
    summary.interrupted = True
    if plan is not None:
        summary.unfinished_shards = [s.key for s in plan.shards if s.key not in succeeded]
    summary.seconds = time.perf_counter() - started
    return summary


def reap_dead_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """Mark failed the runs started from a terminal whose process is gone.

    A run whose process was killed (``kill -9``, out of memory, a closed laptop) never records
    its end, and with no daemon to notice it would show in progress forever. Runs without the
    process tag (launched by a daemon or the UI) are left to Dagster's own run monitoring.
    """
    reaped = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_NOT_ENDED)):
        token = run.tags.get(PROCESS_TAG)
        if token and process_is_gone(token):
            instance.report_run_failed(
                run,
                f"Its process ({token}) ended before the run did (killed or crashed); "
                "marked failed by asset-library.",
            )
            reaped.append(run)
    return reaped


def _run_label(run: dg.DagsterRun) -> str:
    partition = run.tags.get("dagster/partition")
    return f"{run.job_name} {partition}" if partition else run.job_name


def _new_run_id() -> str:
    """A run id chosen before the run starts, so an interrupted start can still be found."""
    return str(uuid.uuid4())


class PlanningFailed(RuntimeError):
    """The batch could not be planned (a bad manifest, an empty or missing source)."""


def _materialization_metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization  # type: ignore[union-attr]
        found[materialization.asset_key.to_user_string()] = {
            name: getattr(value, "value", value) for name, value in materialization.metadata.items()
        }
    return found


def _layout_for(library: str | Path) -> LibraryLayout:
    return LibraryLayout.open(Path(library).expanduser().resolve())


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    """The first line of the error our code raised in the first failed step: below Dagster's
    wrapping, above the library errors it wraps (ours name the file, row, shard or URI)."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None and (error.cls_name or "").startswith("Dagster"):
                error = error.cause
            first = (error.message or "").strip().splitlines()[0] if error.message else ""
            kind, _, text = first.partition(": ")
            return text if text and " " not in kind else first
    return ""
