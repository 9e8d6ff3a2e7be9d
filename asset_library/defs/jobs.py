"""Jobs: plan a batch, ingest one shard, refresh the library."""

import dagster as dg

from asset_library.defs.assets.ingestion import (
    base_table,
    batch_plan,
    cube_table,
    shard_keys_and_uploads,
)
from asset_library.defs.assets.library import catalog

#: Runs that write library-wide files carry this tag; dagster.yaml lets one run at a time.
SERIAL_TAG = {"asset_library/serial": "library"}

plan_batch_job = dg.define_asset_job(
    "plan_batch",
    selection=[batch_plan],
    description="Plan one batch into shards (partition: the batch).",
)

ingest_shard_job = dg.define_asset_job(
    "ingest_shard",
    selection=[shard_keys_and_uploads, base_table, cube_table],
    description="Ingest one shard: keys and uploads, then its base and cube rows.",
)

refresh_library_job = dg.define_asset_job(
    "refresh_library",
    selection=dg.AssetSelection.assets(catalog).downstream(),
    tags=SERIAL_TAG,
    description="Rebuild the catalog (and what depends on it) and run the library's checks.",
)
