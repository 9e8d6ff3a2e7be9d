"""What ``asset-library status`` prints: landings that were skipped, the library's own state
(its last refresh, the shards ``images`` does not hold yet), runs found dead, and each batch
with its shards' states. Imported only by that command, so the CLI's other commands start
without Dagster's instance machinery."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import dagster as dg
from deltalake.exceptions import DeltaError

from asset_library.defs.shard_status import shard_states
from asset_library.defs.tags import PARTITION_TAG
from asset_library.ingest.landing import still_skipped
from asset_library.ingest.triggers import read_triggers
from asset_library.lake import Lake, shards_not_merged
from asset_library.layout import LibraryLayout
from asset_library.runs.instance import local_instance, reap_dead_runs
from asset_library.runs.worker import step_failure_message


def status_lines(layout: LibraryLayout) -> list[str]:
    """Every line ``status`` prints for the library at ``layout``. Runs whose process is gone
    are marked failed on the way (and said so)."""
    records = read_triggers(layout)
    lines = [
        f"skipped landing {skipped.source} ({skipped.skipped_at}): {skipped.reason}"
        for skipped in still_skipped(layout, {r.source for r in records})
    ]
    if not records:
        return [*lines, f"no batches ingested yet in {layout.location}"]
    instance = local_instance(layout)
    lines += library_state(layout, instance)
    for run in reap_dead_runs(instance):
        partition = run.tags.get(PARTITION_TAG, "")
        lines.append(
            f"run {run.run_id} ({run.job_name} {partition}) was in progress but its process "
            "is gone (killed?): marked failed"
        )
    states = shard_states(instance, [shard for record in records for shard in record.shards])
    for record in records:
        lines.append(
            f"{record.batch}  {record.images:,} images  trigger {record.trigger} "
            f"({record.kind}, {record.triggered_at})  source {record.source}"
        )
        lines += [f"  {shard}  {states[shard]}" for shard in record.shards]
    return lines


def library_state(layout: LibraryLayout, instance: Any) -> list[str]:
    """The library's own state, as ``status`` prints it above the batches: its last refresh
    (and why it failed), and the shards whose rows ``images`` does not hold yet."""
    lines = [f"library   {layout.location}"]
    records = instance.get_run_records(dg.RunsFilter(job_name="refresh_library"), limit=1)
    last = records[0] if records else None
    if last is None:
        lines.append("refresh   never run")
    else:
        run = last.dagster_run
        when = last.end_time or last.start_time or last.create_timestamp.timestamp()
        at = datetime.fromtimestamp(when).astimezone().isoformat(timespec="seconds")
        state = "FAILED" if run.status == dg.DagsterRunStatus.FAILURE else run.status.value.lower()
        why = ""
        if run.status == dg.DagsterRunStatus.FAILURE:
            failures = instance.get_records_for_run(
                run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE, limit=1
            ).records
            why = ": " + step_failure_message(r.event_log_entry.dagster_event for r in failures)
        lines.append(f"refresh   last {at}: {state} (run {run.run_id}){why}")
    try:
        pending = shards_not_merged(Lake.of(layout))
    except (DeltaError, OSError) as error:
        pending, unreadable = None, str(error).splitlines()[0]
    else:
        unreadable = "the occurrences table's history cannot be read"
    if pending is None:
        lines.append(f"pending   unknown: {unreadable}")
    elif pending:
        more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
        shown = ", ".join(pending[:5]) + more
        lines.append(
            f"pending   {len(pending):,} shard(s) whose rows images does not hold yet: {shown}"
        )
    else:
        lines.append("pending   none: images holds every shard's rows")
    return lines + [""]
