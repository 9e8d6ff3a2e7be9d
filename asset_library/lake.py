"""The library on disk: Parquet tables laid out by bucket and shard, and where everything lives.

Every row is hash-clustered by its md5 into one of ``n_buckets`` (a power of two) buckets, so a
key lookup, a dedup or a join touches one bucket. A table's files are
``lake/<table>/bucket=<b>/<shard>.parquet``: each shard owns its files, and a shard re-run
replaces exactly its own files, each with an atomic rename, so a reader never sees a half-written
file and never sees a row twice.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import duckdb

from asset_library.layout import LibraryLayout, atomic_path


def write_bucketed(
    layout: LibraryLayout,
    table: str,
    shard: str,
    query: str,
    connection: duckdb.DuckDBPyConnection,
) -> dict[int, int]:
    """Write a shard's rows of ``table`` (a query with a ``bucket`` column) by bucket.

    Rows are sorted by md5 inside each file, so readers skip by Parquet zone maps. The new
    files are written to a private staging folder, then renamed over the shard's old files;
    files of this shard in buckets it no longer has are removed. Returns rows per bucket.
    """
    table_dir = layout.table_dir(table)
    staging = layout.root / "lake" / "_staging" / f"{table}-{shard}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        connection.execute(
            f"COPY ({query} ORDER BY bucket, md5) TO '{_sql_path(staging)}' "
            "(FORMAT parquet, PARTITION_BY (bucket), FILENAME_PATTERN 'part_{i}', "
            "ROW_GROUP_SIZE 100000)"
        )
        counts: dict[int, int] = {}
        for bucket_dir in staging.glob("bucket=*"):
            bucket = int(bucket_dir.name.split("=", 1)[1])
            parts = sorted(bucket_dir.glob("*.parquet"))
            target_dir = table_dir / bucket_dir.name
            target_dir.mkdir(parents=True, exist_ok=True)
            merged = _single_file(parts, connection)
            counts[bucket] = _row_count(merged, connection)
            merged.replace(target_dir / f"{shard}.parquet")
        for old in table_dir.glob(f"bucket=*/{shard}.parquet"):
            if int(old.parent.name.split("=", 1)[1]) not in counts:
                old.unlink(missing_ok=True)
        return counts
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_single(path: Path, query: str, connection: duckdb.DuckDBPyConnection) -> int:
    """Write a query's rows to one Parquet file, atomically replacing it."""
    with atomic_path(path) as tmp:
        connection.execute(f"COPY ({query}) TO '{_sql_path(tmp)}' (FORMAT parquet)")
        return _row_count(tmp, connection)


def _single_file(parts: list[Path], connection: duckdb.DuckDBPyConnection) -> Path:
    if len(parts) == 1:
        return parts[0]
    merged = parts[0].with_name("merged.parquet")
    files = ", ".join(f"'{_sql_path(p)}'" for p in parts)
    connection.execute(
        f"COPY (SELECT * FROM read_parquet([{files}]) ORDER BY md5) TO '{_sql_path(merged)}' "
        "(FORMAT parquet)"
    )
    return merged


def _row_count(path: Path, connection: duckdb.DuckDBPyConnection) -> int:
    result = connection.execute(
        f"SELECT count(*) FROM read_parquet('{_sql_path(path)}')"
    ).fetchone()
    return int(result[0]) if result else 0


def _sql_path(path: Path) -> str:
    """A path as a SQL string literal body (paths are ours, but quotes must still be escaped)."""
    return str(path).replace("'", "''")
