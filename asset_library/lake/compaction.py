"""Maintenance: compaction and vacuum, and what the tables' files weigh.

A shard's commit adds files to every bucket it touches; :func:`compact` merges them by size
tiers (:mod:`.tiers`): the small files of a bucket once they are ``fan_in``, a tier's files
once it holds ``fan_in``, never the large files of a tier that is not full. So a shard's
compaction costs about its own bytes once per tier, not the library. A merged file is sorted as
its writer sorts it; its commit, marked :data:`REWRITE_MARK`, removes exactly the files it
merged, so the merge and the similarity index skip it as a change. Then files replaced long
enough ago are vacuumed, and files no commit lists (a killed merge's) as old.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction, RemoveAction

from asset_library.lake.schemas import INDEX_ORDER, PARTITIONS, SCHEMAS, SORTED_BY_MD5
from asset_library.lake.table import Lake, is_outdated_index, parquet_options, parquet_row_group
from asset_library.lake.tiers import (
    FAN_IN,
    TIER_ROWS,
    DataFile,
    check_policy,
    files_to_merge,
    tier_of,
    within_budget,
)

#: Default vacuum retention: files replaced longer ago than this are deleted by compaction.
#: Delta's own default (7 days): a reader or a time-travel query older than this may fail.
VACUUM_RETENTION_HOURS = 168
#: The custom metadata that marks a commit rewriting rows as they were (compaction's sort).
REWRITE_MARK = {"asset_library.operation": "sort buckets"}


def compact(
    lake: Lake,
    *,
    retention_hours: int = VACUUM_RETENTION_HOURS,
    tables: Iterable[str] = tuple(SCHEMAS),
    fan_in: int = FAN_IN,
    tier_rows: int = TIER_ROWS,
    max_bytes: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Merge each bucket's files by size tiers (:func:`.tiers.files_to_merge`: ``fan_in``
    files of a tier into one, tier 0 under ``tier_rows`` rows; with ``max_bytes``, up to that
    many bytes read per table, the rest left to the next run: :func:`.tiers.within_budget`),
    then vacuum files replaced more
    than ``retention_hours`` ago (and, at the default retention or more, files no commit lists
    written as long ago). One commit per table for the merges (each bucket's merged
    file sorted as its writer sorts it), and two for a vacuum that removes files (its start
    and end). Metrics per table: files before and after, buckets merged, files added and
    removed, bytes rewritten (read) and written, and live files per tier after."""
    check_policy(fan_in, tier_rows)
    done: dict[str, dict[str, Any]] = {}
    for name in tables:
        table = lake.open(name)
        if table is None or is_outdated_index(name, table):  # rebuilt by the next write
            continue
        buckets = _bucket_files(table, name)
        due: dict[int, list[DataFile]] = {
            bucket: chosen
            for bucket, files in buckets.items()
            if bucket is not None and (chosen := files_to_merge(files, fan_in, tier_rows))
        }
        in_buckets = {b: files for b, files in buckets.items() if b is not None}
        plan = within_budget(due, in_buckets, max_bytes)
        metrics: dict[str, Any] = {
            "files_before": sum(len(files) for files in buckets.values()),
            "buckets": len(plan),
            "buckets_waiting": len(due) - len(plan),
            "files_added": 0,
            "files_removed": 0,
            "bytes_rewritten": 0,
            "bytes_written": 0,
        }
        if plan:
            metrics.update(_merge_buckets(table, name, plan))
        vacuumed = table.vacuum(
            retention_hours=retention_hours,
            dry_run=False,
            enforce_retention_duration=retention_hours >= VACUUM_RETENTION_HOURS,
            # files no commit lists (a crashed merge's or shard's) too, not only removed ones;
            # a shorter retention could take a writer's files before its commit: not then
            full=retention_hours >= VACUUM_RETENTION_HOURS,
        )
        table.update_incremental()
        metrics["vacuumed_files"] = len(vacuumed)
        after = _bucket_files(table, name)
        metrics["files_after"] = sum(len(files) for files in after.values())
        tiers = Counter(
            tier_of(found.rows, fan_in, tier_rows) for files in after.values() for found in files
        )
        metrics["files_per_tier"] = {str(tier): tiers[tier] for tier in sorted(tiers)}
        metrics["max_files_in_a_bucket"] = max(
            (len(files) for bucket, files in after.items() if bucket is not None), default=0
        )
        done[name] = metrics
    return done


def _bucket_files(table: DeltaTable, name: str) -> dict[int | None, list[DataFile]]:
    """The live files of each bucket (partition), from the log; ``None``: files of no bucket
    (rejects without an md5), which compaction leaves as they are."""
    actions = pa.table(table.get_add_actions(flatten=True))
    found: dict[int | None, list[DataFile]] = {}
    if not actions.num_rows:
        return found
    listed = ("path", "num_records", "size_bytes", f"partition.{PARTITIONS[name]}")
    for path, rows, size, bucket in zip(*(actions[c].to_pylist() for c in listed), strict=True):
        key = None if bucket is None else int(bucket)
        found.setdefault(key, []).append(DataFile(path, int(rows or 0), int(size)))
    return found


#: How compaction merges a bucket's files of each table: sorted as its writer sorts them.
_REWRITTEN = {
    **{name: f"SELECT * FROM rows ORDER BY {order}" for name, order in SORTED_BY_MD5.items()},
    "attribute_index": f"SELECT * FROM rows ORDER BY {INDEX_ORDER}",
    "image_counts": "SELECT md5, sum(occurrences)::BIGINT AS occurrences, bucket FROM rows "
    "GROUP BY bucket, md5 HAVING sum(occurrences) <> 0 ORDER BY bucket, md5",
    "rejects": "SELECT * FROM rows",  # read whole, by shard: kept in the order they came
}


def _merge_buckets(table: DeltaTable, name: str, plan: dict[int, list[DataFile]]) -> dict:
    """Merge each bucket's chosen files into one new file, sorted as the table's writer sorts
    it (``image_counts`` summed per md5 too), and commit the new files and the removal of
    exactly the merged ones as one commit against the version read, so Delta's conflict
    check fails it if a writer removed one of them meanwhile (a shard replaced).

    delta-rs's ``optimize.compact`` would keep each file's rows in file order (one sorted run
    per merged file, each matching a filter somewhere) and ``optimize.z_order`` spreads an
    attribute's rows over most row groups' min/max ranges; a plain sort keeps one value in one
    or two row groups of the file. Files merged in one commit are written by pyarrow (delta-rs
    cannot write files without committing them), with the row groups, compression and
    statistics of the table's writer."""
    column = PARTITIONS[name]
    dataset = table.to_pyarrow_dataset()
    fragments = {fragment.path: fragment for fragment in dataset.get_fragments()}
    schema = SCHEMAS[name]
    stored = pa.schema([field for field in schema if field.name != column])
    now = int(time.time() * 1000)
    actions: list[AddAction | RemoveAction] = []
    read = written = 0
    with duckdb.connect() as connection:
        for bucket, files in sorted(plan.items()):  # one at a time: one bucket's rows
            missing = [f.path for f in files if f.path not in fragments]
            if missing:
                raise ValueError(f"{table.table_uri}: file {missing[0]} of the log is not read")
            merged = pds.FileSystemDataset(
                [fragments[f.path] for f in files], dataset.schema, dataset.format,
                dataset.filesystem,
            )  # fmt: skip
            connection.register("rows", merged.scanner().to_reader())
            rows = connection.sql(_REWRITTEN[name]).to_arrow_reader(200_000).cast(schema)
            path = f"{column}={bucket}/part-00000-{uuid.uuid4()}-c000.parquet"
            stats = _write_file(rows, stored, dataset.filesystem, path, name)
            info = dataset.filesystem.get_file_info(path)
            values: dict[str, str | None] = {column: str(bucket)}
            actions.append(AddAction(path, int(info.size), values, now, False, stats))
            actions.extend(RemoveAction(f.path, False, now, f.size, values) for f in files)
            read += sum(f.size for f in files)
            written += int(info.size)
    try:
        table.create_write_transaction(
            actions,
            mode="append",
            schema=schema,
            partition_by=[column],
            commit_properties=CommitProperties(custom_metadata=REWRITE_MARK),
        )
    except CommitFailedError:
        # refused (a file it merged was removed meanwhile): its files are no one's, unless the
        # log lists them after all (a commit that landed but was answered as lost). Any other
        # failure, or a crash, leaves them to the full vacuum (:func:`compact`).
        table.update_incremental()
        live = set(pa.table(table.get_add_actions(flatten=True))["path"].to_pylist())
        for action in actions:
            if isinstance(action, AddAction) and action.path not in live:
                with contextlib.suppress(OSError):
                    dataset.filesystem.delete_file(action.path)
        raise
    table.update_incremental()
    return {
        "files_added": len(plan),
        "files_removed": sum(len(files) for files in plan.values()),
        "bytes_rewritten": read,
        "bytes_written": written,
    }


def _write_file(
    rows: pa.RecordBatchReader, stored: pa.Schema, filesystem: Any, path: str, name: str
) -> str:
    """Write ``rows`` (less the partition column) as one Parquet file at ``path`` of the
    table's store; its Delta statistics (JSON) as delta-rs would record them."""
    stats = _Stats(stored)
    with pq.ParquetWriter(path, stored, filesystem=filesystem, **parquet_options(name)) as out:
        for batch in _batches(rows, stored):
            stats.add(batch)
            out.write_batch(batch, row_group_size=parquet_row_group(name))
    return stats.json()


def _batches(rows: pa.RecordBatchReader, stored: pa.Schema) -> Iterator[pa.RecordBatch]:
    for batch in rows:
        if batch.num_rows:
            yield pa.RecordBatch.from_arrays(
                [batch.column(field.name) for field in stored], schema=stored
            )


class _Stats:
    """A file's Delta statistics: rows, and per column its least and greatest value and its
    nulls. Timestamps to the millisecond as Delta records them (the greatest rounded up, so it
    bounds the column still); columns of other types get no bounds (never pruned, never wrong)."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.rows = 0
        self.nulls = {field.name: 0 for field in schema}
        self.least: dict[str, Any] = {}
        self.greatest: dict[str, Any] = {}

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        for field in self.schema:
            values = batch.column(field.name)
            self.nulls[field.name] += values.null_count
            if not _bounded(field.type) or values.null_count == len(values):
                continue
            found = pc.min_max(values).as_py()
            low, high = found["min"], found["max"]
            if field.name not in self.least or low < self.least[field.name]:
                self.least[field.name] = low
            if field.name not in self.greatest or high > self.greatest[field.name]:
                self.greatest[field.name] = high

    def json(self) -> str:
        return json.dumps(
            {
                "numRecords": self.rows,
                "minValues": {k: _stat(v, up=False) for k, v in self.least.items()},
                "maxValues": {k: _stat(v, up=True) for k, v in self.greatest.items()},
                "nullCount": self.nulls,
            }
        )


def _bounded(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_integer(kind) or pa.types.is_timestamp(kind)


def _stat(value: Any, *, up: bool) -> Any:
    if not isinstance(value, datetime):
        return value
    moment = value if value.tzinfo else value.replace(tzinfo=UTC)
    micros = (moment - _EPOCH) // timedelta(microseconds=1)
    millis = -(-micros // 1000) if up else micros // 1000
    moment = _EPOCH + timedelta(milliseconds=millis)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def lake_files(lake: Lake) -> dict[str, dict[str, int]]:
    """Live data files and bytes per table (from the log: no listing)."""
    found: dict[str, dict[str, int]] = {}
    for name in SCHEMAS:
        table = lake.open(name)
        if table is None:
            continue
        actions = pa.table(table.get_add_actions(flatten=True))
        found[name] = {
            "files": actions.num_rows,
            "bytes": int(pc.sum(actions["size_bytes"]).as_py() or 0),
            "rows": int(pc.sum(actions["num_records"]).as_py() or 0),
        }
    return found
