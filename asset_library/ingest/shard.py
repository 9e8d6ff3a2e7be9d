"""One pass over a shard's bytes: read each image once, fingerprint it, store it under its key.

Reading and uploading are I/O, so a thread pool keeps many in flight; decoding is CPU, so it
goes to the worker processes of a :class:`FingerprintPool`. Results are written in input order
to the shard's keys file in row groups, and at most a small window of images is held at any
time, so memory does not grow with the shard.
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from asset_library.ids import bucket_of
from asset_library.ingest.fingerprint import Fingerprint, rejected_unreadable
from asset_library.ingest.pool import FingerprintPool
from asset_library.ingest.sources import SourceItem, SourceReadError
from asset_library.lake.schemas import IMAGE_FACT_COLUMNS, provenance
from asset_library.layout import rename_durably, temp_path_for
from asset_library.storage import DamageRecord, ObjectStore, PutResult, object_key

KEYS_SCHEMA = pa.schema(
    [
        *provenance("ordinal", "source_uri"),
        *IMAGE_FACT_COLUMNS,
        ("status", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("camera_make", pa.string()),
        ("camera_model", pa.string()),
        ("captured_at", pa.string()),
        ("extras", pa.string()),
        ("bucket", pa.int32()),
        ("uploaded", pa.bool_()),
        *provenance("batch", "shard", "ingested_at"),
    ]
)
_FINGERPRINT_FIELDS = [name for name in Fingerprint.__slots__ if name in KEYS_SCHEMA.names]
_ROW_GROUP = 20_000
_BATCH_ROWS = 2_000

Reader = Callable[[str], bytes]


@dataclass
class ShardStats:
    """What one pass over a shard did; becomes the assets' metadata and the CLI's summary."""

    images: int = 0
    ok: int = 0
    rejected: int = 0
    rejects_by_reason: Counter[str] = field(default_factory=Counter)
    uploaded: int = 0
    already_stored: int = 0
    repaired: int = 0  # stored objects that were damaged and were replaced with these bytes
    bytes_read: int = 0
    bytes_uploaded: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def as_metadata(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "ok": self.ok,
            "rejected": self.rejected,
            "rejects_by_reason": dict(self.rejects_by_reason),
            "uploaded": self.uploaded,
            "already_stored": self.already_stored,
            "repaired": self.repaired,
            "bytes_read": self.bytes_read,
            "bytes_uploaded": self.bytes_uploaded,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 1),
        }


class ShardItemError(RuntimeError):
    """A failure that stops a shard (a store or source that is down, not bad data); it names
    the shard and the source being handled, so the one line a user sees says where to look."""

    def __init__(self, shard: str, uri: str, doing: str, error: BaseException) -> None:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        super().__init__(
            f"shard {shard} failed {doing} {uri}: {type(error).__name__}"
            + (f": {detail}" if detail else "")
        )


@dataclass(frozen=True)
class _Outcome:
    ordinal: int
    item: SourceItem
    fp: Fingerprint
    put: PutResult | None  # None: not stored (rejected)


def ingest_shard(
    items: Iterable[tuple[int, SourceItem]],
    *,
    keys_path: Path,
    store: ObjectStore,
    read: Reader,
    pool: FingerprintPool,
    batch: str,
    shard: str,
    n_buckets: int,
    io_threads: int = 16,
    progress: Callable[[ShardStats], None] | None = None,
    progress_every: int = 1000,
    damaged: DamageRecord | None = None,
) -> ShardStats:
    """Read, fingerprint and store every item; write the shard's keys file atomically. An
    object in the ``damaged`` record is judged by its bytes, and leaves the record once they
    are the image's again."""
    suspects = damaged.md5s() if damaged is not None else set()
    stats = ShardStats()
    started = time.perf_counter()
    ingested_at = datetime.now(UTC)
    keys_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(keys_path)
    writer = pq.ParquetWriter(tmp, KEYS_SCHEMA)
    rows: list[dict[str, Any]] = []
    batches: list[pa.RecordBatch] = []
    window = max(4, io_threads * 2)

    def one(ordinal: int, item: SourceItem) -> _Outcome:
        try:
            data = read(item.uri)
        except SourceReadError as error:
            fp = replace(rejected_unreadable(str(error)), reason=error.reason)
            return _Outcome(ordinal, item, fp, None)
        except Exception as error:
            raise ShardItemError(shard, item.uri, "reading", error) from error
        try:
            fp = pool.submit_chunk([data]).result()[0]
        except Exception as error:
            raise ShardItemError(shard, item.uri, "fingerprinting", error) from error
        put = None
        if fp.ok and fp.md5:
            try:
                suspect = fp.md5 in suspects
                put = store.put_if_absent(object_key(fp.md5), data, fp.md5, suspect=suspect)
                if suspect and damaged is not None:
                    damaged.clear([fp.md5])
            except Exception as error:
                raise ShardItemError(shard, item.uri, "storing", error) from error
        return _Outcome(ordinal, item, fp, put)

    def collect(outcome: _Outcome) -> None:
        fp = outcome.fp
        stats.images += 1
        stats.bytes_read += fp.size_bytes or 0
        if fp.ok:
            stats.ok += 1
            if outcome.put is PutResult.STORED:
                stats.uploaded += 1
            elif outcome.put is PutResult.REPAIRED:
                stats.repaired += 1
            else:
                stats.already_stored += 1
            if outcome.put:
                stats.bytes_uploaded += fp.size_bytes or 0
        else:
            stats.rejected += 1
            stats.rejects_by_reason[fp.reason or "unknown"] += 1
        row = {name: getattr(fp, name) for name in _FINGERPRINT_FIELDS}
        row.update(
            ordinal=outcome.ordinal,
            source_uri=outcome.item.uri,
            extras=_json_or_none(outcome.item.extras),
            bucket=bucket_of(fp.md5, n_buckets) if fp.md5 else None,
            uploaded=bool(outcome.put),
            batch=batch,
            shard=shard,
            ingested_at=ingested_at,
        )
        rows.append(row)
        if len(rows) >= _BATCH_ROWS:
            # Python dicts cost ~1-4 KB a row, Arrow ~240 B: convert early, write in row groups.
            batches.append(pa.RecordBatch.from_pylist(rows, schema=KEYS_SCHEMA))
            rows.clear()
            if sum(b.num_rows for b in batches) >= _ROW_GROUP:
                writer.write_table(pa.Table.from_batches(batches))
                batches.clear()
        if progress and stats.images % progress_every == 0:
            stats.seconds = time.perf_counter() - started
            progress(stats)

    try:
        with ThreadPoolExecutor(io_threads, thread_name_prefix="ingest") as threads:
            pending: deque[Future[_Outcome]] = deque()
            try:
                for ordinal, item in items:
                    pending.append(threads.submit(one, ordinal, item))
                    while len(pending) >= window:
                        collect(pending.popleft().result())
                while pending:
                    collect(pending.popleft().result())
            except BaseException:
                # A store that is down fails the shard: don't let queued images retry it too.
                for future in pending:
                    future.cancel()
                raise
        if rows:
            batches.append(pa.RecordBatch.from_pylist(rows, schema=KEYS_SCHEMA))
        if batches:
            writer.write_table(pa.Table.from_batches(batches))
        writer.close()
        rename_durably(tmp, keys_path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    stats.seconds = time.perf_counter() - started
    return stats


def _json_or_none(extras: dict[str, Any]) -> str | None:
    return json.dumps(extras, default=str, sort_keys=True) if extras else None
