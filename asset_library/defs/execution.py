"""How runs execute: every step in the run's own process.

Per-step subprocesses re-import the code (~50 s a shard run on 2 cores); shards run side by
side as concurrent runs instead, bounded in dagster.yaml."""

import dagster as dg


@dg.definitions
def execution() -> dg.Definitions:
    return dg.Definitions(executor=dg.in_process_executor)
