"""The lake (Delta Lake tables by bucket) and the catalog that reads it."""

from asset_library.lake.catalog import MACROS, NEAR_DUPLICATES_SCHEMA, VIEWS, Catalog
from asset_library.lake.tables import (
    DERIVED_ATTRIBUTES,
    SCHEMAS,
    Lake,
    MergeResult,
    compact,
    merge_images,
    merged_version,
    shards_not_merged,
    write_shard,
)

__all__ = [
    "DERIVED_ATTRIBUTES",
    "MACROS",
    "NEAR_DUPLICATES_SCHEMA",
    "SCHEMAS",
    "VIEWS",
    "Catalog",
    "Lake",
    "MergeResult",
    "compact",
    "merge_images",
    "merged_version",
    "shards_not_merged",
    "write_shard",
]
