"""The catalog: a small DuckDB file of views and table macros over the Parquet lake.

The lake is the truth; the catalog holds no rows, only names for reading it, so rebuilding it is
cheap and shards landing later are seen by its views at once (they read file globs). It is built
in a private file and renamed into place, so a reader never waits on a writer's lock and
concurrent shard runs never write it.

Views: ``occurrences`` (every accepted source), ``images`` (one row per md5), ``rejects``,
``attributes`` (the cube, one row per md5/attribute/value), ``attribute_occurrences`` and
``near_duplicates`` (groups of near-duplicate images).
Table macros (parameterised views; arguments are bound values, never SQL text) are listed in
:data:`MACROS`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from asset_library.ingest.shard import KEYS_SCHEMA
from asset_library.lake import write_single
from asset_library.layout import LibraryLayout
from asset_library.tables import BASE_COLUMNS_SQL, CUBE_SCHEMA

_EMPTY = "_empty.parquet"

#: Rows of the near-duplicate groups: the group (numbered from the largest), its size, members.
NEAR_DUPLICATES_SCHEMA = pa.schema(
    [("group_id", pa.int32()), ("group_size", pa.int32()), ("md5", pa.string())]
)

#: name -> (signature, body) of each table macro, also the README's reference.
MACROS: dict[str, tuple[str, str]] = {
    "image": (
        "key",
        "SELECT * EXCLUDE (ordinal), count(*) OVER () AS occurrences FROM occurrences "
        "WHERE bucket = {bucket_expr} AND md5 = lower(key) "
        "ORDER BY ingested_at, shard, ordinal LIMIT 1",
    ),
    "images_with_attribute": (
        "attr, val",
        "SELECT * FROM images WHERE md5 IN (SELECT md5 FROM attributes "
        "WHERE attribute = attr AND value = CAST(val AS VARCHAR))",
    ),
    "attributes_of": (
        "key",
        "SELECT DISTINCT attribute, value, value_type, origin FROM attribute_occurrences "
        "WHERE bucket = {bucket_expr} AND md5 = lower(key) ORDER BY attribute, value",
    ),
    "images_in_shard": (
        "shard_key",
        "SELECT * FROM images WHERE md5 IN (SELECT md5 FROM occurrences WHERE shard = shard_key)",
    ),
    "images_in_batch": (
        "batch_id",
        "SELECT * FROM images WHERE md5 IN (SELECT md5 FROM occurrences WHERE batch = batch_id)",
    ),
    "images_at_least": (
        "min_width, min_height",
        "SELECT * FROM images WHERE width >= min_width AND height >= min_height",
    ),
    "images_near": (
        "hash_hex, max_distance",
        "SELECT *, bit_count(xor(phash_int, ('0x' || hash_hex)::UBIGINT)) AS distance "
        "FROM images WHERE bit_count(xor(phash_int, ('0x' || hash_hex)::UBIGINT)) "
        "<= max_distance ORDER BY distance, md5",
    ),
}


def build_catalog(layout: LibraryLayout) -> Path:
    """(Re)build the catalog file for a library and return its path."""
    _ensure_empty_files(layout)
    target = layout.catalog_path
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with duckdb.connect(str(tmp)) as connection:
            for statement in catalog_statements(layout):
                connection.execute(statement)
            connection.execute("CHECKPOINT")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)
    return target


def catalog_statements(layout: LibraryLayout) -> list[str]:
    """The SQL that defines the catalog; paths are the library's own, quoted as literals."""
    base = _lit(layout.table_glob("base"))
    cube = _lit(layout.table_glob("cube"))
    rejects = _lit(layout.table_glob("rejects"))
    groups = _lit(str(layout.table_dir("near_duplicates") / "*.parquet"))
    bits = layout.n_buckets.bit_length() - 1
    bucket_expr = f"(('0x' || lower(key)[1:8])::UBIGINT >> {32 - bits})::INTEGER" if bits else "0"
    statements = [
        f"""CREATE VIEW occurrences AS
            SELECT * FROM read_parquet('{base}', hive_partitioning = true, union_by_name = true)""",
        """CREATE VIEW images AS
            SELECT DISTINCT ON (md5)
                md5, size_bytes, format, width, height, orientation, frames,
                phash, ahash, dhash, phash_int, ahash_int, dhash_int, bucket,
                source_uri, batch, shard, ingested_at,
                count(*) OVER (PARTITION BY md5) AS occurrences
            FROM occurrences
            ORDER BY md5, ingested_at, shard, ordinal""",
        f"""CREATE VIEW rejects AS
            SELECT * FROM read_parquet('{rejects}', union_by_name = true)""",
        f"""CREATE VIEW attribute_occurrences AS
            SELECT * FROM read_parquet('{cube}', hive_partitioning = true, union_by_name = true)""",
        f"""CREATE VIEW near_duplicates AS
            SELECT * FROM read_parquet('{groups}', union_by_name = true)""",
        """CREATE VIEW attributes AS
            SELECT md5, attribute, value, any_value(value_type) AS value_type,
                   any_value(origin) AS origin, any_value(bucket) AS bucket
            FROM attribute_occurrences GROUP BY md5, attribute, value""",
    ]
    for name, (params, body) in MACROS.items():
        statements.append(
            f"CREATE MACRO {name}({params}) AS TABLE {body.format(bucket_expr=bucket_expr)}"
        )
    return statements


def _ensure_empty_files(layout: LibraryLayout) -> None:
    """One empty file per table, so every view has a schema before any shard has landed."""
    empty_base = layout.table_dir("base") / "bucket=0" / _EMPTY
    empty_cube = layout.table_dir("cube") / "bucket=0" / _EMPTY
    empty_rejects = layout.table_dir("rejects") / _EMPTY
    empty_groups = layout.table_dir("near_duplicates") / _EMPTY
    if not empty_groups.exists():
        empty_groups.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(NEAR_DUPLICATES_SCHEMA.empty_table(), empty_groups)
    if empty_base.exists() and empty_cube.exists() and empty_rejects.exists():
        return
    keys = layout.root / "lake" / f".empty-keys-{uuid.uuid4().hex[:8]}.parquet"
    keys.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(KEYS_SCHEMA.empty_table(), keys)
    try:
        with duckdb.connect() as connection:
            source = f"read_parquet('{_lit(str(keys))}')"
            write_single(
                empty_base,
                f"SELECT * EXCLUDE (bucket) FROM (SELECT {BASE_COLUMNS_SQL} FROM {source})",
                connection,
            )
            write_single(
                empty_rejects,
                "SELECT source_uri, md5, size_bytes, format, reason, message, batch, shard, "
                f"ordinal, ingested_at FROM {source}",
                connection,
            )
        cube_schema = pa.schema([f for f in CUBE_SCHEMA if f.name != "bucket"])
        empty_cube.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(cube_schema.empty_table(), empty_cube)
    finally:
        keys.unlink(missing_ok=True)


def connect(layout: LibraryLayout, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A connection to the catalog, building it first if the library has none yet."""
    if not layout.catalog_path.exists():
        build_catalog(layout)
    return duckdb.connect(str(layout.catalog_path), read_only=read_only)


def _lit(text: str) -> str:
    return text.replace("'", "''")
