"""Maintenance: compaction and vacuum, and what the tables' files weigh.

A shard's commit adds files to every bucket it touches; :func:`compact` rewrites a crowded
bucket as one file, sorted as its writer sorts it (its commit marked :data:`REWRITE_MARK`, so the
merge and the similarity index skip it as a change), then vacuums files replaced long enough ago.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, write_deltalake

from asset_library.lake.schemas import INDEX_ORDER, PARTITIONS, SCHEMAS, SORTED_BY_MD5
from asset_library.lake.table import Lake, is_outdated_index, writer_options

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
    min_files: int = 8,
) -> dict[str, dict[str, Any]]:
    """Compact every bucket with ``min_files`` or more files (default 8: amortised, so a
    shard does not rewrite the whole library) into one, then vacuum files
    replaced more than ``retention_hours`` ago. One commit per table for the rewrite (an
    optimize, or for the tables read by key or value a rewrite of those buckets sorted as
    their writers sort them), and two for a vacuum that removes files (its start and end)."""
    done: dict[str, dict[str, Any]] = {}
    for name in tables:
        table = lake.open(name)
        if table is None or is_outdated_index(name, table):  # rebuilt by the next write
            continue
        files = table.get_add_actions(flatten=True)
        column = PARTITIONS[name]
        buckets: dict[str, int] = {}
        for value in pa.table(files)[f"partition.{column}"].to_pylist():
            key = "__null__" if value is None else str(value)
            buckets[key] = buckets.get(key, 0) + 1
        crowded = sorted(b for b, n in buckets.items() if n >= min_files and b != "__null__")
        metrics: dict[str, Any] = {"files_before": sum(buckets.values()), "buckets": len(crowded)}
        if crowded:
            if name in _REWRITTEN:  # merged and sorted again, so its files stay pruned
                result = _sort_buckets(table, [int(b) for b in crowded], name)
            else:
                result = table.optimize.compact(
                    partition_filters=[(column, "in", crowded)], target_size=512 << 20
                )
            metrics.update(
                files_added=result.get("numFilesAdded"), files_removed=result.get("numFilesRemoved")
            )
        vacuumed = table.vacuum(
            retention_hours=retention_hours,
            dry_run=False,
            enforce_retention_duration=retention_hours >= VACUUM_RETENTION_HOURS,
        )
        table.update_incremental()
        metrics["vacuumed_files"] = len(vacuumed)
        metrics["files_after"] = len(table.file_uris())
        done[name] = metrics
    return done


#: How compaction rewrites a crowded bucket of these tables (others: ``optimize.compact``).
_REWRITTEN = {
    **{name: f"SELECT * FROM rows ORDER BY {order}" for name, order in SORTED_BY_MD5.items()},
    "attribute_index": f"SELECT * FROM rows ORDER BY {INDEX_ORDER}",
    "image_counts": "SELECT md5, sum(occurrences)::BIGINT AS occurrences, bucket FROM rows "
    "GROUP BY bucket, md5 HAVING sum(occurrences) <> 0 ORDER BY bucket, md5",
}


def _sort_buckets(table: DeltaTable, buckets: list[int], name: str = "attributes") -> dict:
    """Rewrite a table's files of these buckets as one file per bucket, sorted as its writer
    sorts them (``image_counts`` summed per md5 too): one overwrite commit restricted to those
    buckets, made against the version read, so Delta's conflict check covers it.

    delta-rs's ``optimize.compact`` would keep each file's rows in file order (one sorted run
    per merged file, each matching a filter somewhere) and ``optimize.z_order`` spreads an
    attribute's rows over most row groups' min/max ranges; a plain sort keeps one value in one
    or two row groups of the file."""
    listed = ", ".join(str(b) for b in buckets)
    column = PARTITIONS[name]
    dataset = table.to_pyarrow_dataset()

    def sorted_rows(connection: duckdb.DuckDBPyConnection) -> Iterator[pa.RecordBatch]:
        for bucket in buckets:  # one at a time: memory for one bucket's rows, not all
            rows = dataset.scanner(filter=pc.field(column) == bucket).to_reader()
            connection.register("rows", rows)
            yield from connection.sql(_REWRITTEN[name]).to_arrow_reader(200_000).cast(SCHEMAS[name])

    with duckdb.connect() as connection:
        write_deltalake(
            table,
            pa.RecordBatchReader.from_batches(SCHEMAS[name], sorted_rows(connection)),
            mode="overwrite",
            predicate=f"{column} IN ({listed})",
            partition_by=[column],
            target_file_size=512 << 20,
            **writer_options(name),
            commit_properties=CommitProperties(custom_metadata=REWRITE_MARK),
        )
    table.update_incremental()
    metrics = table.history(1)[0].get("operationMetrics", {})
    return {
        "numFilesAdded": metrics.get("num_added_files"),
        "numFilesRemoved": metrics.get("num_removed_files"),
    }


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
