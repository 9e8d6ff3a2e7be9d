"""Writing the store: :func:`sync` keeps it level with the lake at a cost per shard.

The ``images`` change feed gives the image rows, the ``occurrences`` feed the counts and first
sources, and the ``attributes`` table's commits since the last sync (read as a change feed: the
rows of the files each commit added and removed) the attribute counts; change rows are netted
in an in-memory DuckDB, in bulk, and written as a new run (:mod:`.runs`), in md5 order; runs of
a tier then merge. A damaged, unknown or other lake's file is rebuilt from the lake's current
rows, as one run. One write transaction per sync (WAL), so readers see the old state or the
new, never a mix.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from asset_library.lake import IMAGES_APP, Lake, read_changes
from asset_library.lake.scan import plain_schema
from asset_library.serving.backend import Backend, SqliteBackend, StoreWriter
from asset_library.serving.runs import (
    RUN_TABLES,
    Run,
    by_value_index,
    format_runs,
    newest,
    parse_runs,
    runs_to_merge,
    table,
    union,
)
from asset_library.serving.schema import (
    BY_VALUE_INDEX_SQL,
    RECORD_COLUMNS,
    RECORD_SOURCES,
    STORE_FORMAT,
)

log = logging.getLogger(__name__)

_SOURCE_KEY = ("ingested_at", "shard", "ordinal")


@dataclass
class SyncResult:
    """What one sync did: rebuilt or not, versions reached, rows changed, seconds."""

    rebuilt: bool
    reason: str
    images_version: int
    occurrences_version: int
    attributes_version: int
    images_changed: int = 0
    occurrences_changed: int = 0
    attributes_changed: int = 0
    refilled: int = 0
    #: Rows of the run this sync wrote (none: nothing changed).
    run_rows: int = 0
    #: Runs merged into one after it, and the rows they made.
    runs_merged: int = 0
    merged_rows: int = 0
    #: The store's runs after it.
    runs: int = 0
    seconds: float = 0.0


def sync(lake: Lake, store: Path | Backend, *, rebuild: bool = False) -> SyncResult:
    """Bring the store (a SQLite file's path, or a :class:`Backend`) level with the lake: from
    the changes since the versions it records, or (``rebuild``, or a store that is new,
    damaged, of another layout or another lake's) from the lake's current rows. One write
    transaction either way."""
    started = time.perf_counter()
    backend = SqliteBackend(store) if isinstance(store, Path) else store
    if lake.is_s3 and isinstance(backend, SqliteBackend):
        raise ValueError(
            f"{lake.location}: a lake on S3 needs a PostgreSQL serving store, not a SQLite file"
        )
    images, occurrences, attributes = (
        lake.table(t) for t in ("images", "occurrences", "attributes")
    )
    target = _Target(
        images=images.version(),
        occurrences=_merged_version(images),
        attributes=attributes.version(),
        lake_id=str(images.metadata().id),  # a UUID text, though delta-rs annotates an int
    )
    try:
        result = _sync(lake, backend, images, occurrences, attributes, target, rebuild)
    except backend.damaged as error:  # a damaged file: the lake has every answer
        log.warning(
            "serving store %s damaged (%s): rebuilt from the lake", backend.describe(), error
        )
        backend.remove()
        result = _sync(lake, backend, images, occurrences, attributes, target, True)
        result.reason = f"damaged: {error}"
    result.seconds = time.perf_counter() - started
    return result


def _merged_version(images: DeltaTable) -> int:
    """The occurrences version ``images`` (as loaded) has merged up to; -1 before any merge."""
    version = images.transaction_version(IMAGES_APP)
    return -1 if version is None else int(version)


@dataclass(frozen=True)
class _Target:
    images: int
    occurrences: int
    attributes: int
    lake_id: str


def _sync(
    lake: Lake,
    backend: Backend,
    images: DeltaTable,
    occurrences: DeltaTable,
    attributes: DeltaTable,
    target: _Target,
    rebuild: bool,
) -> SyncResult:
    with backend.transaction() as connection:
        meta = dict(connection.execute("SELECT key, value FROM meta"))
        reason = _rebuild_reason(meta, target) if not rebuild else "asked"
        runs = parse_runs(meta.get("runs")) if meta.get("format") == STORE_FORMAT else []
        run = Run(max((r.id for r in runs), default=0) + 1, 0)
        if reason is not None:
            connection.drop_store_tables()  # its runs, or another layout's tables
            runs = []
            connection.create_run(run.id)
            result = _rebuild(lake, connection, target, run)
            result.reason = reason
        else:
            connection.create_run(run.id)
            tables = (images, occurrences, attributes)
            result = _apply_changes(lake, connection, tables, meta, target, runs, run)
        result.run_rows = _sealed(connection, run)
        if result.run_rows:
            runs.append(Run(run.id, result.run_rows))
        runs = _merge_runs(connection, runs, result)
        result.runs = len(runs)
        connection.write(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [
                ("format", STORE_FORMAT),
                ("lake_id", target.lake_id),
                ("images_version", str(target.images)),
                ("occurrences_version", str(target.occurrences)),
                ("attributes_version", str(target.attributes)),
                ("runs", format_runs(runs)),
            ],
        )
    return result


def _drop_runs(connection: StoreWriter, runs: Iterable[Run]) -> None:
    """These runs' tables gone (their indexes with them)."""
    for run in runs:
        for name in RUN_TABLES:
            connection.execute(f"DROP TABLE IF EXISTS {table(name, run)}")


def _sealed(connection: StoreWriter, run: Run) -> int:
    """A run's rows, once written: its index by value made (one sort), or the run dropped if
    it holds none."""
    rows = sum(
        int(connection.execute(f"SELECT count(*) FROM {table(name, run)}")[0][0])
        for name in RUN_TABLES
    )
    if rows:
        connection.execute(
            BY_VALUE_INDEX_SQL.format(index=by_value_index(run), table=table("attributes", run))
        )
    else:
        _drop_runs(connection, [run])
    return rows


def _merge_runs(connection: StoreWriter, runs: list[Run], result: SyncResult) -> list[Run]:
    """Runs of a tier merged into one while ``fan_in`` of them follow each other: the newest
    row of each image and source kept, counts added up; what the oldest run needs no more
    (removals, counts of 0) dropped when it is among them. Written in key order, appended."""
    while merging := runs_to_merge(runs):
        inputs, kept = runs[-merging:], runs[:-merging]
        whole = not kept  # the merge makes the oldest run: nothing is left to remove
        merged = Run(max(r.id for r in runs) + 1, 0)
        connection.create_run(merged.id)
        present = " WHERE record IS NOT NULL" if whole else ""
        connection.execute(
            f"INSERT INTO {table('images', merged)} SELECT md5, record FROM "
            f"({newest('images', inputs, 'record')}) latest{present} ORDER BY md5"
        )
        connection.execute(
            f"INSERT INTO {table('counts', merged)} SELECT md5, sum(n) FROM "
            f"({union('counts', inputs, 'md5, n')}) unioned GROUP BY md5 HAVING sum(n) <> 0 "
            "ORDER BY md5"
        )
        key = "md5, origin, attribute, value, value_type"
        connection.execute(
            f"INSERT INTO {table('attributes', merged)} SELECT {key}, sum(n) FROM "
            f"({union('attributes', inputs, f'{key}, n')}) unioned GROUP BY {key} "
            f"HAVING sum(n) <> 0 ORDER BY {key}"
        )
        # The first sources of each image (and, unless whole, the removals older runs need).
        removals = "" if whole else "source_uri IS NULL OR "
        connection.execute(
            f"INSERT INTO {table('sources', merged)} "
            "SELECT md5, ingested_at, shard, ordinal, source_uri FROM ("
            "SELECT md5, ingested_at, shard, ordinal, source_uri, row_number() OVER ("
            "PARTITION BY md5, source_uri IS NULL ORDER BY ingested_at, shard, ordinal) AS place "
            f"FROM ({newest('sources', inputs, 'source_uri')}) latest) placed "
            f"WHERE {removals}(source_uri IS NOT NULL AND place <= {RECORD_SOURCES}) "
            "ORDER BY md5, ingested_at, shard, ordinal"
        )
        _drop_runs(connection, inputs)
        rows = _sealed(connection, merged)
        result.runs_merged += len(inputs)
        result.merged_rows += rows
        runs = [*kept, Run(merged.id, rows)] if rows else kept
    return runs


def _rebuild_reason(meta: dict[str, str], target: _Target) -> str | None:
    """Why the store must be rebuilt rather than brought level by changes (None: it need not)."""
    if not meta:
        return "new"
    if meta.get("format") != STORE_FORMAT:
        return f"layout {meta.get('format')!r}, not {STORE_FORMAT!r}"
    if meta.get("lake_id") != target.lake_id:
        return "another lake's store"
    for name in ("images", "occurrences", "attributes"):
        if int(meta.get(f"{name}_version", "-1")) > getattr(target, name):
            return f"{name} version ahead of the lake's"
    return None


def _read_changes(
    lake: Lake, table: DeltaTable, start: int, end: int, columns: list[str]
) -> pa.Table:
    """The change rows (``read_changes``) with plain string columns, which every Arrow kernel
    takes (a view column cannot be taken from or filtered)."""
    changes = read_changes(lake, table, start, end, columns)
    return changes.cast(plain_schema(changes.schema))


def _apply_changes(
    lake: Lake,
    connection: StoreWriter,
    tables: tuple[DeltaTable, DeltaTable, DeltaTable],
    meta: dict[str, str],
    target: _Target,
    runs: list[Run],
    run: Run,
) -> SyncResult:
    """Each table's changes (``images``, ``occurrences``, ``attributes``) since the versions
    the store records, written into ``run`` (the newest, above ``runs``)."""
    images, occurrences, attributes = tables
    result = SyncResult(False, "changes", target.images, target.occurrences, target.attributes)
    start = int(meta["images_version"]) + 1
    if start <= target.images:
        changes = _read_changes(lake, images, start, target.images, IMAGE_VIEW_COLUMNS_STORED)
        result.images_changed = _apply_images(connection, changes, run)
    start = int(meta["occurrences_version"]) + 1
    if start <= target.occurrences:
        columns = ["md5", "source_uri", *_SOURCE_KEY, "bucket"]
        changes = _read_changes(lake, occurrences, start, target.occurrences, columns)
        touched, lost = _apply_occurrences(connection, changes, run)
        result.occurrences_changed = touched
        result.refilled = _refill(lake, connection, lost, target.occurrences, [*runs, run])
    start = int(meta["attributes_version"]) + 1
    if start <= target.attributes:
        columns = ["md5", "origin", "attribute", "value", "value_type"]
        changes = _read_changes(lake, attributes, start, target.attributes, columns)
        result.attributes_changed = _apply_attributes(connection, changes, run)
    return result


#: The ``images`` table's columns the record is made of (the hash integers are derived).
IMAGE_VIEW_COLUMNS_STORED = [c for c in RECORD_COLUMNS if not c.endswith("_int")]
_HASHES = ("phash", "ahash", "dhash")
_STEP = "CASE _change_type WHEN 'insert' THEN 1 ELSE -1 END"
_ROWS = 50_000


def _record_rows(table: pa.Table | pa.RecordBatch) -> list[tuple[str, str]]:
    """(md5, record JSON) of each ``images`` row, built column by column: a dict per row
    costs several times more, and a shard's images are written each sync."""
    columns = {
        name: table.column(name).to_pylist()
        for name in IMAGE_VIEW_COLUMNS_STORED
        if name != "ingested_at"
    }
    for kind in _HASHES:
        columns[f"{kind}_int"] = [None if h is None else int(h, 16) for h in columns[kind]]
    columns["ingested_at"] = _texts(table.column("ingested_at"), datetime.isoformat).to_pylist()
    encode = json.JSONEncoder(separators=(",", ":")).encode
    values = zip(*(columns[c] for c in RECORD_COLUMNS), strict=True)
    return [(md5, encode(list(row))) for md5, row in zip(columns["md5"], values, strict=True)]


def _texts(column: pa.ChunkedArray | pa.Array, text: Callable[[datetime], str | None]) -> pa.Array:
    """Ingest times as text, converted once per distinct time (a shard has one or a few)."""
    distinct = pc.unique(column)
    texts = pa.array([None if t is None else text(t) for t in distinct.to_pylist()], pa.string())
    return pc.take(texts, pc.index_in(column, distinct))


def _stamps(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Ingest times as :func:`_stamp` text."""
    return _texts(column, _stamp)


def _tuples(relation: duckdb.DuckDBPyRelation) -> list[tuple]:
    """A result's rows as tuples, built column by column from Arrow (several times quicker
    than ``fetchall`` for the hundreds of thousands of rows of a shard)."""
    return list(_streamed(relation))


def _streamed(relation: duckdb.DuckDBPyRelation) -> Iterator[tuple]:
    """A result's rows as tuples, a batch of Arrow columns at a time (memory stays bounded
    however large the result)."""
    for batch in relation.to_arrow_reader(_ROWS):
        yield from zip(*(column.to_pylist() for column in batch.columns), strict=True)


def _stamp(value: datetime | None) -> str | None:
    """An ingest time as text that sorts as the time does (fixed width, UTC)."""
    return None if value is None else value.isoformat(timespec="microseconds")


@contextmanager
def _netting(**tables: pa.Table) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB over these Arrow tables: change rows are netted there, in bulk."""
    with duckdb.connect() as db:
        db.execute("SET TimeZone = 'UTC'")
        for name, table in tables.items():
            db.register(name, table)
        yield db


def _apply_images(connection: StoreWriter, changes: pa.Table, run: Run) -> int:
    """The last change of each md5: its row, or its removal (no record)."""
    rows = changes.append_column("_row", pa.array(range(changes.num_rows), pa.int64()))
    with _netting(changes=rows.select(["md5", "_change_type", "_commit_version", "_row"])) as db:
        last = db.sql(
            "SELECT _row FROM changes "
            "WHERE _change_type IN ('insert', 'update_postimage', 'delete') "
            "QUALIFY row_number() OVER (PARTITION BY md5 ORDER BY _commit_version DESC, "
            "_row DESC) = 1 ORDER BY md5"
        ).fetchnumpy()["_row"]
    kept = changes.take(pa.array(last, pa.int64()))
    deleted = pc.equal(kept.column("_change_type"), "delete")
    gone: list[tuple[str, str | None]] = [
        (m, None) for m in kept.filter(deleted).column("md5").to_pylist()
    ]
    written: list[tuple[str, str | None]] = [*_record_rows(kept.filter(pc.invert(deleted)))]
    connection.write(f"INSERT INTO {table('images', run)} VALUES (?, ?)", sorted(gone + written))
    return kept.num_rows


def _apply_occurrences(
    connection: StoreWriter, changes: pa.Table, run: Run
) -> tuple[int, list[tuple[str, int]]]:
    """Counts moved by the net change of each occurrence; new ones among the first sources
    of what they add, removed ones marked removed. Returns the md5s touched and those that lost
    one (with their bucket): their first sources may need refilling from the lake."""
    rows = changes.select(["md5", "shard", "ordinal", "source_uri", "bucket", "_change_type"])
    rows = rows.append_column("stamp", _stamps(changes.column("ingested_at")))
    with _netting(changes=rows) as db:
        db.execute(
            f"CREATE TABLE net AS SELECT md5, stamp, shard, ordinal, source_uri, "
            f"any_value(bucket) AS bucket, sum({_STEP}) AS n FROM changes "
            "WHERE md5 IS NOT NULL AND _change_type IN ('insert', 'delete') "
            "GROUP BY md5, stamp, shard, ordinal, source_uri HAVING sum(" + _STEP + ") <> 0"
        )
        counts = _tuples(
            db.sql(
                "SELECT md5, sum(n)::BIGINT FROM net GROUP BY md5 HAVING sum(n) <> 0 ORDER BY md5"
            )
        )
        lost = db.sql("SELECT DISTINCT md5, bucket FROM net WHERE n < 0 ORDER BY md5").fetchall()
        removed = _tuples(
            db.sql(
                "SELECT DISTINCT md5, stamp, shard, ordinal, NULL FROM net WHERE n < 0 "
                "ORDER BY md5, stamp, shard, ordinal"
            )
        )
        # Only the first few of an md5's new sources can be among its first few of all.
        added = _tuples(
            db.sql(
                "SELECT md5, stamp, shard, ordinal, source_uri FROM net WHERE n > 0 "
                "QUALIFY row_number() OVER (PARTITION BY md5 ORDER BY stamp NULLS FIRST, "
                f"shard NULLS FIRST, ordinal NULLS FIRST) <= {RECORD_SOURCES} "
                "ORDER BY md5, stamp, shard, ordinal"
            )
        )
    connection.write(f"INSERT INTO {table('counts', run)} VALUES (?, ?)", counts)
    sources = table("sources", run)
    connection.write(f"INSERT INTO {sources} VALUES (?, ?, ?, ?, ?)", removed)
    # An occurrence removed and added again (another URI) is the added one.
    connection.write(
        f"INSERT INTO {sources} VALUES (?, ?, ?, ?, ?) ON CONFLICT (md5, ingested_at, shard, "
        "ordinal) DO UPDATE SET source_uri = excluded.source_uri",
        added,
    )
    return len(counts), lost


def _refill(
    lake: Lake,
    connection: StoreWriter,
    lost: list[tuple[str, int]],
    version: int,
    runs: list[Run],
) -> int:
    """The first sources of md5s that lost some and now keep fewer than they have, read again
    from their buckets of ``occurrences`` as of ``version`` into the newest run (a shard
    replaced or emptied: rare)."""
    buckets = dict(lost)
    kept_sql = (
        f"SELECT count(*) FROM ({newest('sources', runs, 'source_uri', 'md5 = ?')}) latest "
        "WHERE source_uri IS NOT NULL"
    )
    count_sql = f"SELECT coalesce(sum(n), 0) FROM ({union('counts', runs, 'n', 'md5 = ?')}) u"
    short = []
    for md5 in buckets:
        kept = connection.execute(kept_sql, [md5] * len(runs))[0][0]
        count = connection.execute(count_sql, [md5] * len(runs))[0][0]
        if kept < min(RECORD_SOURCES, count):
            short.append(md5)
    if not short:
        return 0
    lake_table = DeltaTable(
        lake.uri("occurrences"), version=version, storage_options=dict(lake.storage_options)
    )
    wanted = pc.field("bucket").isin(sorted({buckets[m] for m in short})) & pc.field("md5").isin(
        short
    )
    rows = lake_table.to_pyarrow_dataset().to_table(
        filter=wanted, columns=["md5", *_SOURCE_KEY, "source_uri"]
    )
    rows = rows.append_column("stamp", _stamps(rows.column("ingested_at")))
    connection.write(
        f"INSERT INTO {table('sources', runs[-1])} VALUES (?, ?, ?, ?, ?) ON CONFLICT (md5, "
        "ingested_at, shard, ordinal) DO UPDATE SET source_uri = excluded.source_uri",
        _first_sources(rows),
    )
    return len(short)


def _first_sources(rows: pa.Table) -> list[tuple]:
    """The first :data:`RECORD_SOURCES` of each md5's occurrences (with their ``stamp``), as
    ``sources`` rows."""
    with _netting(occurrences=rows) as db:
        return _tuples(
            db.sql(
                "SELECT md5, stamp, shard, ordinal, source_uri FROM occurrences "
                "WHERE md5 IS NOT NULL QUALIFY row_number() OVER (PARTITION BY md5 ORDER BY "
                f"stamp NULLS FIRST, shard NULLS FIRST, ordinal NULLS FIRST) <= {RECORD_SOURCES} "
                "ORDER BY md5, stamp, shard, ordinal"
            )
        )


def _apply_attributes(connection: StoreWriter, changes: pa.Table, run: Run) -> int:
    """Each attribute value's count of carrying occurrences moved by the rows added and
    removed (netted: one row per value that moved)."""
    with _netting(changes=changes) as db:
        moved = _tuples(
            db.sql(
                f"SELECT md5, origin, attribute, value, value_type, sum({_STEP})::BIGINT AS n "
                "FROM changes WHERE _change_type IN ('insert', 'delete') "
                f"GROUP BY md5, origin, attribute, value, value_type HAVING sum({_STEP}) <> 0 "
                "ORDER BY md5, origin, attribute, value, value_type"
            )
        )
    connection.write(f"INSERT INTO {table('attributes', run)} VALUES (?, ?, ?, ?, ?, ?)", moved)
    return len(moved)


def _rebuild(lake: Lake, connection: StoreWriter, target: _Target, run: Run) -> SyncResult:
    """Every row again from the lake's tables at the target versions, streamed into ``run``
    (the only one)."""
    options = dict(lake.storage_options)
    tables: dict[str, DeltaTable] = {
        "images": DeltaTable(lake.uri("images"), version=target.images, storage_options=options),
        "attributes": DeltaTable(
            lake.uri("attributes"), version=target.attributes, storage_options=options
        ),
    }
    if target.occurrences >= 0:
        tables["occurrences"] = DeltaTable(
            lake.uri("occurrences"), version=target.occurrences, storage_options=options
        )
    with _netting(**{f"_{n}": t.to_pyarrow_dataset() for n, t in tables.items()}) as db:
        for batch in db.sql(
            f"SELECT {', '.join(IMAGE_VIEW_COLUMNS_STORED)} FROM _images ORDER BY md5"
        ).to_arrow_reader(_ROWS):
            connection.write(
                f"INSERT INTO {table('images', run)} VALUES (?, ?)", _record_rows(batch)
            )
        if "occurrences" in tables:
            connection.write(
                f"INSERT INTO {table('counts', run)} VALUES (?, ?)",
                _streamed(
                    db.sql(
                        "SELECT md5, count(*) FROM _occurrences WHERE md5 IS NOT NULL "
                        "GROUP BY md5 ORDER BY md5"
                    )
                ),
            )
            first = db.sql(
                "SELECT md5, ingested_at, shard, ordinal, source_uri FROM _occurrences "
                "WHERE md5 IS NOT NULL QUALIFY row_number() OVER (PARTITION BY md5 ORDER BY "
                f"ingested_at, shard, ordinal) <= {RECORD_SOURCES} "
                "ORDER BY md5, ingested_at, shard, ordinal"
            ).to_arrow_reader(_ROWS)
            for batch in first:
                stamps = _stamps(batch.column("ingested_at")).to_pylist()
                connection.write(
                    f"INSERT INTO {table('sources', run)} VALUES (?, ?, ?, ?, ?)",
                    zip(
                        batch.column("md5").to_pylist(),
                        stamps,
                        batch.column("shard").to_pylist(),
                        batch.column("ordinal").to_pylist(),
                        batch.column("source_uri").to_pylist(),
                        strict=True,
                    ),
                )
        connection.write(
            f"INSERT INTO {table('attributes', run)} VALUES (?, ?, ?, ?, ?, ?)",
            _streamed(
                db.sql(
                    "SELECT md5, origin, attribute, value, value_type, count(*) FROM _attributes "
                    "GROUP BY ALL ORDER BY ALL"
                )
            ),
        )
    images_rows = connection.execute(f"SELECT count(*) FROM {table('images', run)}")[0][0]
    return SyncResult(
        True, "", target.images, target.occurrences, target.attributes, images_changed=images_rows
    )
