"""The lake's handle: where a library's tables are, how to open (or create) them, and how
their files are written.

A lake is a folder or an ``s3://bucket/prefix`` holding the Delta Lake tables (delta-rs) of
:mod:`.schemas`. Opening one never reads data; a table is created on first use, with an empty
append so a copied lake stays self-contained. The writers of :mod:`.shard_writes`,
:mod:`.merge` and :mod:`.compaction` share this module's row-group sizes and page setting, so a
table's files look the same whichever of them wrote them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import ColumnProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

# numpy's own switch for madvise(MADV_HUGEPAGE) on large arrays: private, untyped, and the
# only way to keep a writer's arrays on ordinary pages (see small_pages).
from numpy._core.multiarray import _set_madvise_hugepage  # type: ignore[attr-defined]

from asset_library.lake.schemas import (
    ATTRIBUTE_INDEX_SCHEMA,
    CHANGE_FEED,
    INDEX_ORDER,
    INDEX_SQL,
    PARTITIONS,
    SCHEMAS,
    SORTED_BY_MD5,
)
from asset_library.layout import LibraryLayout
from asset_library.s3 import delta_storage_options, is_s3

logger = logging.getLogger(__name__)

#: Tries of a write refused by another writer's commit that left the table's shape as it was
#: (:func:`write_settled`).
WRITE_ATTEMPTS = 3


@dataclass(frozen=True)
class Lake:
    """The lake of one library: a folder or an ``s3://bucket/prefix``, and how to reach it."""

    location: str
    n_buckets: int
    storage_options: Mapping[str, str] = field(default_factory=dict)
    #: A local folder for the cache of the md5s ``images`` holds (:mod:`.keyset`); ``None``:
    #: every merge reads the md5 column of the buckets it touches.
    image_keys: Path | None = None
    #: The library whose home keeps the key cache durable beside the lake (``None``: the
    #: cache stays in ``image_keys`` alone).
    layout: LibraryLayout | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, layout: LibraryLayout, environ: Mapping[str, str] | None = None) -> Lake:
        """The library's lake: ``ASSET_LIBRARY_LAKE``, else the one recorded in library.json
        (only ever an ``s3://`` URI, never a local path), else ``<library>/lake``."""
        environ = os.environ if environ is None else environ
        location = (
            environ.get("ASSET_LIBRARY_LAKE")
            or layout.settings().get("lake")
            or layout.lake_location
        )
        options = delta_storage_options(environ) if is_s3(location) else {}
        return cls(location.rstrip("/"), layout.n_buckets, options, layout.image_keys_dir, layout)

    @property
    def is_s3(self) -> bool:
        return is_s3(self.location)

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
                    **writer_options(table),
                )
            return DeltaTable(self.uri(table), storage_options=dict(self.storage_options))
        if not self.is_s3:
            Path(self.uri(table)).mkdir(parents=True, exist_ok=True)
        configuration = {"delta.enableChangeDataFeed": "true"} if table in CHANGE_FEED else None
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
                **writer_options(table),
                storage_options=dict(self.storage_options),
            )
        return DeltaTable(self.uri(table), storage_options=dict(self.storage_options))

    def ensure(self, tables: Iterable[str] = tuple(SCHEMAS)) -> None:
        """Create each of these tables (default: all) that does not exist yet."""
        for name in tables:
            self.table(name)


def write_settled(lake: Lake, table: str, write: Callable[[DeltaTable], None]) -> DeltaTable:
    """Run ``write`` against the table as of now and return the table as of its commit; a
    commit refused by another writer's commit that left the table's schema, partitioning and
    settings as they were is run again against the newer version (up to
    :data:`WRITE_ATTEMPTS` times).

    Why: writers that find a table missing all create it, and delta-rs lands each later
    creation as the next version (protocol and metadata again, the same shape). Every writer
    that read the table before such a commit is refused ("Metadata changed since last
    commit"), though nothing it wrote against changed: machines that start their first shards
    side by side on a new lake meet it. ``write`` must be whole when run again (a shard's rows
    replaced by predicate are). A refused attempt's data files are in no commit: the full
    vacuum of :func:`.compaction.compact` removes them."""
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        target = lake.table(table)
        try:
            write(target)
        except CommitFailedError as error:
            if attempt == WRITE_ATTEMPTS or _shape(lake.table(table)) != _shape(target):
                raise
            logger.info(
                "%s: commit refused (%s), the table's shape unchanged: writing again", table, error
            )
            continue
        return target  # as of its own commit (a later writer's is not reported as ours)
    raise AssertionError("unreachable")


def _shape(table: DeltaTable) -> tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]:
    """What a write is checked against: schema, partition columns and settings."""
    metadata = table.metadata()
    return (
        table.schema().to_json(),
        tuple(metadata.partition_columns),
        tuple(sorted(metadata.configuration.items())),
    )


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


#: Rows per Parquet row group of the tables a lookup reads by md5 (``images``, ``occurrences``
#: and the cube, each written sorted by md5): a lookup reads one row group of each file.
BY_MD5_ROW_GROUP = 4096
#: Rows per Parquet row group of ``attribute_index``: a value's rows are contiguous, so larger
#: groups only cost the rows read around its two ends.
ATTRIBUTE_INDEX_ROW_GROUP = 16_384


def writer_options(table: str) -> dict[str, Any]:
    """``write_deltalake``'s writer keyword for a table: none where delta-rs's defaults serve."""
    properties = writer_properties(table)
    return {} if properties is None else {"writer_properties": properties}


def writer_properties(table: str) -> WriterProperties | None:
    if table == "attribute_index":  # sorted by value: an image's own columns recur in no run
        unique = ColumnProperties(dictionary_enabled=False)
        return WriterProperties(
            max_row_group_size=ATTRIBUTE_INDEX_ROW_GROUP,
            compression="ZSTD",
            column_properties={"md5": unique, "source_uri": unique},
        )
    if table in SORTED_BY_MD5:
        return WriterProperties(max_row_group_size=BY_MD5_ROW_GROUP, compression="ZSTD")
    return None


def parquet_options(table: str) -> dict[str, Any]:
    """``pyarrow.parquet.ParquetWriter``'s keywords for the files compaction writes: the
    compression and dictionary columns of :func:`writer_properties` (delta-rs's defaults,
    snappy with dictionaries, where it sets none)."""
    if table == "attribute_index":
        unique = {"md5", "source_uri"}
        columns = [f.name for f in SCHEMAS[table] if f.name not in unique]
        return {"compression": "zstd", "use_dictionary": columns}
    if table in SORTED_BY_MD5:
        return {"compression": "zstd"}
    return {"compression": "snappy"}


def parquet_row_group(table: str) -> int:
    """Rows per row group of :func:`writer_properties` (delta-rs's default where it sets none)."""
    if table == "attribute_index":
        return ATTRIBUTE_INDEX_ROW_GROUP
    if table in SORTED_BY_MD5:
        return BY_MD5_ROW_GROUP
    return 1 << 20


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
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


def row_count(table: DeltaTable | None) -> int:
    """Rows in a table from the log's per-file counts: no data file is read."""
    if table is None:
        return 0
    actions = pa.table(table.get_add_actions(flatten=True))
    return int(pc.sum(actions["num_records"]).as_py() or 0) if actions.num_rows else 0
