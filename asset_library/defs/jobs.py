"""Jobs: plan a batch, ingest one shard, refresh the library, compact it, audit it."""

import dagster as dg

from asset_library.defs.partitions import SHARD_OUTPUTS
from asset_library.defs.tags import SERIAL_TAG, SERIAL_VALUE

#: Runs that write library-wide files: one at a time (dagster.yaml).
SERIAL_TAGS = {SERIAL_TAG: SERIAL_VALUE}

plan_batch_job = dg.define_asset_job(
    "plan_batch",
    selection=["batch_plan"],
    description="Plan one batch into shards (partition: the batch).",
)

ingest_shard_job = dg.define_asset_job(
    "ingest_shard",
    selection=list(SHARD_OUTPUTS),
    description="Ingest one shard, whole: keys and uploads (checked), then its rows in the "
    "lake's occurrences, rejects and attributes tables (one commit each).",
)

refresh_library_job = dg.define_asset_job(
    "refresh_library",
    selection=["images", "similarity_index", "near_duplicate_groups", "serving_store"],
    tags=SERIAL_TAGS,
    description="Merge the shards that landed into images (touched buckets only), then bring "
    "the similarity index, the near-duplicate groups and the serving store level with it.",
)

compact_library_job = dg.define_asset_job(
    "compact_library",
    selection=["lake_compaction"],
    tags=SERIAL_TAGS,
    description="Compact every table's buckets by size tiers and vacuum replaced files.",
)

audit_library_job = dg.define_asset_job(
    "audit_library",
    selection=["library_audit"],
    tags=SERIAL_TAGS,
    description="The library-wide checks: md5 unique, hash coverage, uploads present, "
    "attribute keys among images, each occurrence counted once.",
)
