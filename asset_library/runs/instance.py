"""The library's own Dagster instance, the runs started from a terminal, and shard states.

Kept light (Dagster and the library layout only) so that ``asset-library status`` answers
without loading the code location.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import dagster as dg

from asset_library.defs.tags import PROCESS_TAG
from asset_library.layout import LibraryLayout
from asset_library.runs.processes import process_is_gone

#: Statuses of a run that has not ended; the CLI's runs never wait in a queue.
NOT_ENDED = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def instance_home(layout: LibraryLayout) -> Path:
    """The library's own Dagster instance folder, so the UI on this library sees these runs."""
    home = layout.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    project_yaml = Path.cwd() / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and project_yaml.exists():
        shutil.copyfile(project_yaml, home / "dagster.yaml")
    return home


def open_instance(home: str | Path) -> dg.DagsterInstance:
    """The Dagster instance in ``home``, opened under a lock on that folder.

    Opening a new SQLite instance creates its tables, and two processes doing so at once (an
    ingest starting while ``status`` looks) fail with "table already exists"; the lock makes
    the second wait for the first.
    """
    folder = Path(home).expanduser()
    if not folder.is_absolute():
        raise ValueError(f"$DAGSTER_HOME must be an absolute path: {home!r}")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".asset-library-open.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return dg.DagsterInstance.from_config(str(folder))


def local_instance(layout: LibraryLayout) -> dg.DagsterInstance:
    """The instance ``$DAGSTER_HOME`` names, else the library's own."""
    home = os.environ.get("DAGSTER_HOME") or str(instance_home(layout))
    os.environ["DAGSTER_HOME"] = home
    return open_instance(home)


def reap_dead_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """Mark failed the runs started from a terminal whose process is gone.

    A run whose process was killed (``kill -9``, out of memory, a closed laptop) never records
    its end, and with no daemon to notice it would show in progress forever. Runs without the
    process tag (launched by a daemon or the UI) are left to Dagster's own run monitoring.
    """
    reaped = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=NOT_ENDED)):
        token = run.tags.get(PROCESS_TAG)
        if token and process_is_gone(token):
            instance.report_run_failed(
                run,
                f"Its process ({token}) ended before the run did (killed or crashed); "
                "marked failed by asset-library.",
            )
            reaped.append(run)
    return reaped
