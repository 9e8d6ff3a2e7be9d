"""Planning: a batch is cut into shards of at most N images, written down before any shard runs.

The plan is durable: one Parquet file per shard (its URIs and manifest extras, in batch order)
and a ``plan.json``, written in a private folder renamed into place last, so a plan either exists
whole or not at all. Shard runs read only their own file, so a shard re-run sees exactly the
images it saw the first time. A batch id is planned once: planning into an existing plan is
refused unless the caller asks to replace it.

For a library at an ``s3://`` home the plan is written in the machine's cache folder, then
published: the shard files first, ``plan.json`` last and, for a new batch, only if no other
planner published one first (a conditional put), so the claim on a batch id holds across
machines. A shard run reads its files through the library (:func:`read_plan`,
:func:`shard_file`), whichever machine planned it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from asset_library.ids import shard_key
from asset_library.ingest.sources import SourceItem
from asset_library.layout import (
    PLAN_FILE,
    TEMP_SUFFIX,
    LibraryLayout,
    atomic_write_text,
    rename_durably,
    temp_path_for,
)
from asset_library.storage.base import file_md5

DEFAULT_MAX_IMAGES_PER_SHARD = 10_000_000
_PLAN_SCHEMA = pa.schema([("ordinal", pa.int64()), ("uri", pa.string()), ("extras", pa.string())])
_ROW_GROUP = 50_000


@dataclass(frozen=True)
class ShardPlan:
    key: str
    number: int
    images: int
    path: str
    #: The MD5 of the shard's file as planned: a copy fetched from an S3 home is checked
    #: against it (``None`` in plans made before it was recorded).
    md5: str | None = None


@dataclass(frozen=True)
class BatchPlan:
    batch: str
    source: str
    trigger: str | None
    planned_at: str
    max_images_per_shard: int
    images: int
    shards: list[ShardPlan] = field(default_factory=list)
    #: Folders the batch's shards may read local files under (see ingest.access).
    roots: list[str] = field(default_factory=list)

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


class BatchExistsError(ValueError):
    """A batch id that already has a plan: ids are not reused by accident."""


def check_new_batch(
    layout: LibraryLayout, batch: str, *, replace: bool = False
) -> BatchPlan | None:
    """The batch's current plan, if any; :class:`BatchExistsError` unless ``replace``."""
    existing = read_plan(layout, batch) if has_plan(layout, batch) else None
    if existing is not None and not replace:
        raise BatchExistsError(
            f"batch {batch!r} already exists ({existing.images:,} images in "
            f"{len(existing.shards)} shard(s) from {existing.source}, planned "
            f"{existing.planned_at}); choose another batch id, or replace it on purpose "
            "(asset-library ingest --replace, or replace: true in the batch_plan config)"
        )
    return existing


def plan_batch(
    items: Iterable[SourceItem],
    *,
    batch: str,
    source: str,
    layout: LibraryLayout,
    max_images_per_shard: int = DEFAULT_MAX_IMAGES_PER_SHARD,
    trigger: str | None = None,
    roots: Iterable[str] = (),
    replace: bool = False,
) -> BatchPlan:
    """Stream a batch's items into shard files and a plan.json, then move them into
    ``plan_dir`` in one rename. A batch already planned is refused unless ``replace``; a
    replacement with fewer shards than the old plan is refused too, since the old shards'
    rows would outlive it."""
    if max_images_per_shard < 1:
        raise ValueError(f"max_images_per_shard must be at least 1, not {max_images_per_shard}")
    check_new_batch(layout, batch, replace=replace)
    plan_dir = layout.plan_dir(batch)
    staging = plan_dir.with_name(f".{plan_dir.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    staging.mkdir(parents=True)
    try:
        plan = _write_plan(
            items, batch, source, plan_dir, staging, max_images_per_shard, trigger, list(roots)
        )
        _move_into_place(layout, staging, plan, replace=replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _publish(layout, plan, replace=replace)
    return plan


def _publish(layout: LibraryLayout, plan: BatchPlan, *, replace: bool) -> None:
    """Publish a plan written in place: its shard files, then ``plan.json`` (a new batch's
    only if no other planner's is there: else the batch is theirs)."""
    plan_dir = layout.plan_dir(plan.batch)
    for shard in plan.shards:
        layout.publish(plan_dir / f"{shard.key}.parquet")
    if replace:
        layout.publish(plan_dir / PLAN_FILE)
    elif not layout.publish_new(plan_dir / PLAN_FILE):
        shutil.rmtree(plan_dir, ignore_errors=True)
        check_new_batch(layout, plan.batch)
        raise BatchExistsError(f"batch {plan.batch!r} was planned elsewhere meanwhile")


def _write_plan(
    items: Iterable[SourceItem],
    batch: str,
    source: str,
    plan_dir: Path,
    staging: Path,
    max_images_per_shard: int,
    trigger: str | None,
    roots: list[str],
) -> BatchPlan:
    shards: list[ShardPlan] = []
    writer: _ShardWriter | None = None
    total = 0
    for item in items:
        if writer is None or writer.count == max_images_per_shard:
            if writer is not None:
                shards.append(writer.close())
            key = shard_key(batch, len(shards))
            writer = _ShardWriter(staging, plan_dir, key, len(shards))
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
        roots=roots,
    )
    atomic_write_text(staging / PLAN_FILE, plan.to_json())
    return plan


def _move_into_place(
    layout: LibraryLayout, staging: Path, plan: BatchPlan, *, replace: bool
) -> None:
    """Rename the finished plan over its plan folder. Without ``replace`` the rename itself is
    the claim on the batch id (on this machine): it fails if another planner got there first."""
    plan_dir = layout.plan_dir(plan.batch)
    old = check_new_batch(layout, plan.batch, replace=replace)
    if old is not None and len(plan.shards) < len(old.shards):
        raise BatchExistsError(
            f"batch {plan.batch!r}: the replacement has {len(plan.shards)} shard(s), fewer than "
            f"the {len(old.shards)} it replaces, whose rows would stay in the library; "
            "ingest it under a new batch id instead"
        )
    if old is None:
        if plan_dir.exists() and not (plan_dir / PLAN_FILE).exists():
            shutil.rmtree(plan_dir)  # what a planner killed before its rename left
        try:
            rename_durably(staging, plan_dir, os.rename)
        except OSError:
            check_new_batch(layout, plan.batch)
            raise
        return
    retired = plan_dir.with_name(f".{plan_dir.name}.{uuid.uuid4().hex[:8]}.old{TEMP_SUFFIX}")
    os.rename(plan_dir, retired)
    rename_durably(staging, plan_dir, os.rename)
    shutil.rmtree(retired, ignore_errors=True)


def load_plan(plan_dir: Path) -> BatchPlan:
    """The plan in a local plan folder (:func:`read_plan` reads a library's)."""
    return BatchPlan.from_json((plan_dir / PLAN_FILE).read_text())


def has_plan(layout: LibraryLayout, batch: str) -> bool:
    """Whether the library holds a plan of ``batch``."""
    return layout.fetch(layout.plan_path(batch))


def read_plan(layout: LibraryLayout, batch: str) -> BatchPlan:
    """The library's plan of ``batch`` as it is now (``FileNotFoundError`` if none)."""
    if not has_plan(layout, batch):
        raise FileNotFoundError(f"no plan of batch {batch!r} in {layout.location}")
    return load_plan(layout.plan_dir(batch))


def shard_file(layout: LibraryLayout, batch: str, shard: ShardPlan) -> Path:
    """The local copy of a shard's plan file (its URIs), level with the library's and, for
    an S3 library, checked to be the file its plan recorded."""
    path = layout.plan_dir(batch) / f"{shard.key}.parquet"
    if not layout.fetch(path):
        raise FileNotFoundError(
            f"No such file: {layout.home_of(path)} (the plan file of shard {shard.key})"
        )
    if layout.remote is not None and shard.md5 is not None and file_md5(path) != shard.md5:
        raise ValueError(
            f"{layout.location}: the plan file of shard {shard.key} is not the one its plan "
            "recorded (another planner of the same batch id overwrote it); re-plan the batch "
            "with --replace"
        )
    return path


def read_shard_items(path: str | Path) -> Iterable[tuple[int, SourceItem]]:
    """A shard's (ordinal, item) pairs, streamed row group by row group."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_ROW_GROUP):
        columns = batch.to_pydict()
        for ordinal, uri, extras in zip(
            columns["ordinal"], columns["uri"], columns["extras"], strict=True
        ):
            yield ordinal, SourceItem(uri, json.loads(extras) if extras else {})


class _ShardWriter:
    """Writes one shard's file in the staging folder; its plan names it in ``plan_dir``."""

    def __init__(self, staging: Path, plan_dir: Path, key: str, number: int) -> None:
        self.key, self.number, self.count = key, number, 0
        self.path = staging / f"{key}.parquet"
        self.final_path = plan_dir / f"{key}.parquet"
        self.tmp = temp_path_for(self.path)
        self.writer = pq.ParquetWriter(self.tmp, _PLAN_SCHEMA)
        self.rows: dict[str, list[Any]] = {"ordinal": [], "uri": [], "extras": []}

    def add(self, ordinal: int, item: SourceItem) -> None:
        self.rows["ordinal"].append(ordinal)
        self.rows["uri"].append(item.uri)
        self.rows["extras"].append(json.dumps(item.extras) if item.extras else None)
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
        rename_durably(self.tmp, self.path)
        return ShardPlan(
            self.key, self.number, self.count, str(self.final_path), file_md5(self.path)
        )
