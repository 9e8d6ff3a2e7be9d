"""Planning: a batch is cut into shards of at most N images, written down before any shard runs.

The plan is durable: one Parquet file per shard (its URIs and manifest extras, in batch order)
and a ``plan.json`` written last, so a plan either exists whole or not at all. Shard runs read
only their own file, so a shard re-run sees exactly the images it saw the first time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from asset_library.ids import shard_key
from asset_library.ingest.sources import SourceItem
from asset_library.layout import atomic_write_text, temp_path_for

DEFAULT_MAX_IMAGES_PER_SHARD = 10_000_000
_PLAN_SCHEMA = pa.schema([("ordinal", pa.int64()), ("uri", pa.string()), ("extras", pa.string())])
_ROW_GROUP = 50_000


@dataclass(frozen=True)
class ShardPlan:
    key: str
    number: int
    images: int
    path: str


@dataclass(frozen=True)
class BatchPlan:
    batch: str
    source: str
    trigger: str | None
    planned_at: str
    max_images_per_shard: int
    images: int
    shards: list[ShardPlan] = field(default_factory=list)

    @property
    def shard_keys(self) -> list[str]:
        return [shard.key for shard in self.shards]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> BatchPlan:
        raw = json.loads(text)
        raw["shards"] = [ShardPlan(**shard) for shard in raw["shards"]]
        return cls(**raw)


def plan_batch(
    items: Iterable[SourceItem],
    *,
    batch: str,
    source: str,
    plan_dir: Path,
    max_images_per_shard: int = DEFAULT_MAX_IMAGES_PER_SHARD,
    trigger: str | None = None,
) -> BatchPlan:
    """Stream a batch's items into shard files under ``plan_dir`` and write its plan.json."""
    if max_images_per_shard < 1:
        raise ValueError(f"max_images_per_shard must be at least 1, not {max_images_per_shard}")
    plan_dir.mkdir(parents=True, exist_ok=True)
    shards: list[ShardPlan] = []
    writer: _ShardWriter | None = None
    total = 0
    for item in items:
        if writer is None or writer.count == max_images_per_shard:
            if writer is not None:
                shards.append(writer.close())
            writer = _ShardWriter(plan_dir, shard_key(batch, len(shards)), len(shards))
        writer.add(total, item)
        total += 1
    if writer is not None:
        shards.append(writer.close())
    if not shards:
        raise ValueError(f"batch {batch!r} from {source} has no images")
    plan = BatchPlan(
        batch=batch,
        source=source,
        trigger=trigger,
        planned_at=datetime.now(UTC).isoformat(timespec="seconds"),
        max_images_per_shard=max_images_per_shard,
        images=total,
        shards=shards,
    )
    atomic_write_text(plan_dir / "plan.json", plan.to_json())
    return plan


def load_plan(plan_dir: Path) -> BatchPlan:
    return BatchPlan.from_json((plan_dir / "plan.json").read_text())


def read_shard_items(path: str | Path) -> Iterable[tuple[int, SourceItem]]:
    """A shard's (ordinal, item) pairs, streamed row group by row group."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_ROW_GROUP):
        columns = batch.to_pydict()
        for ordinal, uri, extras in zip(
            columns["ordinal"], columns["uri"], columns["extras"], strict=True
        ):
            yield ordinal, SourceItem(uri, json.loads(extras) if extras else {})


class _ShardWriter:
    def __init__(self, plan_dir: Path, key: str, number: int) -> None:
        self.key, self.number, self.count = key, number, 0
        self.path = plan_dir / f"{key}.parquet"
        self.tmp = temp_path_for(self.path)
        self.writer = pq.ParquetWriter(self.tmp, _PLAN_SCHEMA)
        self.rows: dict[str, list[Any]] = {"ordinal": [], "uri": [], "extras": []}

    def add(self, ordinal: int, item: SourceItem) -> None:
        self.rows["ordinal"].append(ordinal)
        self.rows["uri"].append(item.uri)
        self.rows["extras"].append(json.dumps(item.extras, default=str) if item.extras else None)
        self.count += 1
        if len(self.rows["uri"]) >= _ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.rows["uri"]:
            self.writer.write_table(pa.table(self.rows, schema=_PLAN_SCHEMA))
            self.rows = {"ordinal": [], "uri": [], "extras": []}

    def close(self) -> ShardPlan:
        self._flush()
        self.writer.close()
        self.tmp.replace(self.path)
        return ShardPlan(self.key, self.number, self.count, str(self.path))
