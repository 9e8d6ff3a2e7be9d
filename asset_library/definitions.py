"""The Dagster code location: every asset, check, job, sensor and schedule, gathered here."""

from collections.abc import Mapping
from typing import Any

import dagster as dg

from asset_library.defs.assets import ingestion, library
from asset_library.defs.jobs import (
    audit_library_job,
    compact_library_job,
    ingest_shard_job,
    plan_batch_job,
    refresh_library_job,
)
from asset_library.defs.resources import build_resources
from asset_library.defs.schedules import retry_failed_shards
from asset_library.defs.sensors import landing_sensor, library_automation, shard_sensor


def build_definitions(resources: Mapping[str, Any] | None = None) -> dg.Definitions:
    """The code location; resources default to what the environment describes."""
    return dg.Definitions(
        assets=dg.load_assets_from_modules([ingestion, library]),
        jobs=[
            plan_batch_job,
            ingest_shard_job,
            refresh_library_job,
            compact_library_job,
            audit_library_job,
        ],
        sensors=[landing_sensor, shard_sensor, library_automation],
        schedules=[retry_failed_shards],
        resources=dict(resources) if resources is not None else build_resources(),
        # Per-step subprocesses re-import the code (~50 s a shard run here); shards run side
        # by side as concurrent runs instead, bounded in dagster.yaml.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
