"""The batches a library has planned and the state of their shards, where ``status`` reads them:
the trigger records (one per batch), each batch's plan file, and the shard states the Dagster
instance records. The service only reads them: it marks no run failed and creates no instance.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asset_library.ingest.plan import BatchPlan, has_plan, load_plan
from asset_library.ingest.triggers import TriggerRecord, read_trigger
from asset_library.layout import LibraryLayout


@dataclass(frozen=True)
class BatchList:
    """One page of the batches, newest first, with how many there are."""

    total: int
    records: list[TriggerRecord]


def recent_batches(layout: LibraryLayout, limit: int, offset: int) -> BatchList:
    """The batches by their trigger record, newest first. Only the page's records are read: the
    order is the records' write time (each is written once, when its batch is planned), so a
    deep page costs what the first does. An S3 library's records are fetched into the cache
    first; their local write times are then the fetch's, so they are ordered by the time each
    records instead (every record read)."""
    layout.pull(layout.triggers_dir)
    if layout.remote is not None:
        records = sorted(
            (read_trigger(p) for p in layout.triggers_dir.glob("*.json")),
            key=lambda r: (r.triggered_at, r.batch),
            reverse=True,
        )
        return BatchList(len(records), records[offset : offset + limit])
    found = []
    for path in layout.triggers_dir.glob("*.json"):
        try:
            found.append((path.stat().st_mtime_ns, path.name, path))
        except FileNotFoundError:  # replaced while listed: the new one is listed too
            continue
    found.sort(reverse=True)
    return BatchList(len(found), [read_trigger(p) for *_, p in found[offset : offset + limit]])


def batch_plan(layout: LibraryLayout, batch: str) -> BatchPlan | None:
    """The batch's plan (its shards and their planned images), ``None`` if it has none."""
    if not has_plan(layout, batch):  # fetched first for an S3 library
        return None
    return load_plan(layout.plan_dir(batch))


class ShardStates:
    """The shard states ``status`` prints (``materialized``, ``in_progress``, ``failed``,
    ``partial``, ``missing``), from the Dagster instance ``status`` opens: ``$DAGSTER_HOME``,
    else the library's own. Opened on first use and kept (opening one costs more than a page)."""

    def __init__(self, layout: LibraryLayout) -> None:
        self.layout = layout
        self._lock = threading.Lock()
        self._opened: tuple[Path, Any] | None = None

    def home(self) -> Path:
        return Path(os.environ.get("DAGSTER_HOME") or self.layout.dagster_home)

    def of(self, shards: list[str]) -> dict[str, str] | str:
        """Each shard's state, or why the states can't be known (a sentence)."""
        home = self.home()
        if not home.is_dir():
            return (
                f"shard states unknown: no Dagster instance at {home} "
                "(the runs that ingested this library were recorded elsewhere)"
            )
        from asset_library.defs.shard_status import shard_states
        from asset_library.runs.instance import open_instance

        with self._lock:  # one thread at a time on the instance's storage
            try:
                if self._opened is None or self._opened[0] != home:
                    self._opened = (home, open_instance(home))
                return shard_states(self._opened[1], shards)
            except Exception as error:  # any storage failure: the page still shows the rest
                return f"shard states unknown: the Dagster instance at {home} fails: {error}"
