"""Run the ingestion graph from a terminal: the same Dagster jobs, on a local instance.

``asset-library ingest`` plans a batch, runs each shard as its own ``ingest_shard`` run, then the
``refresh_library`` run (images merge, similarity index), all recorded in the library's Dagster
instance, so ``dagster dev`` on the same library shows them as if the sensors had launched them.
"""

from __future__ import annotations

import os
import shutil
import time
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
from asset_library.ids import batch_id_for
from asset_library.ingest.plan import load_plan
from asset_library.ingest.triggers import new_trigger_id
from asset_library.layout import LibraryLayout

Progress = Callable[[str], None]

#: Runs from the terminal print our progress lines, not every Dagster event; the events are
#: still in the instance for the UI.
QUIET: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


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
    rejects_by_reason: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    checks: dict[str, bool] = field(default_factory=dict)
    catalog: dict[str, Any] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return not self.failed_shards and all(self.checks.values()) and bool(self.checks)


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
    environ: dict[str, str] | None = None,
    instance: dg.DagsterInstance | None = None,
    progress: Progress = print,
) -> IngestSummary:
    """Plan ``source`` as a new batch, ingest every shard, refresh the catalog, run the checks."""
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
    defs = build_definitions(resources)
    batch = batch or batch_id_for(source, datetime.now(UTC))
    trigger = new_trigger_id("cli")
    summary = IngestSummary(batch=batch, trigger=trigger)
    tags = {BATCH_TAG: batch, TRIGGER_TAG: trigger}

    instance.add_dynamic_partitions(batches_partitions.name, [batch])
    plan_config: dict[str, Any] = {"source": source, "trigger": trigger, "trigger_kind": "cli"}
    if max_images_per_shard:
        plan_config["max_images_per_shard"] = max_images_per_shard
    planned = defs.resolve_job_def("plan_batch").execute_in_process(
        partition_key=batch,
        run_config={"ops": {"batch_plan": {"config": plan_config}}, **QUIET},
        instance=instance,
        tags=tags,
        raise_on_error=False,
    )
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
        )
        metadata = _materialization_metadata(result)
        for evaluation in result.get_asset_check_evaluations():  # the shard's own checks
            name = evaluation.check_name
            summary.checks[name] = summary.checks.get(name, True) and evaluation.passed
        keys = metadata.get("shard_keys", {})
        uploads = metadata.get("shard_uploads", {})
        if not result.success:
            summary.failed_shards.append(shard.key)
            progress(
                f"[{number}/{len(plan.shards)}] {shard.key}: FAILED {_failure_message(result)}"
            )
            continue
        summary.images += keys.get("images", 0)
        summary.ok += keys.get("ok", 0)
        summary.uploaded += uploads.get("uploaded", 0)
        summary.already_stored += uploads.get("already_stored", 0)
        summary.rejects_by_reason.update(keys.get("rejects_by_reason", {}))
        progress(
            f"[{number}/{len(plan.shards)}] {shard.key}: {keys.get('images', 0):,} images, "
            f"{keys.get('ok', 0):,} ok, {keys.get('rejected', 0):,} rejected, "
            f"{uploads.get('uploaded', 0):,} uploaded, "
            f"{keys.get('images_per_second', 0):.1f} img/s"
        )

    refreshed = defs.resolve_job_def("refresh_library").execute_in_process(
        instance=instance, tags=tags, run_config=QUIET, raise_on_error=False
    )
    summary.catalog = _materialization_metadata(refreshed).get("images", {})
    summary.checks.update(
        {
            evaluation.check_name: evaluation.passed
            for evaluation in refreshed.get_asset_check_evaluations()
        }
    )
    summary.seconds = time.perf_counter() - started
    return summary


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
    """The root cause of the first failed step, without Dagster's wrapping."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None:
                error = error.cause
            first = (error.message or "").strip().splitlines()[0] if error.message else ""
            kind, _, text = first.partition(": ")
            return text if text and " " not in kind else first
    return ""
