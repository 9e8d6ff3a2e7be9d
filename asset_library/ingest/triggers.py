"""Trigger records: which trigger produced which batch and shards, kept in the library.

A trigger is what started a batch: the landing sensor seeing a marker or manifest, a schedule, or
a person (the CLI, the UI). Its record is a small JSON file per batch, written when the batch is
planned (and published to the library's home), so ``asset-library status`` and a reader of the
library can trace shards to triggers from any machine.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from asset_library.ids import check_batch_id
from asset_library.layout import LibraryLayout, atomic_write_text


@dataclass(frozen=True)
class TriggerRecord:
    trigger: str
    kind: str
    batch: str
    source: str
    triggered_at: str
    images: int
    shards: list[str]


def new_trigger_id(kind: str) -> str:
    """A short unique id such as ``landing-20261123T204311-1f2e3d``."""
    return f"{kind}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def write_trigger(layout: LibraryLayout, record: TriggerRecord) -> Path:
    path = layout.triggers_dir / f"{check_batch_id(record.batch)}.json"
    atomic_write_text(path, json.dumps(asdict(record), indent=2))
    return layout.publish(path)


def read_trigger(path: Path) -> TriggerRecord:
    return TriggerRecord(**json.loads(path.read_text()))


def read_triggers(layout: LibraryLayout) -> list[TriggerRecord]:
    """Every batch's trigger record, oldest first."""
    directory = layout.triggers_dir
    layout.pull(directory)
    records = [read_trigger(p) for p in directory.glob("*.json")]
    return sorted(records, key=lambda r: r.triggered_at)
