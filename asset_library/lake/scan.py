"""A lake table as a pyarrow dataset that DuckDB (or pyarrow alone) filters down to the files.

Each table is read through its Delta log (the live files), each file tagged with its bucket, and
declared with the table's schema, text as ``string``. Files written by ``write_deltalake`` or
compaction hold text as ``string``; files delta-rs's MERGE writes (``images``) hold it as
``string_view`` in their embedded Arrow schema, and pyarrow cannot compare their row-group
statistics with a plain string (``no kernel matching input types (string, string_view)``). So
:meth:`LakeDataset.scanner` pushes a filter on text down only to files of the first kind; the
second kind are pruned by bucket and filtered after the read. DuckDB's public
``connection.register`` scans a pyarrow dataset through its ``scanner``, so every filter DuckDB
pushes gets here, and no DuckDB-private hook is needed.

The partition column comes first in the dataset's schema: a query that reads no column
(``count(*)``) makes DuckDB ask for the first one, and the partition column is answered from the
log's per-file row counts without opening a file (``md5`` first read every md5 of the table).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from deltalake import DeltaTable
from pyarrow import fs

from asset_library.lake.schemas import PARTITIONS
from asset_library.lake.table import Lake


def _is_view(kind: pa.DataType) -> bool:
    return pa.types.is_string_view(kind) or pa.types.is_binary_view(kind)


def _is_text(kind: pa.DataType) -> bool:
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    )


def plain_schema(schema: pa.Schema) -> pa.Schema:
    """The schema with view types as their plain kinds (what the dataset declares)."""
    return pa.schema(
        [
            field.with_type(pa.string() if pa.types.is_string_view(field.type) else pa.binary())
            if _is_view(field.type)
            else field
            for field in schema
        ],
        metadata=schema.metadata,
    )


class LakeDataset(pds.FileSystemDataset):
    """Live files of one table; its scanner applies every filter it is given, pushed down to
    the Parquet reader wherever pyarrow can compare the files' statistics."""

    _views: dict[str, bool]
    #: Rows per file path, from the Delta log (empty when the log does not record them).
    _rows: dict[str, int]
    #: The partition column (first in the schema).
    _partition: str

    def of_files(self, fragments: list[pds.Fragment]) -> LakeDataset:
        """These of its files, with the same schema (and what is known of their types)."""
        found = LakeDataset(fragments, self.schema, self.format, self.filesystem)
        found._views = self._view_cache()
        found._rows = getattr(self, "_rows", {})
        found._partition = getattr(self, "_partition", "")
        return found

    def scanner(
        self,
        columns: list[str] | None = None,
        filter: pc.Expression | None = None,  # noqa: A002 - pyarrow's own keyword
        **options: Any,
    ) -> pds.Scanner:
        base = pds.FileSystemDataset.scanner
        counted = self._counted(columns, filter)
        if counted is not None:
            return counted
        if filter is None:
            return base(self, columns=columns, **options)
        mentioned = str(filter)  # a superset of the columns it reads: names may occur in text
        text = [f.name for f in self.schema if f.name in mentioned and _is_text(f.type)]
        if not text:
            return base(self, columns=columns, filter=filter, **options)
        fragments = list(self.get_fragments(filter=filter))  # pruned by bucket
        viewed = [f for f in fragments if self._holds_views(f)]
        plain = [f for f in fragments if not self._holds_views(f)]
        pushed = base(self._plain_subset(plain), columns=columns, filter=filter, **options)
        if not viewed:
            return pushed
        names = self.schema.names if columns is None else list(columns)
        read = names + [n for n in self.schema.names if n in mentioned and n not in names]
        raw = base(self._plain_subset(viewed), columns=read, **options)
        after = pds.Scanner.from_batches(raw.to_reader(), columns=names, filter=filter)
        schema = pushed.projected_schema

        def batches() -> Iterator[pa.RecordBatch]:
            yield from pushed.to_reader()
            yield from after.to_reader()

        return pds.Scanner.from_batches(pa.RecordBatchReader.from_batches(schema, batches()))

    def _counted(
        self,
        columns: list[str] | None,
        filter: pc.Expression | None,  # noqa: A002
    ) -> pds.Scanner | None:
        """The partition column alone, under a filter on it alone, from the log's row counts
        (no file opened); ``None`` when the scan needs the files."""
        partition = getattr(self, "_partition", "")
        if not partition or columns != [partition]:
            return None
        if filter is not None and any(
            f.name in str(filter) for f in self.schema if f.name != partition
        ):
            return None
        rows = getattr(self, "_rows", {})
        fragments = list(self.get_fragments(filter=filter))
        if any(f.path not in rows for f in fragments):
            return None
        field = self.schema.field(partition)
        values = [pds.get_partition_keys(f.partition_expression).get(partition) for f in fragments]
        if any(v is None for v in values):
            return None
        schema = pa.schema([field])
        kinds = np.asarray(values, dtype=field.type.to_pandas_dtype())
        counts = np.asarray([rows[f.path] for f in fragments], dtype=np.int64)

        def batches() -> Iterator[pa.RecordBatch]:
            # About a million rows at a time (a file's at least): memory stays flat.
            start = 0
            while start < len(fragments):
                end = start + 1
                while end < len(fragments) and counts[start:end].sum() < 1 << 20:
                    end += 1
                column = np.repeat(kinds[start:end], counts[start:end])
                yield pa.record_batch([pa.array(column, field.type)], schema=schema)
                start = end

        return pds.Scanner.from_batches(pa.RecordBatchReader.from_batches(schema, batches()))

    def _plain_subset(self, fragments: list[pds.Fragment]) -> pds.FileSystemDataset:
        return pds.FileSystemDataset(fragments, self.schema, self.format, self.filesystem)

    def _view_cache(self) -> dict[str, bool]:
        if not hasattr(self, "_views"):
            self._views = {}
        return self._views

    def _holds_views(self, fragment: pds.Fragment) -> bool:
        """Whether the file holds text as string_view (read once from its footer)."""
        cache = self._view_cache()
        found = cache.get(fragment.path)
        if found is None:
            found = any(_is_view(f.type) for f in fragment.physical_schema)
            cache[fragment.path] = found
        return found


def lake_dataset(table: DeltaTable, lake: Lake) -> LakeDataset:
    """A dataset of the table's live files (from its log), each tagged with its bucket (or
    partition), so a ``bucket = N`` filter opens one bucket's files. Local files are read
    through pyarrow's own filesystem (cheaper per file than delta-rs's Python wrapper)."""
    name = table.table_uri.rstrip("/").rsplit("/", 1)[-1]
    column = PARTITIONS[name]
    declared = plain_schema(pa.schema(table.schema().to_arrow()))
    schema = pa.schema(
        [declared.field(column), *(f for f in declared if f.name != column)],
        metadata=declared.metadata,
    )
    actions = pa.table(table.get_add_actions(flatten=True))
    if lake.is_s3:
        found = table.to_pyarrow_dataset()
        dataset = LakeDataset(list(found.get_fragments()), schema, found.format, found.filesystem)
        return _with_row_counts(dataset, actions, column)
    root = Path(lake.uri(name))
    parquet = pds.ParquetFileFormat()
    local = fs.LocalFileSystem()
    fragments = [
        parquet.make_fragment(
            str(root / path),
            local,
            partition_expression=(
                pc.field(column).is_null()
                if bucket is None
                else pc.field(column) == pa.scalar(int(bucket), pa.int32())
            ),
        )
        for path, bucket in zip(
            actions["path"].to_pylist(), actions[f"partition.{column}"].to_pylist(), strict=True
        )
    ]
    return _with_row_counts(LakeDataset(fragments, schema, parquet, local), actions, column)


def _with_row_counts(dataset: LakeDataset, actions: pa.Table, partition: str) -> LakeDataset:
    """The dataset, told each file's rows as the log records them (by file name: the log's
    paths are relative, a fragment's are not) and its partition column."""
    dataset._partition = partition
    dataset._rows = {}
    if "num_records" not in actions.column_names or actions["num_records"].null_count:
        return dataset
    by_name = dict(
        zip(
            (Path(p).name for p in actions["path"].to_pylist()),
            actions["num_records"].to_pylist(),
            strict=True,
        )
    )
    dataset._rows = {
        f.path: by_name[Path(f.path).name]
        for f in dataset.get_fragments()
        if Path(f.path).name in by_name
    }
    return dataset


# --------------------------------------------------------------------------------------------
# Reading keys: a lookup's rows, md5 column first

#: Footers of the files keys were read from, by path (a Delta data file never changes): a warm
#: lookup parses none. Bounded: enough for every file of three tables at 256 buckets and 5
#: files per bucket.
_FOOTERS: OrderedDict[str, tuple[pq.FileMetaData, list[tuple[str, str] | None]]] = OrderedDict()
_FOOTERS_KEPT = 4096
_FOOTERS_LOCK = threading.Lock()  # libraries on several threads (the HTTP service) share it


def _footer(
    fragment: pds.ParquetFileFragment,
) -> tuple[pq.FileMetaData, list[tuple[str, str] | None]]:
    """The file's footer and each row group's md5 (min, max) (None where not recorded)."""
    with _FOOTERS_LOCK:
        found = _FOOTERS.get(fragment.path)
        if found is not None:
            _FOOTERS.move_to_end(fragment.path)
            return found
    with fragment.filesystem.open_input_file(fragment.path) as source:
        metadata = pq.ParquetFile(source).metadata
    column = metadata.schema.names.index("md5")
    ranges: list[tuple[str, str] | None] = []
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(column).statistics
        known = stats is not None and stats.has_min_max and isinstance(stats.min, str)
        ranges.append((stats.min, stats.max) if known else None)
    found = (metadata, ranges)
    with _FOOTERS_LOCK:
        _FOOTERS[fragment.path] = found
        if len(_FOOTERS) > _FOOTERS_KEPT:
            _FOOTERS.popitem(last=False)
    return found


def read_keys(
    fragments: list[pds.ParquetFileFragment], md5s: list[str], schema: pa.Schema, partition: str
) -> pa.Table:
    """The rows of these md5s in these files, as ``schema``.

    Per file, only the row groups whose md5 statistics may hold one of them, and of those the
    md5 column alone first: the other columns are decoded only where a key is found. A key is
    in one or two of a bucket's files, so most files cost a footer lookup (cached) and one
    column of one row group. (A pyarrow dataset scan decodes every column of every row group
    its statistics leave, half of a lookup's time.)
    """
    wanted = sorted(set(md5s))
    value_set = pa.array(wanted, pa.string())
    found: list[pa.Table] = []
    for fragment in fragments:
        metadata, ranges = _footer(fragment)
        groups = [
            group
            for group, span in enumerate(ranges)
            if span is None
            or bisect.bisect_left(wanted, span[0]) < bisect.bisect_right(wanted, span[1])
        ]
        if not groups:
            continue
        in_file = set(metadata.schema.names)
        with fragment.filesystem.open_input_file(fragment.path) as source:
            reader = pq.ParquetFile(source, metadata=metadata, pre_buffer=False)
            for group in groups:
                # One column of one row group: threads cost more than they save (0.4 ms
                # against 0.7 ms per probe).
                keys = reader.read_row_group(group, columns=["md5"], use_threads=False)["md5"]
                hit = pc.is_in(keys.cast(pa.string()), value_set=value_set)
                if not pc.any(hit).as_py():
                    continue
                columns = [n for n in schema.names if n in in_file]
                rows = reader.read_row_group(group, columns=columns)
                # as plain text before the filter: pyarrow cannot take from a string_view
                found.append(_as_schema(rows, schema, fragment, partition).filter(hit))
    if not found:
        return schema.empty_table()
    return pa.concat_tables(found)


def _as_schema(
    rows: pa.Table, schema: pa.Schema, fragment: pds.Fragment, partition: str
) -> pa.Table:
    """A file's rows in ``schema``: its partition value as a column (Delta keeps it out of the
    file), a column the file predates as nulls, text views as plain text."""
    value = pds.get_partition_keys(fragment.partition_expression).get(partition)
    columns = []
    for field in schema:
        if field.name in rows.column_names:
            columns.append(rows[field.name].cast(field.type))
        elif field.name == partition and value is not None:
            columns.append(pa.repeat(pa.scalar(value, field.type), rows.num_rows))
        else:
            columns.append(pa.nulls(rows.num_rows, field.type))
    return pa.table(columns, schema=schema)
