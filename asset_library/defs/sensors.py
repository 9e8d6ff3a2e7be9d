"""Sensors: the triggers that turn landed batches into shard runs without a person.

``landing_sensor`` sees a batch land, records the trigger and requests the batch's plan run; a
batch whose id is already taken is skipped with its reason (in the tick's log and the library),
and the others go on.
``shard_sensor`` sees a plan materialize, adds its shard partitions and requests one run per
shard. Planning is real work (listing a billion URIs), so it happens in a run, not in a tick.
``refresh_sensor`` sees shards' lake rows land and requests a ``refresh_library`` run.
"""

import json
import os
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from asset_library.defs.jobs import ingest_shard_job, plan_batch_job, refresh_library_job
from asset_library.defs.partitions import BATCHES, SHARDS, batches_partitions, shards_partitions
from asset_library.defs.resources import LandingZoneResource, LibraryResource, SourceReaderResource
from asset_library.defs.tags import BATCH_TAG, TRIGGER_TAG, batch_tags
from asset_library.ids import (
    InvalidIdError,
    batch_id_for,
    batch_of,
    check_batch_id,
    legacy_batch_id,
)
from asset_library.ingest.landing import (
    LandedBatch,
    SkippedLanding,
    find_ready_batches,
    record_skipped,
)
from asset_library.ingest.plan import has_plan, read_plan
from asset_library.ingest.sources import normalize_source
from asset_library.ingest.triggers import new_trigger_id
from asset_library.layout import LibraryLayout
from asset_library.s3 import is_s3

#: Keeps a tick well inside the 60 s sensor timeout: the daemon checks each new key.
MAX_BATCHES_PER_TICK = 50
MAX_PLANS_PER_TICK = 20
#: Landed shards one refresh request names; more are merged all the same (the merge reads the
#: lake's change feed), only named by the next request.
MAX_LANDED_PER_TICK = 10_000

#: Overrides every sensor's minimum interval (seconds); unset, each keeps its default.
INTERVAL_ENV = "ASSET_LIBRARY_SENSOR_INTERVAL"


def sensor_interval(default: int) -> int:
    """Seconds between ticks: ``ASSET_LIBRARY_SENSOR_INTERVAL`` if set, else ``default``.

    A test of the daemon lowers it: a tick every 30 s costs minutes there."""
    value = os.environ.get(INTERVAL_ENV, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{INTERVAL_ENV}={value!r}: expected a whole number of seconds >= 1")
    return int(value)


@dg.sensor(
    job=plan_batch_job,
    minimum_interval_seconds=sensor_interval(30),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the landing zone for a folder with a _READY marker or a manifest.",
)
def landing_sensor(
    context: dg.SensorEvaluationContext,
    landing: LandingZoneResource,
    sources: SourceReaderResource,
    library: LibraryResource,
) -> dg.SensorResult:
    layout = library.layout()
    client = sources.s3_client() if is_s3(landing.location) else None
    seen, ready = _ready_to_request(landing.location, client, layout, context.cursor)
    requests: list[dg.RunRequest] = []
    skipped: list[str] = []
    taken: dict[str, str] = {}
    for landed in ready:
        batch = batch_id_for(landed.name)
        holder = taken.get(batch) or _holder_of(context.instance, layout, batch)
        if holder is not None:
            skipped.append(_skip(context, layout, landed, batch, f"batch id {batch} is {holder}"))
            continue
        taken[batch] = f"taken by {landed.source}, landed in the same tick"
        trigger = new_trigger_id("landing")
        requests.append(_plan_request(landed.source, batch, trigger))
        context.log.info(f"batch {batch} landed at {landed.source}: trigger {trigger}")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[batches_partitions.build_add_request(list(taken))]
        if requests
        else [],
        cursor=json.dumps({"seen": seen + [landed.name for landed in ready]}),
        skip_reason="; ".join(skipped) if skipped and not requests else None,
    )


def _plan_request(source: str, batch: str, trigger: str) -> dg.RunRequest:
    config = {"source": source, "trigger": trigger, "trigger_kind": "landing"}
    return dg.RunRequest(
        run_key=f"batch:{batch}",
        partition_key=batch,
        run_config={"ops": {"batch_plan": {"config": config}}},
        tags={BATCH_TAG: batch, TRIGGER_TAG: trigger},
    )


def _holder_of(instance: dg.DagsterInstance, layout: LibraryLayout, batch: str) -> str | None:
    """What already holds ``batch``, if anything: a plan (from the CLI or an earlier landing)
    or a partition the sensor requested before."""
    if has_plan(layout, batch):
        return f"taken by the batch planned from {read_plan(layout, batch).source}"
    if instance.has_dynamic_partition(BATCHES, batch):
        return "taken by an existing batch (its plan run has not written a plan yet)"
    return None


def _skip(
    context: dg.SensorEvaluationContext,
    layout: LibraryLayout,
    landed: LandedBatch,
    batch: str,
    reason: str,
) -> str:
    """Record a landed batch that cannot start, and say so in the tick; the others go on."""
    source = normalize_source(landed.source)
    message = (
        f"landed {source} skipped: {reason}; ingest it under another id with "
        f"`asset-library ingest {source} --batch <new id>`"
    )
    record_skipped(
        layout,
        SkippedLanding(
            landed.name, source, batch, reason, datetime.now(UTC).isoformat(timespec="seconds")
        ),
    )
    context.log.warning(message)
    return message


def _ready_to_request(
    location: str, client: Any, layout: LibraryLayout, cursor: str | None
) -> tuple[list[str], list[LandedBatch]]:
    """(names seen before, ready batches to look at now). A cursor left by an earlier version
    (a bare list of names) is checked once for names it saw but never ingested: the ones whose
    earlier id already belonged to another source's plan come back to be ingested."""
    raw = json.loads(cursor) if cursor else {"seen": []}
    if isinstance(raw, dict):
        seen: list[str] = raw["seen"]
        return seen, find_ready_batches(location, client, skip=seen)[:MAX_BATCHES_PER_TICK]
    known = set(raw)
    everything = find_ready_batches(location, client)
    swallowed = {b.name for b in everything if b.name in known and _swallowed(layout, b)}
    seen = [name for name in raw if name not in swallowed]
    ready = [b for b in everything if b.name not in known or b.name in swallowed]
    return seen, ready[:MAX_BATCHES_PER_TICK]


def _swallowed(layout: LibraryLayout, landed: LandedBatch) -> bool:
    """Whether an earlier version saw ``landed`` and gave it the id of another source's plan."""
    batch = legacy_batch_id(landed.name)
    return has_plan(layout, batch) and read_plan(layout, batch).source != normalize_source(
        landed.source
    )


@dg.sensor(
    job=ingest_shard_job,
    minimum_interval_seconds=sensor_interval(15),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="When a batch plan materializes, adds its shards and requests their runs.",
)
def shard_sensor(context: dg.SensorEvaluationContext, library: LibraryResource) -> dg.SensorResult:
    records = context.instance.fetch_materializations(
        dg.AssetKey("batch_plan"), limit=MAX_PLANS_PER_TICK, cursor=context.cursor, ascending=True
    )
    layout = library.layout()
    requests: list[dg.RunRequest] = []
    keys: list[str] = []
    for record in records.records:
        batch = record.partition_key
        if batch is None:
            continue
        try:
            check_batch_id(batch)
        except InvalidIdError as error:
            context.log.warning(f"skipping a batch_plan materialization: {error}")
            continue
        plan = read_plan(layout, batch)
        done = _materialized_since(context.instance, plan.shard_keys, record.storage_id)
        for shard in plan.shard_keys:
            keys.append(shard)
            if shard in done:
                continue
            requests.append(
                dg.RunRequest(
                    run_key=f"shard:{shard}:{record.storage_id}",
                    partition_key=shard,
                    tags={BATCH_TAG: batch, TRIGGER_TAG: plan.trigger or "manual"},
                )
            )
    if keys:
        # The plan run added its keys already; the daemon checks every requested key with its
        # own query (~30 ms each on Postgres), so request only those still missing.
        known = set(context.instance.get_dynamic_partitions(SHARDS))
        keys = [key for key in keys if key not in known]
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[shards_partitions.build_add_request(keys)] if keys else [],
        cursor=records.cursor,
    )


def _materialized_since(
    instance: dg.DagsterInstance, shards: list[str], storage_id: int
) -> set[str]:
    """Shards already ingested after this plan landed (e.g. by ``asset-library ingest``), so
    a sensor that starts later does not ingest them a second time."""
    done: set[str] = set()
    cursor = None
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey("shard_keys"),
                asset_partitions=shards,
                after_storage_id=storage_id,
            ),
            limit=1000,
            cursor=cursor,
        )
        done.update(r.partition_key for r in page.records if r.partition_key)
        if not page.has_more:
            return done
        cursor = page.cursor


#: Runs of the refresh job that have not ended: while one is queued or running, wait.
_REFRESH_PENDING = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


@dg.sensor(
    job=refresh_library_job,
    minimum_interval_seconds=sensor_interval(30),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests a refresh_library run when shards' lake rows landed since the last "
    "request and no refresh is queued or running. It waits for no other shard: a failing "
    "shard's retries do not hold its siblings back.",
)
def refresh_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    after = int(context.cursor) if context.cursor else None
    shards: list[str] = []
    last = after
    cursor = None
    while len(shards) < MAX_LANDED_PER_TICK:
        page = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("occurrences"), after_storage_id=after),
            limit=1000,
            cursor=cursor,
            ascending=True,
        )
        shards += [r.partition_key for r in page.records if r.partition_key]
        last = page.records[-1].storage_id if page.records else last
        if not page.has_more:
            break
        cursor = page.cursor
    if last == after:
        return dg.SkipReason("no shard landed since the last refresh request")
    pending = context.instance.get_run_ids(
        dg.RunsFilter(job_name=refresh_library_job.name, statuses=_REFRESH_PENDING), limit=1
    )
    if pending:  # the cursor stays: the shards are requested once that refresh has ended
        return dg.SkipReason(f"{len(shards)} shard(s) landed; refresh {pending[0]} not ended yet")
    batches = [batch_of(shard) for shard in shards]
    context.log.info(f"{len(shards)} shard(s) of {len(set(batches))} batch(es) landed")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"refresh:{last}", tags={**batch_tags(batches), TRIGGER_TAG: "sensor"}
            )
        ],
        cursor=str(last),
    )
