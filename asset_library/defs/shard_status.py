"""A shard's state, judged by every output of its run, as ``status`` and the retry schedule
see it.

The shard's outputs are one multi-asset and normally agree; a shard ingested before they were
one (keys written, lake rows failed) shows failed or missing here, never materialized."""

from collections.abc import Sequence

import dagster as dg

from asset_library.defs.assets.ingestion import SHARD_OUTPUTS
from asset_library.defs.partitions import shards_partitions

Status = dg.AssetPartitionStatus


def shard_statuses(instance: dg.DagsterInstance, shards: Sequence[str]) -> dict[str, Status | None]:
    """Each shard's state: in progress if any output is, else failed if any output failed,
    materialized only if every output is; ``None`` for a shard with an output never written."""
    if not shards:
        return {}
    by_output = [
        instance.get_status_by_partition(dg.AssetKey(key), list(shards), shards_partitions) or {}
        for key in SHARD_OUTPUTS
    ]
    return {shard: _combined([statuses.get(shard) for statuses in by_output]) for shard in shards}


def _combined(statuses: list[Status | None]) -> Status | None:
    for state in (Status.IN_PROGRESS, Status.FAILED):
        if state in statuses:
            return state
    if all(state == Status.MATERIALIZED for state in statuses):
        return Status.MATERIALIZED
    return None
