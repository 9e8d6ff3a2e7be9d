"""The library on disk: Parquet tables laid out by bucket and shard, and where everything lives.

Every row is hash-clustered by its md5 into one of ``n_buckets`` (a power of two) buckets, so a
key lookup, a dedup or a join touches one bucket. A table's files are
``lake/<table>/bucket=<b>/<shard>.parquet``: each shard owns its files, and a shard re-run
replaces exactly its own files, each with an atomic rename, so a reader never sees a half-written
file and never sees a row twice.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb

DEFAULT_BUCKETS = 256


def bucket_of(md5: str, n_buckets: int = DEFAULT_BUCKETS) -> int:
    """The bucket of a key: the top bits of its md5."""
    bits = n_buckets.bit_length() - 1
    return int(md5[:8], 16) >> (32 - bits) if bits else 0


def check_buckets(n_buckets: int) -> int:
    if n_buckets < 1 or n_buckets & (n_buckets - 1) or n_buckets > 65536:
        raise ValueError(f"n_buckets must be a power of two from 1 to 65536, not {n_buckets}")
    return n_buckets


@dataclass(frozen=True)
class LibraryLayout:
    """Paths of one library root; the library's bucket count is fixed when it is created."""

    root: Path

    @classmethod
    def open(cls, root: str | Path, n_buckets: int = DEFAULT_BUCKETS) -> LibraryLayout:
        layout = cls(Path(root).expanduser().resolve())
        layout.root.mkdir(parents=True, exist_ok=True)
        settings = layout.root / "library.json"
        if not settings.exists():
            tmp = settings.with_name(f".library.json.{uuid.uuid4().hex}")
            tmp.write_text(json.dumps({"n_buckets": check_buckets(n_buckets)}))
            tmp.replace(settings)
        return layout

    @property
    def n_buckets(self) -> int:
        return int(json.loads((self.root / "library.json").read_text())["n_buckets"])

    @property
    def objects_dir(self) -> Path:
        return self.root / "objects"

    @property
    def landing_dir(self) -> Path:
        return self.root / "landing"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def triggers_dir(self) -> Path:
        return self.root / "triggers"

    def plan_dir(self, batch: str) -> Path:
        return self.root / "plans" / batch

    def keys_path(self, shard: str) -> Path:
        """The shard's fingerprint rows: the output of its one pass over the bytes."""
        return self.root / "shards" / f"{shard}.parquet"

    def table_dir(self, table: str) -> Path:
        return self.root / "lake" / table

    def rejects_path(self, shard: str) -> Path:
        return self.table_dir("rejects") / f"{shard}.parquet"

    def table_glob(self, table: str) -> str:
        if table == "rejects":
            return str(self.table_dir("rejects") / "*.parquet")
        return str(self.table_dir(table) / "bucket=*" / "*.parquet")


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        connection.execute(f"COPY ({query}) TO '{_sql_path(tmp)}' (FORMAT parquet)")
        rows = _row_count(tmp, connection)
        tmp.replace(path)
        return rows
    finally:
        tmp.unlink(missing_ok=True)


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
