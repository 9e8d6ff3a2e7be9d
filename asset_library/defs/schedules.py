"""Schedules: periodic triggers. Failed or never-run shards are retried once a day."""

import dagster as dg

from asset_library.defs.jobs import ingest_shard_job
from asset_library.defs.partitions import SHARDS
from asset_library.defs.shard_status import shard_statuses
from asset_library.defs.tags import BATCH_TAG, TRIGGER_TAG
from asset_library.ids import batch_of

MAX_RETRIES_PER_TICK = 1000


def shards_to_retry(instance: dg.DagsterInstance) -> list[str]:
    """Shards with an output that failed or was never written, and not running: judged by
    all of a shard's outputs, so one whose keys landed but whose lake rows did not is retried."""
    keys = instance.get_dynamic_partitions(SHARDS)
    statuses = shard_statuses(instance, keys)
    return [key for key in keys if statuses[key] in (None, dg.AssetPartitionStatus.FAILED)][
        :MAX_RETRIES_PER_TICK
    ]


@dg.schedule(
    job=ingest_shard_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Re-runs failed or missing shards once a day.",
)
def retry_failed_shards(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
    tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    trigger = f"schedule-{tick}"
    return [
        dg.RunRequest(
            run_key=f"retry:{shard}:{tick}",
            partition_key=shard,
            tags={BATCH_TAG: batch_of(shard), TRIGGER_TAG: trigger},
        )
        for shard in shards_to_retry(context.instance)
    ]
