"""A shard's rows in the lake: occurrences, rejects, the cube and the attribute index, from
the shard's keys file, with DuckDB and Arrow (no Python object per row).

A shard's run replaces exactly that shard's rows of the first three and of the attribute index
with one commit per table (``overwrite`` with ``predicate = "shard = '<shard>'"``). Two shards
commit side by side; the same shard written twice at once fails with a commit conflict, never a
mix.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, write_deltalake

from asset_library.ids import check_shard_key
from asset_library.lake.keyset import md5_text
from asset_library.lake.schemas import (
    ATTRIBUTE_INDEX_SCHEMA,
    ATTRIBUTES_SCHEMA,
    DERIVED,
    DERIVED_ATTRIBUTES,
    FROM_OCCURRENCE,
    INDEX_ORDER,
    MANIFEST,
    PARTITIONS,
    SCHEMAS,
    SHARD_MARK,
    attribute_part_sql,
)
from asset_library.lake.table import Lake, small_pages, write_settled, writer_options

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
        (value_type,) = row.fetchall()[0]  # one row: a SELECT without FROM rows
        return str(value_type)


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
        f"SELECT {', '.join(FROM_OCCURRENCE)} FROM shard_keys WHERE status = 'ok'"
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
            columns |= {name: taken[name].combine_chunks() for name in FROM_OCCURRENCE}
            columns["part"] = batch["part"]
            yield pa.RecordBatch.from_pydict(columns).cast(ATTRIBUTE_INDEX_SCHEMA)

    return pa.RecordBatchReader.from_batches(ATTRIBUTE_INDEX_SCHEMA, batches())


def _replace_shard(
    shard: str,
    table: str,
    rows_of: Callable[[], pa.Table | pa.RecordBatchReader],
    target: DeltaTable,
) -> None:
    """One commit replacing the shard's rows of ``target`` with ``rows_of()``'s."""
    write_deltalake(
        target,
        rows_of(),
        mode="overwrite",
        predicate=f"shard = '{shard}'",
        partition_by=[PARTITIONS[table]],
        target_file_size=256 << 20,
        **writer_options(table),
        commit_properties=CommitProperties(custom_metadata={SHARD_MARK: shard}),
    )


def _shard_keys(connection: duckdb.DuckDBPyConnection, keys: Path) -> None:
    """The view ``shard_keys`` of a keys file. Keys files written before images had a quality
    score read it as NULL."""
    rows = connection.read_parquet(str(keys))
    if "quality" not in rows.columns:
        rows = rows.project("*, NULL::SMALLINT AS quality")
    rows.create_view("shard_keys", replace=True)


#: The tables a shard replaces its rows of, in commit order (the index last).
SHARD_TABLES = ("occurrences", "rejects", "attributes", "attribute_index")


def write_shard(lake: Lake, shard: str, keys_path: Path) -> dict[str, Any]:
    """Replace the shard's rows of occurrences, rejects, attributes and the attribute index:
    one commit each (the index last, from the cube rows computed once).

    Returns rows written per table, the Delta version each commit made and its seconds (the
    index's under ``attributes``, whose seconds count computing the cube's rows too:
    ``rows_seconds``)."""
    with small_pages():
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

        rows_of_table: dict[str, Callable[[], pa.Table | pa.RecordBatchReader]] = {
            "occurrences": lambda: queried(_OCCURRENCES_SQL, "occurrences"),
            "rejects": lambda: queried(_REJECTS_SQL, "rejects"),
            # the cube's rows as computed: sorted by md5 already
            "attributes": lambda: cube.select(ATTRIBUTES_SCHEMA.names).to_reader(200_000),
            "attribute_index": lambda: _shard_index_rows(connection),
        }
        for table in SHARD_TABLES:
            rows_of = rows_of_table[table]
            started = time.perf_counter()
            target = write_settled(
                lake, table, functools.partial(_replace_shard, shard, table, rows_of)
            )
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
