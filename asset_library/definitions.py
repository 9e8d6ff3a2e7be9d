"""The Dagster code location: every module under ``defs/`` is loaded, as ``dg`` expects.

A file added to ``defs/`` is part of the code location without being listed here."""

import contextvars
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg


def load_defs() -> dg.Definitions:
    """Everything under ``defs/``: assets, checks, jobs, sensors, schedules, the resources the
    environment describes (``defs/resources.py``) and the executor (``defs/execution.py``)."""
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)


def build_definitions(resources: Mapping[str, Any] | None = None) -> dg.Definitions:
    """The code location; ``resources`` replace the environment's (tests, the CLI's runs).

    Built outside a code server, loading would consult the state store of the most recently
    entered Dagster instance (a context variable its exit leaves set), closed or not; this
    project keeps no state there, so loading runs in a fresh context where none is set.
    """
    loaded = contextvars.Context().run(load_defs)
    if resources is None:
        return loaded
    return dg.Definitions(
        assets=loaded.assets,
        asset_checks=loaded.asset_checks,
        jobs=loaded.jobs,
        sensors=loaded.sensors,
        schedules=loaded.schedules,
        executor=loaded.executor,
        loggers=loaded.loggers,
        metadata=loaded.metadata,
        component_tree=loaded.component_tree,
        resources=dict(resources),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return load_defs()
