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
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from deltalake import DeltaTable
from pyarrow import fs

from asset_library.lake.tables import PARTITIONS, Lake


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

    def of_files(self, fragments: list[pds.Fragment]) -> LakeDataset:
        """These of its files, with the same schema (and what is known of their types)."""
        found = LakeDataset(fragments, self.schema, self.format, self.filesystem)
        found._views = self._view_cache()
        return found

    def scanner(  # type: ignore[override]
        self,
        columns: list[str] | None = None,
        filter: pc.Expression | None = None,  # noqa: A002 - pyarrow's own keyword
        **options: Any,
    ) -> pds.Scanner:
        base = pds.FileSystemDataset.scanner
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
    schema = plain_schema(pa.schema(table.schema().to_arrow()))
    if lake.is_s3:
        found = table.to_pyarrow_dataset()
        return LakeDataset(list(found.get_fragments()), schema, found.format, found.filesystem)
    actions = pa.table(table.get_add_actions(flatten=True))
    name = table.table_uri.rstrip("/").rsplit("/", 1)[-1]
    column = PARTITIONS[name]
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
    return LakeDataset(fragments, schema, parquet, local)
