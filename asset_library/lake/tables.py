"""The lake: Delta Lake tables (delta-rs), partitioned by bucket, on a folder or on S3.

Tables (partitioned by ``bucket``, the top bits of the md5, see :func:`ids.bucket_of`; but one):

``occurrences``  one row per accepted source of an image (an md5 may occur in many shards)
``rejects``      one row per source that was not ingested, with its reason
``attributes``   the cube: (md5, attribute, value, value_type, origin) per occurrence
``images``       one row per md5: the image, its first occurrence and its occurrence count
                 when it was first merged (appended once, rewritten only when it loses one)
``image_counts`` the occurrence count changes since: ``images.occurrences`` + their sum is
                 the count
``attribute_index`` the cube by attribute (partitioned by ``part``, a hash of the attribute)

A shard's run replaces exactly that shard's rows of the first three and of the attribute index
with one commit per table (``overwrite`` with ``predicate = "shard = '<shard>'"``). Two shards
commit side by side; the same shard written twice at once fails with a commit conflict, never a
mix.

``images`` is never computed on a read: :func:`merge_images` folds in what changed in
``occurrences`` since its last merge (the change data feed, version by version), recording the
occurrences version it reached as a Delta app transaction (``transaction_version(IMAGES_APP)``).
A merge appends: new md5s to ``images``, count changes to ``image_counts``; it rewrites
``images`` files only for md5s that lost an occurrence.
The table format lives in this package and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from deltalake import (
    ColumnProperties,
    CommitProperties,
    DeltaTable,
    Transaction,
    WriterProperties,
    write_deltalake,
)
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from numpy._core.multiarray import _set_madvise_hugepage

from asset_library.ids import check_shard_key
from asset_library.lake.keyset import CachedKeys, ImageKeys, KeyCacheError, digests, md5_text
from asset_library.layout import LibraryLayout
from asset_library.schema import IMAGE_COLUMNS, TIMESTAMP

#: The Delta app id under which ``images`` records the occurrences version it has merged.
logger = logging.getLogger(__name__)

IMAGES_APP = "asset_library.images"
#: Default vacuum retention: files replaced longer ago than this are deleted by compaction.
#: Delta's own default (7 days): a reader or a time-travel query older than this may fail.
VACUUM_RETENTION_HOURS = 168

#: Attributes the library derives for every image, documented for users of the cube.
DERIVED_ATTRIBUTES = {
    "exif.make": "camera maker from EXIF Make",
    "exif.model": "camera model from EXIF Model",
    "exif.captured_at": "capture time from EXIF DateTimeOriginal, as YYYY-MM-DD HH:MM:SS",
    "image.aspect_ratio": "width / height as displayed, 4 decimals",
    "image.megapixels": "width x height / 1e6, 3 decimals",
    "image.animated": "true when the image has more than one frame",
}


OCCURRENCES_SCHEMA = pa.schema(
    [
        *IMAGE_COLUMNS,
        ("source_uri", pa.string()),
        ("batch", pa.string()),
        ("shard", pa.string()),
        ("ordinal", pa.int64()),
        ("ingested_at", TIMESTAMP),
        ("bucket", pa.int32()),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),
        ("md5", pa.string()),
        ("size_bytes", pa.int64()),
        ("format", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("batch", pa.string()),
        ("shard", pa.string()),
        ("ordinal", pa.int64()),
        ("ingested_at", TIMESTAMP),
        ("bucket", pa.int32()),
    ]
)
ATTRIBUTES_SCHEMA = pa.schema(
    [
        ("md5", pa.string()),
        ("attribute", pa.string()),
        ("value", pa.string()),
        ("value_type", pa.string()),
        ("origin", pa.string()),
        ("source_uri", pa.string()),
        ("batch", pa.string()),
        ("shard", pa.string()),
        ("bucket", pa.int32()),
    ]
)
#: One row per md5, written once when the md5 is first merged. ``source_uri``/``batch``/
#: ``shard``/``ordinal``/``ingested_at`` are those of its first occurrence then (by ingested_at,
#: shard, ordinal); ``occurrences`` counts them then, ``image_counts`` holds what changed since.
IMAGES_SCHEMA = pa.schema(
    [
        *IMAGE_COLUMNS,
        ("source_uri", pa.string()),
        ("batch", pa.string()),
        ("shard", pa.string()),
        ("ordinal", pa.int64()),
        ("ingested_at", TIMESTAMP),
        ("occurrences", pa.int64()),
        ("bucket", pa.int32()),
    ]
)
#: What ``image_counts`` adds to an md5's ``images.occurrences``: one row per merge that changed
#: the count of an md5 already in ``images`` (the sum of its rows is the change since then).
IMAGE_COUNTS_SCHEMA = pa.schema(
    [("md5", pa.string()), ("occurrences", pa.int64()), ("bucket", pa.int32())]
)
#: The cube again, by attribute: (attribute, value) -> the image and the occurrence that carried
#: it, partitioned by ``part``, a hash of the attribute, and sorted by (attribute, value), so a
#: query for one attribute value opens one partition's files and, by their statistics, few of
#: their row groups. It covers the image's columns but its hashes (random: two fifths of its
#: bytes), so that query reads nothing else: an image's rows among the billion would otherwise
#: need the md5 of every image for a join.
ATTRIBUTE_INDEX_SCHEMA = pa.schema(
    [
        ("attribute", pa.string()),
        ("value", pa.string()),
        *(column for column in IMAGE_COLUMNS if not column[0].endswith("hash")),
        ("source_uri", pa.string()),
        ("batch", pa.string()),
        ("shard", pa.string()),
        ("ordinal", pa.int64()),
        ("ingested_at", TIMESTAMP),
        ("bucket", pa.int32()),
        ("part", pa.int32()),
    ]
)
#: Partitions of ``attribute_index``: few, so a partition's files stay few and large.
ATTRIBUTE_PARTS = 16


def attribute_part_sql(attribute: str) -> str:
    """The DuckDB expression of an attribute's ``attribute_index`` partition (a constant when
    ``attribute`` is one, so DuckDB hands ``part = N`` to the scan)."""
    return f"(('0x' || md5({attribute})[1:4])::INTEGER % {ATTRIBUTE_PARTS})::INTEGER"


SCHEMAS: dict[str, pa.Schema] = {
    "occurrences": OCCURRENCES_SCHEMA,
    "rejects": REJECTS_SCHEMA,
    "attributes": ATTRIBUTES_SCHEMA,
    "images": IMAGES_SCHEMA,
    "image_counts": IMAGE_COUNTS_SCHEMA,
    "attribute_index": ATTRIBUTE_INDEX_SCHEMA,
}
#: Tables written (and compacted) sorted by md5 within each bucket, in this order.
_SORTED_BY_MD5 = {
    "occurrences": "bucket, md5, ingested_at, shard, ordinal",
    "attributes": "bucket, md5, attribute, value",
    "images": "bucket, md5",
}
#: The partition column of each table: ``bucket`` (of the md5) but for the attribute index.
PARTITIONS = {name: "part" if name == "attribute_index" else "bucket" for name in SCHEMAS}
#: Tables whose changes are read as a feed: occurrences by the images merge, images by the index.
_CHANGE_FEED = {"occurrences", "images"}


# --------------------------------------------------------------------------------------------
# Where the lake is


@dataclass(frozen=True)
class Lake:
    """The lake of one library: a folder or an ``s3://bucket/prefix``, and how to reach it."""

    location: str
    n_buckets: int
    storage_options: Mapping[str, str] = field(default_factory=dict)
    #: A local folder for the cache of the md5s ``images`` holds (:mod:`.keyset`); ``None``:
    #: every merge reads the md5 column of the buckets it touches.
    image_keys: Path | None = None

    @classmethod
    def of(cls, layout: LibraryLayout, environ: Mapping[str, str] | None = None) -> Lake:
        """The library's lake: ``ASSET_LIBRARY_LAKE``, else the one recorded in library.json
        (only ever an ``s3://`` URI, never a local path), else ``<library>/lake``."""
        environ = os.environ if environ is None else environ
        location = (
            environ.get("ASSET_LIBRARY_LAKE")
            or layout.settings().get("lake")
            or str(layout.lake_dir)
        )
        options = s3_storage_options(environ) if location.startswith("s3://") else {}
        return cls(location.rstrip("/"), layout.n_buckets, options, layout.image_keys_dir)

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")

    def uri(self, table: str) -> str:
        if table not in SCHEMAS:
            raise ValueError(f"unknown lake table {table!r}")
        return f"{self.location}/{table}"

    def open(self, table: str) -> DeltaTable | None:
        """The table as of its latest commit, or ``None`` if it was never created."""
        try:
            return DeltaTable(self.uri(table), storage_options=dict(self.storage_options))
        except TableNotFoundError:
            return None

    def table(self, table: str) -> DeltaTable:
        """The table, created empty first if it does not exist yet (an attribute index of an
        earlier layout: rebuilt from the cube)."""
        found = self.open(table)
        if found is not None and not is_outdated_index(table, found):
            return found
        if found is not None:
            with contextlib.suppress(CommitFailedError), duckdb.connect() as connection:
                write_deltalake(  # one overwrite; a conflict means another writer rebuilt it
                    found,
                    _first_rows(self, table, connection),
                    mode="overwrite",
                    schema_mode="overwrite",
                    partition_by=[PARTITIONS[table]],
                    writer_properties=_writer_properties(table),
                )
            return DeltaTable(self.uri(table), storage_options=dict(self.storage_options))
        if not self.is_s3:
            Path(self.uri(table)).mkdir(parents=True, exist_ok=True)
        configuration = {"delta.enableChangeDataFeed": "true"} if table in _CHANGE_FEED else None
        # An empty append creates the table; unlike DeltaTable.create it records no absolute
        # location in the log, so a copied lake stays self-contained. A conflict means another
        # writer created it first.
        with contextlib.suppress(DeltaError), duckdb.connect() as connection:
            write_deltalake(
                self.uri(table),
                _first_rows(self, table, connection),
                mode="append",
                partition_by=[PARTITIONS[table]],
                configuration=configuration,
                writer_properties=_writer_properties(table),
                storage_options=dict(self.storage_options),
            )
        return DeltaTable(self.uri(table), storage_options=dict(self.storage_options))

    def ensure(self) -> None:
        for name in SCHEMAS:
            self.table(name)


def is_outdated_index(table: str, found: DeltaTable) -> bool:
    """Whether ``found`` is an attribute index of an earlier layout (without the image's
    columns): readers then read the cube, and the next shard written rebuilds it."""
    if table != "attribute_index":
        return False
    return not set(ATTRIBUTE_INDEX_SCHEMA.names) <= {f.name for f in found.schema().fields}


def _first_rows(
    lake: Lake, table: str, connection: duckdb.DuckDBPyConnection
) -> pa.Table | pa.RecordBatchReader:
    """What a new table starts with: nothing, but for an attribute index added to a lake whose
    cube has rows: the cube's rows with their occurrences. Each shard then replaces its own
    rows as it is written, so a shard written meanwhile is never lost nor counted twice."""
    cube = lake.open("attributes") if table == "attribute_index" else None
    if cube is None:
        return SCHEMAS[table].empty_table()
    occurrences = lake.table("occurrences")
    connection.register("cube", cube.to_pyarrow_dataset())
    connection.register("occurrences", occurrences.to_pyarrow_dataset())
    rows = INDEX_SQL.format(cube="cube", occurrences="occurrences")
    return (
        connection.sql(f"{rows} ORDER BY {INDEX_ORDER}")
        .to_arrow_reader(200_000)
        .cast(ATTRIBUTE_INDEX_SCHEMA)
    )


def s3_storage_options(environ: Mapping[str, str]) -> dict[str, str]:
    """delta-rs storage options from the same variables as dagster-aws's S3Resource."""
    options: dict[str, str] = {}
    endpoint = environ.get("S3_ENDPOINT_URL") or environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if environ.get(name):
            options[name] = environ[name]
    options["AWS_REGION"] = (
        environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    )
    # Commits use S3's conditional PUT (If-None-Match), which AWS and SeaweedFS honour: no lock
    # table and no unsafe rename are needed.
    options.setdefault("conditional_put", "etag")
    return options


# --------------------------------------------------------------------------------------------
# A shard's rows, from its keys file, with DuckDB: no Python object per row

_OCCURRENCES_SQL = """
    SELECT md5, size_bytes, format, width, height, orientation, frames, phash, ahash, dhash,
           quality, source_uri, batch, shard, ordinal, ingested_at, bucket
    FROM shard_keys WHERE status = 'ok' ORDER BY bucket, md5, ingested_at, shard, ordinal
"""
_REJECTS_SQL = """
    SELECT source_uri, md5, size_bytes, format, reason, message, batch, shard, ordinal,
           ingested_at, bucket
    FROM shard_keys WHERE status <> 'ok' ORDER BY ordinal
"""
#: The value_type of a manifest value's text (see README "The cube").
VALUE_TYPE_SQL = r"""
    CASE
      WHEN regexp_full_match(v, '-?(0|[1-9][0-9]*)') THEN 'integer'
      WHEN regexp_full_match(v, '-?(0|[1-9][0-9]*)\.[0-9]*[1-9]') THEN 'double'
      WHEN v IN ('true', 'false') THEN 'boolean'
      WHEN regexp_full_match(v, '[0-9]{4}-[0-9]{2}-[0-9]{2}( [0-9]{2}:[0-9]{2}:[0-9]{2})?')
           AND try_strptime(v, ['%Y-%m-%d %H:%M:%S', '%Y-%m-%d']) IS NOT NULL THEN 'timestamp'
      ELSE 'string'
    END
"""


def value_type_of(text: str) -> str:
    """The ``value_type`` the cube records for a manifest value's text: one rule, the SQL
    above, so what Python reports is what the lake holds."""
    with duckdb.connect() as connection:
        row = connection.execute(f"SELECT {VALUE_TYPE_SQL} FROM (SELECT $v AS v)", {"v": text})
        return str(row.fetchone()[0])


#: How each derived attribute is read from a keys row, and its value_type (``exif_time``:
#: EXIF's DateTimeOriginal as YYYY-MM-DD HH:MM:SS, when it is written as one).
_DERIVED_SQL = {
    "exif.make": ("nullif(camera_make, '')", "string"),
    "exif.model": ("nullif(camera_model, '')", "string"),
    "exif.captured_at": (
        "CASE WHEN try_strptime(exif_time, '%Y-%m-%d %H:%M:%S') IS NOT NULL THEN exif_time END",
        "timestamp",
    ),
    "image.aspect_ratio": (
        "CASE WHEN width > 0 AND height > 0 THEN round(width / height, 4)::DOUBLE::VARCHAR END",
        "double",
    ),
    "image.megapixels": (
        "CASE WHEN width > 0 AND height > 0 "
        "THEN round(width * height / 1e6, 3)::DOUBLE::VARCHAR END",
        "double",
    ),
    "image.animated": ("CASE WHEN coalesce(frames, 1) > 1 THEN 'true' ELSE 'false' END", "boolean"),
}
_DERIVED = [(name, *_DERIVED_SQL[name]) for name in DERIVED_ATTRIBUTES]

#: A cube row's ``origin``: worked out from the image's bytes, or given by its manifest. Both
#: may name the same attribute (a manifest column ``exif.make``): they are told apart by it.
DERIVED, MANIFEST = "derived", "manifest"
ORIGINS = (DERIVED, MANIFEST)

#: One row per accepted image, in keys order: what its cube rows are made of. A derived
#: attribute's value is a column named after it (NULL: no row); the manifest's keys, values
#: (text; NULL for a JSON null: no row) and value types are three lists of one length, from
#: one parse each of the extras. Lists, not rows: DuckDB builds no cube row.
_CUBE_IMAGES_SQL = f"""
    WITH ok AS (
      SELECT *,
             CASE WHEN length(captured_at) >= 19 AND captured_at[5] = ':'
                       AND captured_at[8] = ':' AND NOT starts_with(captured_at, '0000')
                  THEN captured_at[1:4] || '-' || captured_at[6:7] || '-' || captured_at[9:10]
                       || ' ' || captured_at[12:19] END AS exif_time,
             json_extract_string(extras, '$.*') AS manifest_values
      FROM shard_keys WHERE status = 'ok'
    )
    SELECT md5, source_uri, batch, shard, bucket::INTEGER AS bucket, ordinal,
           {", ".join(f'{sql} AS "{name}"' for name, sql, _ in _DERIVED)},
           json_keys(extras) AS manifest_keys, manifest_values,
           list_transform(manifest_values, lambda v: {VALUE_TYPE_SQL}) AS manifest_types
    FROM ok
"""


@contextlib.contextmanager
def _small_pages() -> Iterator[None]:
    """numpy's large arrays on ordinary pages while a shard is written or merged.

    numpy asks the kernel for transparent huge pages for every array of 4 MB or more, and a
    process that allocates its memory afresh (each shard, each merge) then waits while the
    kernel zeroes and assembles them 2 MB at a time: 2-3 s of kernel time for a million
    images' cube rows here, against 1.1-1.2 s on ordinary pages (the same user time).
    Restored on the way out: the setting is process-wide."""
    previous = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(previous)


def _starts(counts: np.ndarray) -> np.ndarray:
    """Where each of consecutive runs of these lengths starts, and (last) their total."""
    starts = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    return starts


def _cube_rows(images: pa.Table) -> pa.Table:
    """The cube's rows of these images (``_CUBE_IMAGES_SQL``'s rows), image by image in md5
    order, each image's derived attributes first, then its manifest values.

    Only the images are sorted (one md5 each); every row is then gathered into its place by
    index (Arrow ``take``): no row is sorted, compared or made in Python. In md5 order, each
    bucket's rows are too, whichever bucket an md5 was filed under.

    Arrow memory comes from the system allocator: pyarrow's default (mimalloc) backs it with
    2 MB transparent huge pages, which a new process zeroes on first touch (0.65-0.7 s of
    kernel time for 1.2M rows against 0.15-0.2 s, measured)."""
    pool = pa.system_memory_pool()
    n, k = images.num_rows, len(_DERIVED)

    def whole(name: str) -> pa.Array:
        return images[name].combine_chunks(memory_pool=pool)

    def gather(values: pa.Array, at: pa.Array) -> pa.Array:
        return pc.take(values, at, memory_pool=pool)

    keys, values = whole("manifest_keys"), whole("manifest_values")
    lengths = pc.list_value_length(keys).fill_null(0).to_numpy(zero_copy_only=False)
    if not np.array_equal(lengths, pc.list_value_length(values).fill_null(0).to_numpy()):
        raise ValueError("manifest extras whose keys and values do not pair up")
    # md5 order, sorted as fixed-width bytes (half the time of Arrow's sort of the text)
    ranked = np.argsort(md5_text(images["md5"]), kind="stable")
    order = pa.array(ranked)
    ranked_lengths = lengths[ranked]
    # Every candidate row in its place: image by image, k derived slots then the manifest
    # entries, each holding where its value is in value_of (derived attribute j of image i at
    # j * n + i, manifest entry e at k * n + e); the slots without a value are dropped.
    at = _starts(k + ranked_lengths)
    index = np.int32 if at[-1] < 2**31 else np.int64  # half the memory of int64, mostly
    source = np.empty(at[-1], index)
    source[(at[:-1, None] + np.arange(k)).ravel()] = (
        ranked.astype(index)[:, None] + np.arange(k, dtype=index) * n
    ).ravel()
    entry = np.arange(at[-1] - k * n, dtype=index)
    entry -= np.repeat(_starts(ranked_lengths)[:-1].astype(index), ranked_lengths)
    source[np.repeat(at[:-1] + k, ranked_lengths) + entry] = entry + np.repeat(
        (k * n + _starts(lengths)[:-1][ranked]).astype(index), ranked_lengths
    )
    value_of = pa.concat_arrays(
        [*(whole(name) for name, _, _ in _DERIVED), pc.list_flatten(values)], memory_pool=pool
    )
    kept = value_of.is_valid().to_numpy(zero_copy_only=False)[source]
    rows = source[kept]
    manifest = rows >= k * n
    # A row's attribute and value type: its derived attribute's (the first k), or its entry's.
    named = np.where(manifest, rows - (k * n - k), rows // n).astype(index)

    def few(derived: list[str], entries: pa.Array) -> pa.Array:
        """A column of few distinct texts (attribute names, value types): each row's code,
        gathered in numpy, then its text from the short list of them (a gather of millions of
        strings from millions costs ten times as much)."""
        coded = pc.dictionary_encode(entries, memory_pool=pool)
        texts = pa.concat_arrays([pa.array(derived), coded.dictionary], memory_pool=pool)
        codes = np.concatenate(
            [np.arange(k, dtype=index), coded.indices.to_numpy(zero_copy_only=False) + k]
        )
        return gather(texts, pa.array(codes[named]))

    per_image = {
        name: gather(whole(name), order)
        for name in ("md5", "source_uri", "batch", "shard", "bucket", "ordinal")
    }
    rows_of_image = np.add.reduceat(kept, at[:-1]) if n else np.zeros(0, np.int64)
    image = pa.array(np.repeat(np.arange(n, dtype=index), rows_of_image))  # in order: no jumps
    return pa.table(
        {
            "md5": gather(per_image["md5"], image),
            "attribute": few([a for a, _, _ in _DERIVED], pc.list_flatten(keys)),
            "value": gather(value_of, pa.array(rows)),
            "value_type": few(
                [t for _, _, t in _DERIVED], pc.list_flatten(whole("manifest_types"))
            ),
            "origin": pc.if_else(pa.array(manifest), MANIFEST, DERIVED, memory_pool=pool),
            **{name: gather(per_image[name], image) for name in ("source_uri", "batch", "shard")},
            "bucket": gather(per_image["bucket"], image),
            "ordinal": gather(per_image["ordinal"], image),
        },
        schema=_CUBE_ROWS_SCHEMA,
    )


#: The cube's rows as computed: each with its occurrence's ordinal too (for the index; the
#: cube's commit leaves it out).
_CUBE_ROWS_SCHEMA = ATTRIBUTES_SCHEMA.append(pa.field("ordinal", pa.int64()))


#: Rows per Parquet row group of the tables a lookup reads by md5 (``images``, ``occurrences``
#: and the cube, each written sorted by md5): a lookup reads one row group of each file.
BY_MD5_ROW_GROUP = 4096
#: Rows per Parquet row group of ``attribute_index``: a value's rows are contiguous, so larger
#: groups only cost the rows read around its two ends.
ATTRIBUTE_INDEX_ROW_GROUP = 16_384


def _writer_properties(table: str) -> WriterProperties | None:
    if table == "attribute_index":  # sorted by value: an image's own columns recur in no run
        unique = ColumnProperties(dictionary_enabled=False)
        return WriterProperties(
            max_row_group_size=ATTRIBUTE_INDEX_ROW_GROUP,
            compression="ZSTD",
            column_properties={"md5": unique, "source_uri": unique},
        )
    if table in _SORTED_BY_MD5:
        return WriterProperties(max_row_group_size=BY_MD5_ROW_GROUP, compression="ZSTD")
    return None


#: The index's columns that come from the occurrence that carried the value.
_FROM_OCCURRENCE = [
    name for name in ATTRIBUTE_INDEX_SCHEMA.names if name not in ("attribute", "value", "part")
]
#: The attribute index rows of cube rows in ``{cube}`` (that do not hold their occurrence's
#: ordinal: a cube as committed), each with the row of the occurrence that carried it in
#: ``{occurrences}`` (by md5, shard and source; a source listed twice in one shard: its first
#: ordinal, so a cube row gains no twin, and its value counts once), one row per occurrence and
#: value (a manifest key named as a derived attribute, with its value, is one).
INDEX_SQL = f"""
    WITH occurrence AS (
      SELECT DISTINCT ON (md5, shard, source_uri) * FROM {{occurrences}}
      ORDER BY md5, shard, source_uri, ordinal
    )
    SELECT DISTINCT c.attribute, c.value, {", ".join(f"o.{name}" for name in _FROM_OCCURRENCE)},
           {attribute_part_sql("c.attribute")} AS part
    FROM {{cube}} c JOIN occurrence o
      ON o.md5 = c.md5 AND o.shard = c.shard AND o.source_uri = c.source_uri
"""
#: How the attribute index is sorted within a partition: a value's rows are contiguous (in no
#: order among themselves: a sort by md5 as well took twice as long).
INDEX_ORDER = "part, attribute, value"


def _rows_by_ordinal(ordinals: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Where each of these ordinals is, as a function of ordinals. A shard's ordinals are one
    run of its batch's (numbered across the batch): an array over that run, else a search."""
    low = int(ordinals.min(initial=0))
    span = int(ordinals.max(initial=0)) - low + 1
    if span <= 4 * len(ordinals) + 1:
        position = np.zeros(span, np.int64)
        position[ordinals - low] = np.arange(len(ordinals))
        return lambda wanted: position[wanted - low]
    order = np.argsort(ordinals)
    ranked = ordinals[order]
    return lambda wanted: order[np.searchsorted(ranked, wanted)]


def _shard_index_rows(connection: duckdb.DuckDBPyConnection) -> pa.RecordBatchReader:
    """The attribute index rows of the shard's cube rows (``shard_attributes``, each with its
    occurrence's ordinal): the narrow rows sorted, then each one's occurrence columns taken by
    position, so no wide row is joined or sorted (that took three times as long)."""
    occurrences = connection.sql(
        f"SELECT {', '.join(_FROM_OCCURRENCE)} FROM shard_keys WHERE status = 'ok'"
    ).to_arrow_table()
    row_of = _rows_by_ordinal(occurrences["ordinal"].to_numpy())
    occurrences = occurrences.combine_chunks()
    narrow = connection.sql(  # DISTINCT: a manifest key named as a derived attribute, same value
        f"SELECT DISTINCT attribute, value, ordinal, {attribute_part_sql('attribute')} AS part "
        f"FROM shard_attributes ORDER BY {INDEX_ORDER}"
    ).to_arrow_reader(200_000)

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in narrow:
            taken = occurrences.take(row_of(batch["ordinal"].to_numpy()))
            columns = {"attribute": batch["attribute"], "value": batch["value"]}
            columns |= {name: taken[name].combine_chunks() for name in _FROM_OCCURRENCE}
            columns["part"] = batch["part"]
            yield pa.RecordBatch.from_pydict(columns).cast(ATTRIBUTE_INDEX_SCHEMA)

    return pa.RecordBatchReader.from_batches(ATTRIBUTE_INDEX_SCHEMA, batches())


def _shard_keys(connection: duckdb.DuckDBPyConnection, keys: Path) -> None:
    """The view ``shard_keys`` of a keys file. Keys files written before images had a quality
    score read it as NULL."""
    rows = connection.read_parquet(str(keys))
    if "quality" not in rows.columns:
        rows = rows.project("*, NULL::SMALLINT AS quality")
    rows.create_view("shard_keys", replace=True)


#: The custom metadata key naming the shard a shard table's commit wrote.
SHARD_MARK = "asset_library.shard"


def write_shard(lake: Lake, shard: str, keys_path: Path) -> dict[str, Any]:
    """Replace the shard's rows of occurrences, rejects, attributes and the attribute index:
    one commit each (the index last, from the cube rows computed once).

    Returns rows written per table, the Delta version each commit made and its seconds (the
    index's under ``attributes``, whose seconds count computing the cube's rows too:
    ``rows_seconds``)."""
    with _small_pages():
        return _write_shard(lake, check_shard_key(shard), keys_path)


def _write_shard(lake: Lake, shard: str, keys_path: Path) -> dict[str, Any]:
    written: dict[str, Any] = {}
    lake.table("attribute_index")  # before the cube moves: a new index starts from the cube
    with duckdb.connect() as connection:
        connection.execute("SET preserve_insertion_order = false").fetchall()
        _shard_keys(connection, keys_path)
        started = time.perf_counter()
        cube = _cube_rows(connection.sql(_CUBE_IMAGES_SQL).to_arrow_table())
        connection.register("shard_attributes", cube)
        cube_rows_s = time.perf_counter() - started  # counted in the cube's commit

        def queried(sql: str, table: str) -> pa.RecordBatchReader:
            return connection.sql(sql).to_arrow_reader(200_000).cast(SCHEMAS[table])

        for table, rows_of in (
            ("occurrences", lambda: queried(_OCCURRENCES_SQL, "occurrences")),
            ("rejects", lambda: queried(_REJECTS_SQL, "rejects")),
            # the cube's rows as computed: sorted by md5 already
            ("attributes", lambda: cube.select(ATTRIBUTES_SCHEMA.names).to_reader(200_000)),
            ("attribute_index", lambda: _shard_index_rows(connection)),
        ):
            started = time.perf_counter()
            target = lake.table(table)
            write_deltalake(
                target,
                rows_of(),
                mode="overwrite",
                predicate=f"shard = '{shard}'",
                partition_by=[PARTITIONS[table]],
                target_file_size=256 << 20,
                writer_properties=_writer_properties(table),
                commit_properties=CommitProperties(custom_metadata={SHARD_MARK: shard}),
            )
            target.update_incremental()
            metrics = target.history(1)[0].get("operationMetrics", {})
            written[table] = {
                "rows": int(metrics.get("num_added_rows", 0)),
                "version": target.version(),
                "seconds": round(time.perf_counter() - started, 3),
            }
    written["attributes"]["seconds"] = round(written["attributes"]["seconds"] + cube_rows_s, 3)
    written["attributes"]["rows_seconds"] = round(cube_rows_s, 3)  # of which computing its rows
    # The index is the cube read another way: reported with it (one asset, two tables).
    written["attributes"]["index"] = written.pop("attribute_index")
    return written


# --------------------------------------------------------------------------------------------
# images: merged from the occurrences change feed


@dataclass
class MergeResult:
    """What one merge did: occurrences versions folded in, buckets and md5s touched."""

    from_version: int
    to_version: int
    shards: list[str] = field(default_factory=list)
    buckets: list[int] = field(default_factory=list)
    md5s: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    duplicated_md5s: int = 0
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return self.to_version > self.from_version


def merged_version(lake: Lake) -> int:
    """The occurrences version ``images`` has merged up to (-1 before any merge)."""
    images = lake.open("images")
    if images is None:
        return -1
    version = images.transaction_version(IMAGES_APP)
    return -1 if version is None else int(version)


def shards_not_merged(lake: Lake) -> list[str] | None:
    """The shards whose rows landed in ``occurrences`` after the version ``images`` has merged
    up to, from their commits' :data:`SHARD_MARK`: what the next refresh folds in. ``None`` if
    the history cannot be read."""
    occurrences = lake.open("occurrences")
    if occurrences is None:
        return []
    entries = _history(lake, occurrences, merged_version(lake) + 1, occurrences.version())
    if entries is None:
        return None
    return sorted({entry[SHARD_MARK] for entry in entries.values() if entry.get(SHARD_MARK)})


#: The custom metadata that marks a commit rewriting rows as they were (compaction's sort).
REWRITE_MARK = {"asset_library.operation": "sort buckets"}


def read_changes(
    lake: Lake, table: DeltaTable, start: int, end: int, columns: list[str]
) -> pa.Table:
    """Rows inserted and deleted in versions ``start..end`` of ``table`` (change data feed),
    less the commits that only rewrote rows as they were (compaction's sorted rewrite, which
    Delta records as every row of its buckets deleted and inserted again: reading them cost a
    merge after a compaction the whole table twice, to net them out)."""
    wanted = [*columns, "_change_type", "_commit_version", "_commit_timestamp"]
    skipped = _rewrites(lake, table, start, end)
    parts = []
    first = start
    for version in [*sorted(skipped), end + 1]:
        if first <= version - 1:
            reader = table.load_cdf(
                starting_version=first, ending_version=version - 1, columns=wanted
            )
            parts.append(pa.RecordBatchReader.from_stream(reader).read_all())
        first = version + 1
    if not parts:  # nothing in the range but rewrites (or an empty range)
        from asset_library.lake.scan import plain_schema  # it reads this module's tables

        declared = plain_schema(pa.schema(table.schema().to_arrow()))
        change = [("_change_type", pa.string()), ("_commit_version", pa.int64())]
        return pa.schema(
            [declared.field(c) for c in columns]
            + [pa.field(n, t) for n, t in change]
            + [pa.field("_commit_timestamp", pa.timestamp("ms"))]
        ).empty_table()
    return pa.concat_tables(parts)


#: Commits that change no row: a vacuum's two (it deletes files no live version reads).
_VACUUM_OPERATIONS = {"VACUUM START", "VACUUM END"}
#: The custom metadata key naming the merge that made an ``images`` commit (a new id each).
MERGE_MARK = "asset_library.merge"


def _history(lake: Lake, table: DeltaTable, start: int, end: int) -> dict[int, dict] | None:
    """The commit entries of versions ``start..end`` by version (``None`` if unreadable).

    Read from a handle at the latest version: delta-rs's ``history()`` lists the newest
    commits in storage but numbers them down from the handle's loaded version, so a commit
    landing meanwhile would shift every label. If the table moved while its history was read,
    read it again; after three tries give up (callers then assume the least)."""
    if end < start:
        return {}
    name = table.table_uri.rstrip("/").rsplit("/", 1)[-1]
    for _ in range(3):
        probe = lake.open(name)
        if probe is None:
            return None
        latest = probe.version()
        entries = probe.history(max(1, latest - start + 1))
        probe.update_incremental()
        if probe.version() == latest:
            return {
                int(entry["version"]): entry
                for entry in entries
                if start <= int(entry["version"]) <= end
            }
    return None


def _rewrites(lake: Lake, table: DeltaTable, start: int, end: int) -> set[int]:
    """Versions in ``start..end`` that rewrote rows unchanged (marked :data:`REWRITE_MARK`):
    none if the history cannot be read (slower, never wrong)."""
    ((key, value),) = REWRITE_MARK.items()
    entries = _history(lake, table, start, end) or {}
    return {version for version, entry in entries.items() if entry.get(key) == value}


def _level_check(lake: Lake, images: DeltaTable, version: int) -> Callable[[int, str], bool]:
    """Whether the key cache made by merge ``merge`` at ``cached`` is level with ``images`` at
    ``version``: that commit is still there as that merge made it (not a lake restored from a
    copy, or another lake's), and every commit since changed no row (compaction's rewrite, a
    vacuum)."""
    ((key, value),) = REWRITE_MARK.items()

    def check(cached: int, merge: str) -> bool:
        entries = _history(lake, images, cached, version)
        if entries is None or set(entries) != set(range(cached, version + 1)):
            return False
        if entries[cached].get(MERGE_MARK) != merge:
            return False
        return all(
            entries[v].get(key) == value or entries[v].get("operation") in _VACUUM_OPERATIONS
            for v in range(cached + 1, version + 1)
        )

    return check


def merge_images(lake: Lake) -> MergeResult:
    """Fold every occurrences commit since the last merge into ``images`` and ``image_counts``.

    An md5 new to ``images`` is appended once (its first occurrence and its count then); an md5
    already there that only gained occurrences gets one ``image_counts`` row with the gain:
    no ``images`` file is rewritten. Only an md5 that lost an occurrence (its shard was replaced
    or emptied) is recomputed from its current occurrences in its bucket and rewritten (or
    deleted) by a Delta ``MERGE``, its ``image_counts`` rows offset to zero. Two commits:
    ``image_counts`` first, then ``images``, each recording the occurrences version reached.
    A merge cut between them left ``image_counts`` ahead of ``images``: the next merge first
    makes that range's ``images`` commit (from the occurrences as of the version counted, and
    without counting it again), then merges what landed since, so every occurrence counts
    once whatever landed in between. Two merges at once make one fail with a commit conflict.
    Then md5 uniqueness is checked in the touched buckets."""
    with _small_pages():
        return _merge_images(lake)


def _merge_images(lake: Lake) -> MergeResult:
    started = time.perf_counter()
    occurrences = lake.table("occurrences")
    images = lake.table("images")
    counts = lake.table("image_counts")
    last = merged_version(lake)
    counted = counted_version(lake)
    now = occurrences.version()
    if counted > now:
        raise ValueError(
            f"{lake.uri('image_counts')} records occurrences version {counted}, beyond the "
            f"latest of {lake.uri('occurrences')} ({now}): these tables are not one lake's"
        )
    keys = ImageKeys(lake.image_keys) if lake.image_keys is not None else None
    done: list[MergeResult] = []
    if counted > last:  # a merge of last+1..counted committed image_counts, then stopped:
        # its images commit is made from the same range, its counts are not written twice
        reached = DeltaTable(
            lake.uri("occurrences"), version=counted, storage_options=dict(lake.storage_options)
        )
        done.append(_merge_range(lake, reached, images, counts, keys, last, counted, False))
        last = counted
    if now > last:
        done.append(_merge_range(lake, occurrences, images, counts, keys, last, now, True))
    first = done[0].from_version if done else last
    result = MergeResult(from_version=first, to_version=done[-1].to_version if done else last)
    for part in done:
        result.shards = sorted({*result.shards, *part.shards})
        result.buckets = sorted({*result.buckets, *part.buckets})
        result.md5s += part.md5s
        result.inserted += part.inserted
        result.updated += part.updated
        result.deleted += part.deleted
        result.duplicated_md5s += part.duplicated_md5s
    result.seconds = time.perf_counter() - started
    return result


def counted_version(lake: Lake) -> int:
    """The occurrences version ``image_counts`` has counted up to (-1 before any merge).
    Ahead of :func:`merged_version` only after a merge stopped between its two commits."""
    counts = lake.open("image_counts")
    version = None if counts is None else counts.transaction_version(IMAGES_APP)
    return -1 if version is None else int(version)


def _merge_range(
    lake: Lake,
    occurrences: DeltaTable,
    images: DeltaTable,
    counts: DeltaTable,
    keys: ImageKeys | None,
    last: int,
    now: int,
    write_counts: bool,
) -> MergeResult:
    """Fold occurrences versions ``last + 1..now`` (``occurrences`` loaded at ``now``) into
    ``images``, and into ``image_counts`` unless an earlier merge of this range already
    committed them there (``write_counts`` false)."""
    result = MergeResult(from_version=last, to_version=now)
    images.update_incremental()
    counts.update_incremental()
    changes = read_changes(lake, occurrences, last + 1, now, [f.name for f in OCCURRENCES_SCHEMA])
    start, table_id, merge = images.version(), images.metadata().id, uuid.uuid4().hex
    cached = (
        keys.level_with(table_id, start, _level_check(lake, images, start), row_count(images))
        if keys is not None
        else None
    )
    with duckdb.connect() as connection:
        connection.register("changes", changes)
        # One row per occurrence that changed: n > 0 added, n < 0 removed, 0 (rewritten
        # unchanged, or added then removed within the range) dropped.
        connection.execute(
            """
            CREATE TEMP TABLE net AS
            SELECT * EXCLUDE (_change_type, _commit_version, _commit_timestamp, r) FROM (
              SELECT *, sum(CASE WHEN _change_type = 'insert' THEN 1 ELSE -1 END)
                        OVER (PARTITION BY md5, shard, ordinal, ingested_at) AS n,
                     row_number() OVER (PARTITION BY md5, shard, ordinal, ingested_at
                                        ORDER BY _commit_version DESC) AS r
              FROM changes WHERE _change_type IN ('insert', 'delete'))
            WHERE r = 1 AND n <> 0 AND md5 IS NOT NULL
            """
        ).fetchall()
        summary = connection.execute(
            "SELECT list(DISTINCT shard), list(DISTINCT bucket) FROM changes"
        ).fetchall()[0]
        result.shards = sorted(s for s in (summary[0] or []) if s)
        touched = sorted({int(b) for b in (summary[1] or []) if b is not None})
        result.buckets = touched
        rebuild = keys is not None and cached is None
        plan = _merge_plan(connection, lake, images, occurrences, counts, touched, cached, rebuild)
    result.md5s = plan.md5s
    if write_counts:
        crash_point("image_counts")
        write_deltalake(
            counts,
            plan.counts,
            mode="append",
            partition_by=["bucket"],
            commit_properties=_merged_to(now, merge),
        )
        result.updated = plan.counts.num_rows
    crash_point("images")
    if plan.recomputed.num_rows:
        source = pa.concat_tables([plan.new.cast(_SOURCE_SCHEMA), plan.recomputed])
        metrics = (
            images.merge(
                source,
                predicate=_bucket_predicate(touched) + " AND t.md5 = s.md5",
                source_alias="s",
                target_alias="t",
                commit_properties=_merged_to(now, merge),
            )
            .when_matched_delete(predicate="s.mode = 'set' AND s.occurrences = 0")
            .when_matched_update(updates=_SET_UPDATES, predicate="s.mode = 'set'")
            .when_not_matched_insert(updates=_INSERT, predicate="s.occurrences > 0")
            .execute()
        )
        result.inserted = int(metrics.get("num_target_rows_inserted", 0))
        result.updated += int(metrics.get("num_target_rows_updated", 0))
        result.deleted = int(metrics.get("num_target_rows_deleted", 0))
    else:  # the usual case: new md5s appended, sorted by md5 so a lookup skips row groups
        write_deltalake(
            images,
            plan.new.drop_columns(["mode"]).cast(IMAGES_SCHEMA),
            mode="append",
            partition_by=["bucket"],
            writer_properties=_writer_properties("images"),
            commit_properties=_merged_to(now, merge),
        )
        result.inserted = plan.new.num_rows
    crash_point("image_keys")
    if keys is not None:
        _keep_keys(keys, plan, table_id, images.version(), merge)
    result.duplicated_md5s = plan.duplicated
    return result


#: The environment variable naming a merge's commit boundary at which the process kills
#: itself (SIGKILL), as a crash there would: ``image_counts`` (before that commit), ``images``
#: (between the two commits), ``image_keys`` (after both); ``<name>@<n>``: the n-th time the
#: process reaches it. How a crash at each boundary is rehearsed on real tables.
CRASH_AT = "ASSET_LIBRARY_CRASH_AT"
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Kill this process here if :data:`CRASH_AT` names this boundary (and this time)."""
    wanted = os.environ.get(CRASH_AT)
    if not wanted:
        return
    _reached[name] = _reached.get(name, 0) + 1
    point, _, nth = wanted.partition("@")
    if point == name and _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _keep_keys(keys: ImageKeys, plan: _Plan, table_id: str, version: int, merge: str) -> None:
    """Bring the key cache level with the ``images`` version this merge committed: its new
    md5s added, or (when it read every bucket's md5 column) rebuilt from what it read; cleared
    when md5s left ``images`` (rare: a shard replaced or emptied). Its commits have landed
    whatever happens here: a cache that cannot be kept is cleared, and the next merge reads
    the table."""
    try:
        if plan.recomputed.num_rows:
            keys.clear()
        elif plan.read is not None:
            read = np.concatenate([plan.read, digests(plan.new["md5"])], axis=1)
            keys.rebuild(read, table_id, version, merge)
        elif plan.from_cache:
            keys.add(digests(plan.new["md5"]), table_id, version, merge)
        else:  # the cache lost a run while this merge read it
            keys.clear()
    except Exception:  # noqa: BLE001 - a cache: never fail the merge that landed
        logger.warning(
            "images key cache in %s cleared after an error", keys.directory, exc_info=True
        )
        with contextlib.suppress(OSError):
            keys.clear()


def _merged_to(version: int, merge: str | None = None) -> CommitProperties:
    """A merge's commit: the occurrences version it reached, and the merge's own id."""
    metadata = {"asset_library.occurrences_version": str(version)}
    if merge is not None:
        metadata[MERGE_MARK] = merge
    return CommitProperties(
        app_transactions=[Transaction(app_id=IMAGES_APP, version=version)],
        custom_metadata=metadata,
    )


_SET_UPDATES = {f.name: f"s.{f.name}" for f in IMAGES_SCHEMA if f.name != "bucket"}
_INSERT = {f.name: f"s.{f.name}" for f in IMAGES_SCHEMA}
_SOURCE_SCHEMA = pa.schema([("mode", pa.string()), *IMAGES_SCHEMA])


def _bucket_predicate(buckets: Iterable[int]) -> str:
    listed = ", ".join(str(int(b)) for b in buckets)
    return f"t.bucket IN ({listed})" if listed else "t.bucket = -1"


@dataclass
class _Plan:
    """What a merge writes: ``new`` images rows to add, ``counts`` rows to append, and the
    ``recomputed`` rows of md5s that lost an occurrence (``mode = 'set'``); ``duplicated``:
    md5s the touched buckets would hold more than once after it."""

    duplicated: int
    new: pa.Table
    counts: pa.Table
    recomputed: pa.Table
    md5s: int
    #: the digests of every md5 ``images`` held, when the merge read them to rebuild the key
    #: cache
    read: np.ndarray | None = None
    #: whether the key cache told which changed md5s ``images`` held
    from_cache: bool = False


def _in_buckets(
    lake: Lake, table: DeltaTable, schema: pa.Schema, buckets: list[int], md5s: pa.Array
) -> pa.Table:
    """These md5s' rows of a table (``schema``'s columns), reading only their buckets' files.
    The md5 filter is applied after the read: files a MERGE wrote hold text as string_view,
    which pyarrow's dataset filter will not compare with a string."""
    if not buckets or len(md5s) == 0:
        return schema.empty_table()
    rows = _dataset(lake, table).to_table(
        columns=schema.names, filter=pc.field("bucket").isin(buckets)
    )
    rows = rows.filter(pc.is_in(rows["md5"].cast(pa.string()), value_set=md5s.cast(pa.string())))
    return rows.cast(schema)


def _md5s(
    lake: Lake, images: DeltaTable, buckets: list[int] | None, digested: list[np.ndarray] | None
) -> pa.Table | pa.RecordBatchReader:
    """The md5 column of these buckets of ``images`` (every bucket: ``None``). With
    ``digested``, batch by batch, each batch's digests appended to it as it passes: memory for
    a batch and 16 bytes an md5 while the key cache is rebuilt. Without, read whole (in chunks)
    for DuckDB to probe on every core: 2.7 s at 11.8M md5s against 3.5-5.3 s streamed."""
    scanner = _dataset(lake, images).scanner(
        columns=["md5"],
        filter=None if buckets is None else pc.field("bucket").isin(buckets or [-1]),
    )
    if digested is None:
        return scanner.to_table()

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in scanner.to_batches():
            digested.append(digests(batch.column(0)))
            yield batch

    return pa.RecordBatchReader.from_batches(scanner.projected_schema, batches())


def _dataset(lake: Lake, table: DeltaTable) -> pds.Dataset:
    """The table's live files as a pyarrow dataset, tagged by bucket from the log's actions
    (delta-rs's own ``to_pyarrow_dataset`` builds a partition expression per file in Python:
    seconds at thousands of files)."""
    from asset_library.lake.scan import lake_dataset  # it reads this module's tables

    return lake_dataset(table, lake)


def _merge_plan(
    connection: duckdb.DuckDBPyConnection,
    lake: Lake,
    images: DeltaTable,
    occurrences: DeltaTable,
    counts: DeltaTable,
    touched: list[int],
    cached: CachedKeys | None = None,
    rebuild: bool = False,
) -> _Plan:
    """Split the net changes: md5s new to ``images`` (their first added occurrence and count),
    md5s already there that only gained (their gain, for ``image_counts``), and md5s that lost
    an occurrence (recomputed from their current occurrences)."""
    columns = ", ".join(f.name for f in IMAGES_SCHEMA if f.name != "occurrences")
    connection.execute(
        """
        CREATE TEMP TABLE per_md5 AS
        SELECT md5, any_value(bucket) AS bucket, sum(n)::BIGINT AS gained,
               bool_or(n < 0) AS lost
        FROM net GROUP BY md5
        """
    ).fetchall()
    changed = connection.sql("SELECT md5 FROM per_md5").to_arrow_table()["md5"]
    held = None
    if cached is not None:
        try:
            held = cached.held(changed)
        except KeyCacheError as error:  # rewritten meanwhile, or damaged: read the table
            logger.warning("%s; reading the images table instead", error)
    read = None
    if held is not None:  # the key cache answers: a binary search per changed md5
        connection.register(
            "known", pa.table({"md5": changed.filter(pa.array(held)).cast(pa.string())})
        )
    else:  # the read that grows with the library: the md5 column of the touched buckets (of
        # every bucket when the key cache is rebuilt from it)
        read = [] if rebuild else None
        connection.register("known", _md5s(lake, images, None if rebuild else touched, read))
    # Probed once, against a hash table of the changed md5s (the small side), never built on.
    connection.execute(
        """
        CREATE TEMP TABLE matched AS
        SELECT md5, count(*) AS copies FROM known
        WHERE md5 IN (SELECT md5 FROM per_md5) GROUP BY md5
        """
    ).fetchall()
    new = connection.sql(
        f"""
        SELECT 'add' AS mode, {columns}, gained AS occurrences FROM (
          SELECT net.*, p.gained,
                 row_number() OVER (PARTITION BY net.md5
                                    ORDER BY ingested_at, shard, ordinal) AS k
          FROM net JOIN per_md5 p USING (md5)
          WHERE n > 0 AND p.gained > 0 AND net.md5 NOT IN (SELECT md5 FROM matched))
        WHERE k = 1 ORDER BY bucket, md5
        """
    ).to_arrow_table()
    gains = connection.sql(
        "SELECT md5, gained AS occurrences, bucket FROM per_md5 WHERE NOT lost AND gained <> 0 "
        "AND md5 IN (SELECT md5 FROM matched) ORDER BY bucket, md5"
    ).to_arrow_table()
    lost = connection.sql(
        "SELECT md5, bucket FROM per_md5 WHERE lost AND md5 IN (SELECT md5 FROM matched)"
    ).to_arrow_table()
    # Uniqueness of the touched buckets after this merge, given it held before (the previous
    # merge checked it; ``audit_library`` checks the whole library): an md5 the buckets held
    # twice among those changed, plus one appended twice or appended while held.
    connection.register("appended", new.select(["md5"]))
    duplicated = connection.execute(
        """
        SELECT (SELECT count(*) FROM matched WHERE copies > 1)
             + (SELECT count(*) - count(DISTINCT md5) FROM appended)
             + (SELECT count(*) FROM appended WHERE md5 IN (SELECT md5 FROM matched))
        """
    ).fetchall()[0][0]
    recomputed = _SOURCE_SCHEMA.empty_table()
    offsets = IMAGE_COUNTS_SCHEMA.empty_table()
    if lost.num_rows:
        lost_buckets = sorted({int(b) for b in lost["bucket"].to_pylist()})
        connection.register("lost", lost)
        connection.register(
            "current_rows",
            _in_buckets(lake, occurrences, OCCURRENCES_SCHEMA, lost_buckets, lost["md5"]),
        )
        connection.register(
            "counted", _in_buckets(lake, counts, IMAGE_COUNTS_SCHEMA, lost_buckets, lost["md5"])
        )
        recomputed = connection.sql(
            f"""
            SELECT 'set' AS mode, l.md5 AS md5, r.* EXCLUDE (md5, bucket, k, occurrences),
                   coalesce(r.occurrences, 0) AS occurrences, l.bucket AS bucket
            FROM lost l LEFT JOIN (
              SELECT {columns}, count(*) OVER (PARTITION BY md5) AS occurrences,
                     row_number() OVER (PARTITION BY md5 ORDER BY ingested_at, shard, ordinal) AS k
              FROM current_rows) r ON r.md5 = l.md5 AND r.k = 1
            """
        ).to_arrow_table()
        recomputed = recomputed.select(_SOURCE_SCHEMA.names).cast(_SOURCE_SCHEMA)
        # Their count is now whole in images: what image_counts adds for them goes to zero.
        offsets = connection.sql(
            "SELECT c.md5, -sum(c.occurrences)::BIGINT AS occurrences, any_value(l.bucket) "
            "AS bucket FROM counted c JOIN lost l USING (md5) GROUP BY c.md5 "
            "HAVING sum(c.occurrences) <> 0"
        ).to_arrow_table()
    return _Plan(
        duplicated=int(duplicated),
        new=new.select(_SOURCE_SCHEMA.names).cast(_SOURCE_SCHEMA),
        counts=pa.concat_tables(
            [gains.cast(IMAGE_COUNTS_SCHEMA), offsets.cast(IMAGE_COUNTS_SCHEMA)]
        ),
        recomputed=recomputed,
        md5s=len(changed),
        read=None if read is None else np.concatenate([np.empty((2, 0), np.uint64), *read], axis=1),
        from_cache=held is not None,
    )


# --------------------------------------------------------------------------------------------
# Compaction and vacuum


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
    **{name: f"SELECT * FROM rows ORDER BY {order}" for name, order in _SORTED_BY_MD5.items()},
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
            writer_properties=_writer_properties(name),
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


def row_count(table: DeltaTable | None) -> int:
    """Rows in a table from the log's per-file counts: no data file is read."""
    if table is None:
        return 0
    actions = pa.table(table.get_add_actions(flatten=True))
    return int(pc.sum(actions["num_records"]).as_py() or 0) if actions.num_rows else 0
