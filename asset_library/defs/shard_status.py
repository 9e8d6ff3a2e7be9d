"""A shard's state, judged by every output of its run, as ``status`` and the retry schedule
see it.

The shard's outputs are one multi-asset and normally agree; a shard ingested before they were
one (keys written, lake rows failed) shows failed or partial here, never materialized.

One status query per output asset for all the shards at once: the cost of a query is mostly
reading the asset's status cache, whatever the number of keys asked for (4,000 shards: 0.3 s,
``benchmarks/status.py``)."""

from collections.abc import Sequence

import dagster as dg

from asset_library.defs.partitions import SHARD_OUTPUTS, shards_partitions

Status = dg.AssetPartitionStatus


def shard_statuses(instance: dg.DagsterInstance, shards: Sequence[str]) -> dict[str, Status | None]:
    """Each shard's state: in progress if any output is, else failed if any output failed,
    materialized only if every output is; ``None`` for a shard with an output never written."""
    return {shard: _combined(found) for shard, found in _by_shard(instance, shards).items()}


def shard_states(instance: dg.DagsterInstance, shards: Sequence[str]) -> dict[str, str]:
    """Each shard's state as ``status`` prints it: ``materialized`` (every output),
    ``in_progress``, ``failed`` (its last run failed), ``partial`` (some outputs only, e.g. a
    run killed between them) or ``missing``."""
    states = {}
    for shard, found in _by_shard(instance, shards).items():
        combined = _combined(found)
        if combined is not None:
            states[shard] = combined.value.lower()
        else:
            states[shard] = "partial" if any(found) else "missing"
    return states


def _by_shard(instance: dg.DagsterInstance, shards: Sequence[str]) -> dict[str, list]:
    if not shards:
        return {}
    by_output = [
        instance.get_status_by_partition(dg.AssetKey(key), list(shards), shards_partitions) or {}
        for key in SHARD_OUTPUTS
    ]
    return {shard: [statuses.get(shard) for statuses in by_output] for shard in shards}


def _combined(statuses: list[Status | None]) -> Status | None:
    for state in (Status.IN_PROGRESS, Status.FAILED):
        if state in statuses:
            return state
    if all(state == Status.MATERIALIZED for state in statuses):
        return Status.MATERIALIZED
    return None
