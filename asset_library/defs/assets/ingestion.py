"""Ingestion assets: a batch's plan, then each shard as one unit: its keys and uploads and its
lake rows, materialized together by one non-subsettable multi-asset.

A shard's checks run in the shard's own run, on the shard's own rows, and block there: a
shard whose keys fail them never reaches the lake. Whatever launches a shard (its job, any one
of its assets, a backfill, a re-execution) runs all of it."""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from asset_library.defs.checks import (
    attribute_keys_in_occurrences,
    hash_coverage,
    uploads_present,
)
from asset_library.defs.partitions import (
    SHARD_OUTPUTS,
    SHARDS,
    batches_partitions,
    shards_partitions,
)
from asset_library.defs.resources import (
    LibraryResource,
    ObjectStoreResource,
    SourceReaderResource,
    with_store_kinds,
)
from asset_library.defs.tags import BATCH_TAG, TRIGGER_TAG, tag_run
from asset_library.ids import batch_of, check_batch_id
from asset_library.ingest.access import ReadPolicy, batch_roots
from asset_library.ingest.plan import plan_batch, read_plan, read_shard_items, shard_file
from asset_library.ingest.pool import FingerprintPool
from asset_library.ingest.progress import write_progress
from asset_library.ingest.shard import ShardStats, ingest_shard
from asset_library.ingest.sources import SourceItem, iter_batch, normalize_source
from asset_library.ingest.triggers import TriggerRecord, write_trigger
from asset_library.lake import SHARD_TABLES, write_shard
from asset_library.runs.processes import stop_signals_deferred
from asset_library.s3 import is_s3
from asset_library.storage import DamageRecord

GROUP = "ingestion"
__all__ = ["BATCH_TAG", "TRIGGER_TAG", "SHARD_OUTPUTS", "batch_plan", "shard"]


class BatchPlanConfig(dg.Config):
    """What to plan: the batch's source and the trigger that produced it."""

    source: str
    trigger: str = "manual"
    trigger_kind: str = "manual"
    max_images_per_shard: int | None = Field(default=None, ge=1)
    #: Re-plan a batch id that already has a plan (its shards are then re-run).
    replace: bool = False


@dg.asset(
    partitions_def=batches_partitions,
    group_name=GROUP,
    kinds={"python", "parquet"},
    description="A landed batch cut into shards; the plan is written before any shard runs.",
)
def batch_plan(
    context: dg.AssetExecutionContext,
    config: BatchPlanConfig,
    library: LibraryResource,
    sources: SourceReaderResource,
) -> dg.MaterializeResult:
    batch = check_batch_id(context.partition_key)
    tag_run(context, [batch])
    layout = library.layout()
    source = normalize_source(config.source)
    client = sources.s3_client() if is_s3(source) else None
    roots = batch_roots(source, sources.allowed_roots)
    # The tables a shard writes exist before any shard runs: shards started side by side on
    # many machines then never each create them (see lake.table.write_settled).
    library.lake().ensure(SHARD_TABLES)
    outside: list[str] = []
    plan = plan_batch(
        _noting_outside(iter_batch(source, client), ReadPolicy(tuple(roots)), outside),
        batch=batch,
        source=source,
        layout=layout,
        max_images_per_shard=config.max_images_per_shard or library.max_images_per_shard,
        trigger=config.trigger,
        roots=roots,
        replace=config.replace,
    )
    if outside:
        context.log.warning(
            f"batch {batch}: {len(outside):,} local URI(s) outside the batch's folder and the "
            f"allowed roots will be rejected (outside_batch), e.g. {outside[0]}"
        )
    context.instance.add_dynamic_partitions(SHARDS, plan.shard_keys)
    write_trigger(
        layout,
        TriggerRecord(
            trigger=config.trigger,
            kind=config.trigger_kind,
            batch=batch,
            source=source,
            triggered_at=datetime.now(UTC).isoformat(timespec="seconds"),
            images=plan.images,
            shards=plan.shard_keys,
        ),
    )
    return dg.MaterializeResult(
        metadata={
            "source": source,
            "trigger": config.trigger,
            "images": plan.images,
            "outside_batch": len(outside),
            "roots": ", ".join(plan.roots),
            "shards": len(plan.shards),
            "max_images_per_shard": plan.max_images_per_shard,
            "shard_keys": dg.MetadataValue.md(
                "\n".join(f"- `{s.key}`: {s.images:,} images" for s in plan.shards[:50])
            ),
            "plan": dg.MetadataValue.path(
                f"{layout.home}/plans/{batch}/plan.json"
                if layout.home
                else str(layout.plan_path(batch))
            ),
        }
    )


def _noting_outside(
    items: Iterable[SourceItem], policy: ReadPolicy, outside: list[str]
) -> Iterator[SourceItem]:
    """Pass items through, noting local URIs the shard runs will refuse to read: the check is
    made at planning (to warn early) and again at reading (to refuse)."""
    for item in items:
        if not is_s3(item.uri) and policy.refusal(item.uri) is not None:
            outside.append(item.uri)
        yield item


_SHARD_DEP = dg.AssetDep(batch_plan, partition_mapping=dg.AllPartitionMapping())


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "shard_keys",
            deps=[_SHARD_DEP],
            group_name=GROUP,
            kinds={"python", "parquet"},
            description="Each image of the shard read once: md5 key, hashes, header attributes.",
        ),
        dg.AssetSpec(
            "shard_uploads",
            deps=[_SHARD_DEP],
            group_name=GROUP,
            description="The shard's bytes in object storage under their md5 key, write-once.",
        ),
        dg.AssetSpec(
            "occurrences",
            deps=["shard_keys"],
            group_name=GROUP,
            kinds={"deltalake"},
            description="Delta table: one row per accepted image occurrence, by bucket.",
        ),
        dg.AssetSpec(
            "rejects",
            deps=["shard_keys"],
            group_name=GROUP,
            kinds={"deltalake"},
            description="Delta table: one row per source that was not ingested, and why.",
        ),
        dg.AssetSpec(
            "attributes",
            deps=["shard_keys"],
            group_name=GROUP,
            kinds={"deltalake"},
            description="Delta table, the cube: (md5, attribute, value, value_type) rows from "
            "manifest extras and derived attributes (EXIF camera and capture time, aspect "
            "ratio, megapixels, animation).",
        ),
    ],
    check_specs=[
        dg.AssetCheckSpec(
            "hash_coverage",
            asset="shard_keys",
            blocking=True,
            description="Every accepted image of the shard has pHash, aHash and dHash; "
            "judged before the shard's lake rows are written.",
        ),
        dg.AssetCheckSpec(
            "uploads_present",
            asset="shard_uploads",
            blocking=True,
            description="Every accepted image of the shard is stored under its md5, with its "
            "size; judged before the shard's lake rows are written.",
        ),
        dg.AssetCheckSpec(
            "attribute_keys_in_occurrences",
            asset="attributes",
            blocking=True,
            description="Every md5 of the shard's attributes is among the shard's occurrences.",
        ),
    ],
    partitions_def=shards_partitions,
    can_subset=False,
    description="One shard, whole: its keys and uploads (one pass over the bytes), checked, "
    "then its rows in the lake's occurrences, rejects and attributes tables (one commit "
    "each). Materializing any one of these assets runs all of them.",
)
def shard(
    context: dg.AssetExecutionContext,
    library: LibraryResource,
    object_store: ObjectStoreResource,
    sources: SourceReaderResource,
    duckdb: DuckDBResource,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Read the shard once, check its keys, then write its lake rows: a shard whose keys fail
    a check never reaches the lake, and its outputs are materialized together or not at all."""
    shard = context.partition_key
    with _failure_names_its_cause(shard):
        yield from _ingest(context, shard, library, object_store, sources, duckdb)


def _ingest(
    context: dg.AssetExecutionContext,
    shard: str,
    library: LibraryResource,
    object_store: ObjectStoreResource,
    sources: SourceReaderResource,
    duckdb: DuckDBResource,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    batch = batch_of(shard)
    tag_run(context, [batch])
    layout = library.layout()
    keys_path = layout.keys_path(shard)
    for orphan in layout.remove_orphan_shard_files(shard):
        context.log.info(f"removed {orphan}, left by a run of {shard} that was killed")
    plan = read_plan(layout, batch)
    shard_plan = next((s for s in plan.shards if s.key == shard), None)
    if shard_plan is None:
        raise dg.Failure(f"shard {shard} is not in the plan of batch {batch}")
    store = object_store.open_for(layout, record=True)
    damaged = DamageRecord(layout.damaged_objects_dir)  # objects a reader found damaged

    progress_path = layout.progress_path(shard)  # read by whoever started the run
    log_every, logged = max(1000, shard_plan.images // 20), [0]

    def log_progress(stats: ShardStats) -> None:
        write_progress(progress_path, stats.images, shard_plan.images, stats.images_per_second)
        if stats.images // log_every > logged[0]:
            logged[0] = stats.images // log_every
            context.log.info(
                f"{shard}: {stats.images:,}/{shard_plan.images:,} images, "
                f"{stats.images_per_second:.1f} img/s"
            )

    with FingerprintPool(library.workers) as pool:
        stats = ingest_shard(
            read_shard_items(shard_file(layout, batch, shard_plan)),
            keys_path=keys_path,
            store=store,
            read=sources.reader(plan.roots),
            pool=pool,
            batch=batch,
            shard=shard,
            n_buckets=layout.n_buckets,
            io_threads=library.io_threads,
            progress=log_progress,
            progress_every=min(100, max(1, shard_plan.images // 100)),
            damaged=damaged,
        )

    key_checks = [
        hash_coverage(keys_path, duckdb, shard=shard),
        uploads_present(
            keys_path,
            store,
            duckdb,
            shard=shard,
            content_sample=object_store.verify_sample,
            suspects=damaged.md5s(),
        ),
    ]
    yield from _failing(key_checks, shard, "its keys fail a check; no lake row written")
    layout.publish(keys_path)  # the shard's fingerprints, durable beside its plan

    lake = library.lake()
    # One commit per table: Ctrl-C waits for the last commit rather than leaving a part.
    with stop_signals_deferred():
        written = write_shard(lake, shard, keys_path)
    table_checks = [
        attribute_keys_in_occurrences(
            lake, shard, written["occurrences"]["version"], written["attributes"]["version"], duckdb
        )
    ]
    yield from _failing(table_checks, shard, "its lake rows fail a check")

    yield dg.MaterializeResult(
        asset_key="shard_keys",
        metadata={
            "images": stats.images,
            "ok": stats.ok,
            "rejected": stats.rejected,
            "rejects_by_reason": dict(stats.rejects_by_reason),
            "images_per_second": round(stats.images_per_second, 1),
            "seconds": round(stats.seconds, 2),
            "bytes_read": stats.bytes_read,
            "preview": dg.MetadataValue.md(_keys_preview(keys_path, duckdb)),
            "path": dg.MetadataValue.path(str(keys_path)),
        },
    )
    yield dg.MaterializeResult(
        asset_key="shard_uploads",
        metadata={
            "uploaded": stats.uploaded,
            "already_stored": stats.already_stored,
            "repaired": stats.repaired,
            "bytes_uploaded": stats.bytes_uploaded,
            "store": store.describe(),
        },
    )
    for table, done in written.items():
        yield dg.MaterializeResult(
            asset_key=table,
            metadata={
                "rows": done["rows"],
                "delta_version": done["version"],
                "seconds": done["seconds"],
                "dagster/row_count": done["rows"],
                "table": dg.MetadataValue.text(lake.uri(table)),
            },
        )
    yield from key_checks
    yield from table_checks


def _failing(
    checks: list[dg.AssetCheckResult], shard: str, message: str
) -> Iterator[dg.AssetCheckResult]:
    """If a check failed, record every result (the UI shows them) and fail the run here,
    before anything further is written or materialized."""
    failed = [c for c in checks if not c.passed]
    if not failed:
        return
    yield from checks
    named = f"shard {shard}: "
    causes = "; ".join(
        f"{c.check_name}: {(c.description or '').removeprefix(named)}" for c in failed
    )
    raise dg.Failure(f"{named}{message}: {causes}", metadata={"shard": shard})


@contextmanager
def _failure_names_its_cause(shard: str) -> Iterator[None]:
    """Make an error of the shard's step a ``dg.Failure`` whose first line is the cause (the
    error's own message, headed by the shard): Dagster would otherwise head the run's failure with
    "Error occurred while executing op", the cause one level down. The error stays chained."""
    try:
        yield
    except (dg.Failure, dg.DagsterError):
        raise
    except Exception as error:
        cause = str(error).strip() or type(error).__name__
        named = cause if cause.startswith(f"shard {shard}") else f"shard {shard}: {cause}"
        raise dg.Failure(named, metadata={"shard": shard, "error": type(error).__name__}) from error


def _keys_preview(path: object, duckdb: DuckDBResource, rows: int = 8) -> str:
    with duckdb.get_connection() as connection:
        result = connection.execute(
            "SELECT md5, status, reason, format, width, height, phash, source_uri "
            "FROM read_parquet($path) ORDER BY ordinal LIMIT $rows",
            {"path": str(path), "rows": rows},
        )
        return markdown_table([d[0] for d in result.description], result.fetchall())


def markdown_table(header: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


#: The store each store-backed asset of the shard lives in: its kind follows the configuration.
_SHARD_STORES = {
    "shard_uploads": "objects",
    "occurrences": "lake",
    "rejects": "lake",
    "attributes": "lake",
}


@dg.definitions
def ingestion() -> dg.Definitions:
    """The ingestion assets, each store-backed one of the kind of the store it is in."""
    return dg.Definitions(assets=[batch_plan, with_store_kinds(shard, _SHARD_STORES)])
