"""The lake (Delta Lake tables by bucket) and the catalog that reads it.

One module per concern, each importing only those listed before it: :mod:`.keyset` (the
merge's cache of the md5s ``images`` holds), :mod:`.schemas` (what the tables hold),
:mod:`.table` (the :class:`Lake` handle), :mod:`.scan` (a table as a pyarrow dataset),
:mod:`.shard_writes` (a shard's rows), :mod:`.tiers` (which files compaction merges),
:mod:`.compaction` (maintenance), :mod:`.history` (which commits changed rows),
:mod:`.merge` (the ``images`` merge), :mod:`.recount` (its audit and repair) and
:mod:`.catalog` (the DuckDB views and macros). Callers import the public names from here.
"""

from asset_library.lake.catalog import MACROS, NEAR_DUPLICATES_SCHEMA, VIEWS, Catalog
from asset_library.lake.compaction import VACUUM_RETENTION_HOURS, compact, lake_files
from asset_library.lake.history import rows_unchanged_since
from asset_library.lake.merge import (
    CRASH_AT,
    IMAGES_APP,
    MergeResult,
    counted_version,
    merge_images,
    merged_version,
    read_changes,
    shards_not_merged,
)
from asset_library.lake.schemas import (
    DERIVED,
    DERIVED_ATTRIBUTES,
    IMAGE_COUNTS_SCHEMA,
    IMAGE_FACT_COLUMNS,
    IMAGES_SCHEMA,
    MANIFEST,
    ORIGINS,
    PARTITIONS,
    PROVENANCE_COLUMNS,
    SCHEMAS,
    SHARD_MARK,
    TIMESTAMP,
    attribute_part_sql,
    provenance,
)
from asset_library.lake.shard_writes import SHARD_TABLES, value_type_of, write_shard
from asset_library.lake.table import Lake, is_outdated_index, row_count

__all__ = [
    "rows_unchanged_since",
    "CRASH_AT",
    "DERIVED",
    "DERIVED_ATTRIBUTES",
    "IMAGES_APP",
    "IMAGES_SCHEMA",
    "IMAGE_COUNTS_SCHEMA",
    "IMAGE_FACT_COLUMNS",
    "MACROS",
    "MANIFEST",
    "NEAR_DUPLICATES_SCHEMA",
    "ORIGINS",
    "PARTITIONS",
    "PROVENANCE_COLUMNS",
    "SCHEMAS",
    "SHARD_MARK",
    "SHARD_TABLES",
    "TIMESTAMP",
    "VACUUM_RETENTION_HOURS",
    "VIEWS",
    "Catalog",
    "Lake",
    "MergeResult",
    "attribute_part_sql",
    "compact",
    "counted_version",
    "is_outdated_index",
    "lake_files",
    "merge_images",
    "merged_version",
    "provenance",
    "read_changes",
    "row_count",
    "shards_not_merged",
    "value_type_of",
    "write_shard",
]
