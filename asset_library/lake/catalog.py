"""The catalog: an in-process DuckDB connection over the lake's Delta tables.

Each table is read through its Delta log (``DeltaTable.to_pyarrow_dataset()``, registered into
DuckDB), never through a glob of files, so a shard replaced and not yet vacuumed is never read
twice. No file holds the catalog and no path is stored: a library folder copied or moved answers
from its own data. DuckDB itself opens no file (pyarrow reads the data files), so the connection
runs with ``enable_external_access = false`` and its configuration locked.

Views: ``occurrences`` (every accepted source), ``images`` (one row per md5, its count as first
merged plus ``image_counts``), ``rejects``,
``attribute_occurrences`` (the cube as written), ``attributes`` (one row per
md5/origin/attribute/value: a manifest value never merges into a derived one of the same name)
and ``near_duplicates`` (groups the similarity index found). Table macros (parameterised views;
arguments are bound values, never SQL text) are listed in :data:`MACROS`. DuckDB hands its
filters to pyarrow (:class:`LakeDataset`): one on ``bucket`` opens only that bucket's files, and
one on any column skips the row groups whose statistics rule it out.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import duckdb
import pyarrow as pa
import pyarrow.dataset as pds
from deltalake import DeltaTable

from asset_library.lake.scan import LakeDataset, lake_dataset, read_keys
from asset_library.lake.schemas import INDEX_SQL, PARTITIONS, SCHEMAS, attribute_part_sql
from asset_library.lake.sql_guard import check_read_only_query, lock_down
from asset_library.lake.table import Lake, is_outdated_index

#: Rows of the near-duplicate groups: the group (numbered from the largest), its size, members.
NEAR_DUPLICATES_SCHEMA = pa.schema(
    [("group_id", pa.int32()), ("group_size", pa.int32()), ("md5", pa.string())]
)

_HASH_INTS = ", ".join(f"('0x' || {k})::UBIGINT AS {k}_int" for k in ("phash", "ahash", "dhash"))

#: The columns of the ``images`` view, in order.
IMAGE_VIEW_COLUMNS = [
    *("md5", "size_bytes", "format", "width", "height", "orientation", "frames"),
    *("phash", "ahash", "dhash", "phash_int", "ahash_int", "dhash_int", "quality", "bucket"),
    *("source_uri", "batch", "shard", "ingested_at", "occurrences"),
]


#: The columns of ``images_with_attribute``: those of ``images`` but the hashes (the attribute
#: index does not hold them) and ``occurrences`` (it would need the image's every occurrence).
ATTRIBUTE_IMAGE_COLUMNS = [
    *(c for c in IMAGE_VIEW_COLUMNS if "hash" not in c and c != "occurrences"),
    "occurrences_with_value",
]
#: Of those: the image's own, and its first source's (``_FIRST`` orders the sources).
_SOURCE = ["source_uri", "batch", "shard", "ingested_at"]
_IMAGE_OWN = [c for c in ATTRIBUTE_IMAGE_COLUMNS[:-1] if c not in _SOURCE]
_FIRST = ["ingested_at", "shard", "ordinal", "source_uri", "batch"]


def _columns(table: str) -> str:
    """A table's columns in its schema's order (the scan puts the partition column first)."""
    return ", ".join(SCHEMAS[table].names)


VIEWS: dict[str, str] = {
    "occurrences": f"SELECT {_columns('occurrences')}, {_HASH_INTS} FROM _lake_occurrences",
    # The count as merged first plus what image_counts added since; a query that does not
    # read it skips the join (DuckDB drops a left join to a table grouped by its join keys).
    "images": f"""SELECT i.md5, size_bytes, format, width, height, orientation, frames,
                  phash, ahash, dhash, {_HASH_INTS}, quality, i.bucket, source_uri, batch, shard,
                  ingested_at, (i.occurrences + coalesce(c.occurrences, 0))::BIGINT
                  AS occurrences
                  FROM _lake_images i LEFT JOIN (
                    SELECT bucket, md5, sum(occurrences) AS occurrences
                    FROM _lake_image_counts GROUP BY bucket, md5) c
                  ON c.bucket = i.bucket AND c.md5 = i.md5""",  # = IMAGE_VIEW_COLUMNS
    "rejects": f"SELECT {_columns('rejects')} FROM _lake_rejects",
    "attribute_occurrences": f"SELECT {_columns('attributes')} FROM _lake_attributes",
    "attributes": """SELECT md5, attribute, value, any_value(value_type) AS value_type,
                     origin, any_value(bucket) AS bucket
                     FROM _lake_attributes GROUP BY md5, origin, attribute, value""",
    "near_duplicates": "SELECT * FROM _near_duplicates",
}

#: The attribute index rows of one value: one partition's files, the value's row groups.
_INDEXED_VALUE = (
    f"_lake_attribute_index WHERE part = {attribute_part_sql('attr')} AND attribute = attr "
    "AND value = CAST(val AS VARCHAR)"
)

#: name -> (signature, body) of each table macro; with :data:`MACRO_HELP`, the reference that
#: ``sql --help``, the API's ``/docs`` and the documentation site print.
MACROS: dict[str, tuple[str, str]] = {
    "image": (
        "key",
        "SELECT * FROM images WHERE bucket = {bucket_expr} AND md5 = lower(key)",
    ),
    # The index alone (it covers the image but its hashes): a value's rows, never a join on the md5
    # of every image. One row per image, grouped by md5 (a count costs what md5s_with_attribute
    # does; a window per md5 took twice as long): the image's own columns (the same in every
    # occurrence: they come from its bytes), the source of the first occurrence that carried
    # the value (by ingested_at, shard, ordinal) and how many occurrences carried it.
    "images_with_attribute": (
        "attr, val",
        f"""SELECT {", ".join(_IMAGE_OWN)}, {", ".join(f"first.{c}" for c in _SOURCE)},
                   occurrences_with_value
            FROM (SELECT md5, {", ".join(f"any_value({c}) AS {c}" for c in _IMAGE_OWN[1:])},
                         min(struct_pack({", ".join(_FIRST)})) AS first,
                         count(*) AS occurrences_with_value
                  FROM {_INDEXED_VALUE} GROUP BY md5)""",
    ),
    "md5s_with_attribute": ("attr, val", f"SELECT DISTINCT md5, bucket FROM {_INDEXED_VALUE}"),
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


#: name -> what each table macro of :data:`MACROS` answers, one line.
MACRO_HELP: dict[str, str] = {
    "image": "the image of that md5 (one bucket read)",
    "images_with_attribute": "images having that attribute value, one row each, from the "
    "attribute index alone: the image's columns but the hashes and occurrences; the source of "
    "the first occurrence that carried the value, and occurrences_with_value (an image's first "
    "source and total count: join images on md5)",
    "md5s_with_attribute": "the md5 and bucket of those images: the cheapest way to count "
    "them or page through them",
    "attributes_of": "the attributes of that md5: attribute, value, value_type, origin",
    "images_in_shard": "the images of one shard (its key)",
    "images_in_batch": "the images of one batch (its id)",
    "images_at_least": "images at least that many pixels wide and high",
    "images_near": "images within max_distance bits of a pHash (16 hex digits), with distance",
}


def macro_signature(name: str) -> str:
    """``name(arg, ...)`` with the argument names the macro really takes."""
    return f"{name}({MACROS[name][0]})"


#: The attribute index of a lake written before it had one (or one without the image's
#: columns): the cube itself with its occurrences, read by attribute.
_CUBE_BY_ATTRIBUTE = INDEX_SQL.format(cube="_lake_attributes", occurrences="_lake_occurrences")


def _readers_of(name: str) -> set[str]:
    """The views and macros that read ``name``, directly or through one another."""
    bodies = {**VIEWS, **{macro: body for macro, (_, body) in MACROS.items()}}
    found = {name}
    while grown := {
        reader
        for reader, body in bodies.items()
        if reader not in found and any(re.search(rf"\b{re.escape(n)}\b", body) for n in found)
    }:
        found |= grown
    return found


#: A query that names one of these may read the near-duplicate groups: only it reads (or
#: computes again) the groups file, so that a lookup or a count never pays for it.
_GROUP_READERS = re.compile(
    r"\b(" + "|".join(map(re.escape, sorted(_readers_of("_near_duplicates")))) + r")\b",
    re.IGNORECASE,
)


class GroupsSource(Protocol):
    """Where the ``near_duplicates`` view's rows come from
    (:class:`asset_library.near_duplicates.NearDuplicates`)."""

    def stamp(self) -> Hashable:
        """Changes whenever :meth:`table` would answer otherwise."""

    def table(self) -> pa.Table:
        """Rows of :data:`NEAR_DUPLICATES_SCHEMA`."""


class LakeReadError(ValueError):
    """A data file of the lake could not be read (missing or damaged)."""


class Catalog:
    """One DuckDB connection over the lake; :meth:`refresh` follows new commits."""

    def __init__(self, lake: Lake, near_duplicates: GroupsSource | None = None) -> None:
        self.lake = lake
        self.near_duplicates = near_duplicates
        self.connection = duckdb.connect(config={"threads": 2})
        self._tables: dict[str, DeltaTable | None] = {}
        self._versions: dict[str, int | None] = {}
        self._datasets: dict[str, LakeDataset] = {}
        self._by_bucket: dict[str, dict[int | None, list[pds.Fragment]]] = {}
        # The groups are read (or computed again) by the first query that may use them, never
        # for a key's rows: a lookup must not pay for them, nor fail with them.
        self._groups_stamp: Hashable = object()  # equal to no stamp: the first query reads
        self.connection.register("_near_duplicates", NEAR_DUPLICATES_SCHEMA.empty_table())
        self.refresh()
        bits = lake.n_buckets.bit_length() - 1
        bucket_expr = (
            f"(('0x' || lower(key)[1:8])::UBIGINT >> {32 - bits})::INTEGER" if bits else "0"
        )
        for name, body in VIEWS.items():
            self.connection.execute(f"CREATE VIEW {name} AS {body}")
        for name, (params, body) in MACROS.items():
            self.connection.execute(
                f"CREATE MACRO {name}({params}) AS TABLE {body.format(bucket_expr=bucket_expr)}"
            )
        # DuckDB reads nothing itself: pyarrow opens the data files. Lock that in.
        lock_down(self.connection)

    def refresh(self, tables: Iterable[str] = tuple(SCHEMAS)) -> None:
        """Re-register each of these tables (default: all) whose Delta version moved since the
        last call. Each costs a look at its log: a lookup asks only for those it reads."""
        for name in tables:
            table = self._tables.get(name)
            if table is None:
                table = self.lake.open(name)
                self._tables[name] = table
            else:
                table.update_incremental()
            version = None if table is None else table.version()
            if name in self._versions and self._versions[name] == version:
                continue
            if name == "attribute_index" and (  # a lake from before it, or from before it
                table is None or is_outdated_index(name, table)  # covered the image
            ):
                self.connection.execute(
                    f"CREATE OR REPLACE TEMP VIEW _lake_{name} AS {_CUBE_BY_ATTRIBUTE}"
                )
            elif table is None:
                self.connection.register(f"_lake_{name}", SCHEMAS[name].empty_table())
            else:
                dataset = lake_dataset(table, self.lake)
                self._datasets[name] = dataset
                self._by_bucket.pop(name, None)
                self.connection.register(f"_lake_{name}", dataset)
            self._versions[name] = version

    def _refresh_groups(self) -> None:
        source = self.near_duplicates
        stamp = None if source is None else source.stamp()
        if stamp == self._groups_stamp:
            return
        groups = NEAR_DUPLICATES_SCHEMA.empty_table() if source is None else source.table()
        self.connection.register("_near_duplicates", groups)
        self._groups_stamp = stamp

    def rows_of(self, table: str, bucket: int, md5: str) -> pa.Table:
        """A key's rows of one table, reading only that bucket's files (pyarrow, no SQL)."""
        return self.rows_in(table, [int(bucket)], [md5])

    def rows_in(self, table: str, buckets: list[int], md5s: list[str]) -> pa.Table:
        """These keys' rows of one table (their ``buckets`` given), reading only those buckets'
        files and, by their statistics, the row groups that may hold the keys."""
        dataset = self._datasets.get(table)
        if dataset is None or not md5s:
            return SCHEMAS[table].empty_table()
        by_bucket = self._by_bucket.get(table)
        if by_bucket is None:
            by_bucket = {}
            for fragment in dataset.get_fragments():
                by_bucket.setdefault(_bucket_of(fragment), []).append(fragment)
            self._by_bucket[table] = by_bucket
        buckets = sorted({int(b) for b in buckets})
        fragments = [f for b in buckets for f in by_bucket.get(b, [])] + by_bucket.get(None, [])
        try:
            return read_keys(fragments, list(md5s), SCHEMAS[table], PARTITIONS[table])
        except (pa.ArrowException, OSError, ValueError) as error:
            named = ", ".join(str(b) for b in buckets)
            raise LakeReadError(f"cannot read bucket {named} of {table}: {error}") from error

    def table(self, name: str) -> DeltaTable | None:
        """The Delta table as of the last :meth:`refresh` (``None`` if it does not exist)."""
        return self._tables.get(name)

    def version(self, table: str) -> int | None:
        return self._versions.get(table)

    def execute(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> duckdb.DuckDBPyConnection:
        """One read-only query, parameters bound as values."""
        check_read_only_query(sql)
        if _GROUP_READERS.search(sql):
            self._refresh_groups()
        return self.connection.execute(sql, params or [])

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        # A Library keeps its catalog open across calls; closing is the owner's job.
        pass


def _bucket_of(fragment: pds.Fragment) -> int | None:
    """The bucket a fragment's partition expression names (None if it names none)."""
    found = pds.get_partition_keys(fragment.partition_expression).get("bucket")
    return None if found is None else int(found)
