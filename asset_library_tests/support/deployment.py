"""A deployed library for tests of the deploy profiles: a folder laid out like a clone, a batch
landed in it, the environment its Dagster processes run with, and waiting on what they do.

The working folder holds ``workspace.yaml`` beside the library, whose Dagster instance is
``library/.dagster``: the documented commands run there verbatim.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dagster as dg

from asset_library_tests.support.dagster_processes import script

REPO = Path(__file__).resolve().parents[2]
#: Variables of the calling environment a deployed process must not inherit: it gets its own.
_OWN_PREFIXES = ("AWS_", "S3_", "DAGSTER_", "ASSET_LIBRARY_", "RAY_")


class Watched(Protocol):
    """A process a wait gives up on when it dies, and whose log it shows when it times out."""

    log_path: Path

    def check_alive(self) -> None: ...

    def tail(self) -> str: ...


@dataclass(frozen=True)
class Clone:
    """The working folder (``workspace.yaml``), the library in it and its Dagster home."""

    folder: Path
    root: Path
    home: Path

    def land(self, batch: str, images: list[tuple[Path, str]]) -> Path:
        """The images copied into ``landing/<batch>`` (numbered, so the plan keeps their
        order), without its ``_READY`` marker."""
        landed = self.root / "landing" / batch
        landed.mkdir(parents=True)
        for number, (path, _) in enumerate(images):
            shutil.copyfile(path, landed / f"{number:02d}_{path.name}")
        return landed


def make_clone(folder: Path) -> Clone:
    shutil.copyfile(REPO / "workspace.yaml", folder / "workspace.yaml")
    root = folder / "library"
    home = root / ".dagster"
    home.mkdir(parents=True)
    return Clone(folder, root, home)


def deployed_env(
    clone: Clone, services: Mapping[str, str], *, shard_size: int, **more: str
) -> dict[str, str]:
    """The environment of the daemon (and what it starts): this one less every variable the
    deployment sets itself, plus the services' (Postgres, S3), the library's settings (one
    fingerprinting worker a shard, a 3 s sensor interval) and ``more``; the venv's scripts
    first on the PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES) and k != "PWD"}
    env.update(services)
    env.update(
        PATH=f"{Path(script('dagster')).parent}:{env.get('PATH', '')}",
        DAGSTER_HOME=str(clone.home),
        ASSET_LIBRARY_HOME=str(clone.root),
        ASSET_LIBRARY_SHARD_SIZE=str(shard_size),
        ASSET_LIBRARY_WORKERS="1",
        ASSET_LIBRARY_SENSOR_INTERVAL="3",
    )
    env.update(more)
    return env


def wait_for(
    what: str,
    condition: Callable[[], Any],
    timeout: float,
    *alive: Watched,
    every: float = 1.0,
) -> Any:
    """``condition()``'s first true value, polled every ``every`` s while every ``alive``
    process lives; after ``timeout`` s an error with their logs."""
    deadline = time.monotonic() + timeout
    while True:
        for process in alive:
            process.check_alive()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.log_path.name}\n{p.tail()}" for p in alive)
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(every)


def shard_runs(instance: dg.DagsterInstance) -> list[dg.RunRecord]:
    """Every ``ingest_shard`` run, oldest first."""
    return list(instance.get_run_records(dg.RunsFilter(job_name="ingest_shard"), ascending=True))


def step_started_at(instance: dg.DagsterInstance, run_id: str) -> float | None:
    """When the run's step started (its first ``STEP_START`` event), if it has."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.STEP_START, limit=1
    ).records
    return records[0].event_log_entry.timestamp if records else None
