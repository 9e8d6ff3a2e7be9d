"""Every run tag the library sets or reads: its own, and Dagster's it relies on.

The batch and trigger tags trace a run to its batch and to what started it. Launchers that know
the batch (the sensors, the schedule, the CLI) set both tags on the run request. Launchers that
cannot (a partition launched from the UI, an asset backfill, GraphQL) start runs without them:
the run then tags itself when it starts (``tag_run``)."""

from collections.abc import Mapping

import dagster as dg

BATCH_TAG = "asset_library/batch"
TRIGGER_TAG = "asset_library/trigger"
#: Every batch a refresh run carries, comma-separated, when it carries more than one.
BATCHES_TAG = "asset_library/batches"
#: ``asset_library/batch`` of a run that carries several batches.
SEVERAL = "several"
#: Tag values stay readable in the run list: a longer list is cut and ends in "...".
MAX_BATCHES_TAG_CHARS = 1000

#: Runs that write library-wide files carry this tag (value :data:`SERIAL_VALUE`); dagster.yaml
#: lets one such run go at a time.
SERIAL_TAG = "asset_library/serial"
SERIAL_VALUE = "library"
#: Runs started from a terminal carry the identity of the process that runs them.
PROCESS_TAG = "asset_library/process"
#: A retried shard's run says which attempt it is (1 for the first).
ATTEMPT_TAG = "asset_library/attempt"

#: Dagster's own tags.
BACKFILL_TAG = "dagster/backfill"
FROM_UI_TAG = "dagster/from_ui"
PARTITION_TAG = "dagster/partition"
MAX_RETRIES_TAG = "dagster/max_retries"


def batch_tags(batches: list[str]) -> dict[str, str]:
    """``asset_library/batch`` for one batch; ``several`` plus the list for more."""
    unique = sorted(set(batches))
    if len(unique) <= 1:
        return {BATCH_TAG: unique[0]} if unique else {}
    listed = ",".join(unique)
    if len(listed) > MAX_BATCHES_TAG_CHARS:
        listed = listed[: MAX_BATCHES_TAG_CHARS - 3] + "..."
    return {BATCH_TAG: SEVERAL, BATCHES_TAG: listed}


def trigger_of(tags: Mapping[str, str]) -> str:
    """The trigger of a run launched without one: its backfill, else the UI, else by hand."""
    if tags.get(BACKFILL_TAG):
        return f"backfill-{tags[BACKFILL_TAG]}"
    if tags.get(FROM_UI_TAG) == "true":
        return "ui"
    return "manual"


def tag_run(context: dg.AssetExecutionContext, batches: list[str]) -> dict[str, str]:
    """Add the batch and trigger tags the run was launched without; returns what was added.

    Tags set by the launcher win: a sensor's or the CLI's run is left as it is."""
    tags = context.run.tags
    missing = {k: v for k, v in batch_tags(batches).items() if k not in tags}
    if TRIGGER_TAG not in tags:
        missing[TRIGGER_TAG] = trigger_of(tags)
    if missing:
        context.instance.add_run_tags(context.run.run_id, missing)
    return missing
