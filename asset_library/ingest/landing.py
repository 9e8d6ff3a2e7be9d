"""The landing zone: where batches are dropped, and how a batch says it is complete.

A batch is ready when a folder (or S3 prefix) under the landing zone holds a ``_READY`` marker,
or when a manifest file (``.csv``, ``.parquet``, ``.jsonl``) sits at the top of the landing zone.
Listing looks at the top level only, so a sensor tick costs O(batches), not O(images).

A landed batch the sensor cannot start (its batch id is already taken) is skipped, never
retried, and recorded with its reason in the library, so ``asset-library status`` lists it until
it is ingested by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from asset_library.ingest.sources import READY_MARKER, is_manifest
from asset_library.layout import LibraryLayout, atomic_write_text
from asset_library.s3 import is_s3
from asset_library.storage import parse_s3_uri


@dataclass(frozen=True)
class LandedBatch:
    name: str
    source: str


def find_ready_batches(
    location: str, s3_client: Any = None, *, skip: Iterable[str] = ()
) -> list[LandedBatch]:
    """Batches ready under ``location``, by name; names in ``skip`` are not looked at again."""
    skipped = set(skip)
    if is_s3(location):
        return _ready_on_s3(location, s3_client, skipped)
    root = Path(location)
    if not root.is_dir():
        return []
    ready = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith((".", "_")) or entry.name in skipped:
            continue
        is_ready_folder = entry.is_dir() and (Path(entry.path) / READY_MARKER).exists()
        if is_ready_folder or (entry.is_file() and is_manifest(entry.name)):
            ready.append(LandedBatch(entry.name, entry.path))
    return ready


def _ready_on_s3(location: str, s3_client: Any, skipped: set[str]) -> list[LandedBatch]:
    from botocore.exceptions import ClientError

    bucket, prefix = parse_s3_uri(location)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    ready = []
    paginator = s3_client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for common in page.get("CommonPrefixes", []):
            name = common["Prefix"][len(prefix) :].rstrip("/")
            if not name or name.startswith((".", "_")) or name in skipped:
                continue
            try:
                s3_client.head_object(Bucket=bucket, Key=f"{common['Prefix']}{READY_MARKER}")
            except ClientError:
                continue
            ready.append(LandedBatch(name, f"s3://{bucket}/{common['Prefix'].rstrip('/')}"))
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) :]
            if name not in skipped and is_manifest(name) and not name.startswith((".", "_")):
                ready.append(LandedBatch(name, f"s3://{bucket}/{obj['Key']}"))
    return ready


@dataclass(frozen=True)
class SkippedLanding:
    """A landed batch the sensor did not start, and why."""

    name: str
    source: str
    batch: str
    reason: str
    skipped_at: str


def record_skipped(layout: LibraryLayout, skipped: SkippedLanding) -> Path:
    """Write ``skipped``'s record in the library, named by a digest of its source (names may
    hold anything)."""
    digest = hashlib.sha256(skipped.source.encode()).hexdigest()[:16]
    path = layout.skipped_landings_dir / f"{digest}.json"
    atomic_write_text(path, json.dumps(asdict(skipped), indent=2))
    return layout.publish(path)


def still_skipped(layout: LibraryLayout, ingested: Iterable[str]) -> list[SkippedLanding]:
    """The skipped landings the library records whose source is not among the ``ingested``
    sources since (a person ingests one under another id), oldest first."""
    directory = layout.pull(layout.skipped_landings_dir)
    done = set(ingested)
    records = [SkippedLanding(**json.loads(p.read_text())) for p in directory.glob("*.json")]
    return sorted((r for r in records if r.source not in done), key=lambda r: r.skipped_at)
