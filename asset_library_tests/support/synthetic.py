"""Synthetic shard keys files: what a shard's pass over the bytes would write, without images."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from asset_library.ids import batch_of
from asset_library.ingest.shard import KEYS_SCHEMA
from asset_library.lake import Lake, write_shard
from asset_library.layout import LibraryLayout

_FORMATS = np.array(["jpeg", "png", "webp", "gif"])
_LABELS = np.array(["cat", "dog", "bird", "car", "tree"])


def _hex(values: np.ndarray, width: int) -> list[str]:
    return [f"{int(v):0{width}x}" for v in values]


def random_md5s(rng: np.random.Generator, n: int) -> list[str]:
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8).tobytes().hex()
    return [raw[i : i + 32] for i in range(0, len(raw), 32)]


def write_keys(
    path: Path,
    *,
    batch: str,
    shard: str,
    n_buckets: int,
    md5s: list[str],
    seed: int = 0,
    rejects: int = 0,
    extras: bool = True,
    ingested_at: datetime | None = None,
) -> Path:
    """A keys file with one ok row per md5 (a few manifest attributes each) and some rejects."""
    rng = np.random.default_rng(seed)
    n = len(md5s)
    bits = n_buckets.bit_length() - 1
    buckets = [int(m[:8], 16) >> (32 - bits) if bits else 0 for m in md5s]
    width = rng.integers(64, 6000, n).astype(np.int32)
    height = rng.integers(64, 4000, n).astype(np.int32)
    labels = _LABELS[rng.integers(0, len(_LABELS), n)]
    scores = rng.integers(0, 1000, n)
    extras_col = (
        [
            json.dumps({"label": str(lab), "score": int(s), "note": f"{s / 8}"}, sort_keys=True)
            for lab, s in zip(labels, scores, strict=True)
        ]
        if extras
        else [None] * n
    )
    when = ingested_at or datetime.now(UTC)
    ok = {
        "ordinal": np.arange(n, dtype=np.int64),
        "source_uri": [f"s3://landing/{batch}/{i}.jpg" for i in range(n)],
        "md5": md5s,
        "size_bytes": rng.integers(1000, 5_000_000, n),
        "status": ["ok"] * n,
        "reason": [None] * n,
        "message": [None] * n,
        "format": _FORMATS[rng.integers(0, 4, n)].tolist(),
        "width": width,
        "height": height,
        "orientation": np.ones(n, np.int16),
        "frames": np.ones(n, np.int32),
        "phash": _hex(rng.integers(0, 2**63, n, dtype=np.uint64) * 2, 16),
        "ahash": _hex(rng.integers(0, 2**63, n, dtype=np.uint64), 16),
        "dhash": _hex(rng.integers(0, 2**63, n, dtype=np.uint64), 16),
        "camera_make": [None] * n,
        "camera_model": [None] * n,
        "captured_at": [None] * n,
        "extras": extras_col,
        "bucket": np.array(buckets, np.int32),
        "uploaded": [True] * n,
        "batch": [batch] * n,
        "shard": [shard] * n,
        "ingested_at": [when] * n,
        "quality": rng.integers(40, 100, n).astype(np.int16),  # photos, not flat images
    }
    table = pa.table(ok, schema=KEYS_SCHEMA)
    if rejects:
        bad = {name: [None] * rejects for name in KEYS_SCHEMA.names}
        bad.update(
            ordinal=list(range(n, n + rejects)),
            source_uri=[f"s3://landing/{batch}/bad{i}.txt" for i in range(rejects)],
            status=["rejected"] * rejects,
            reason=["not_an_image"] * rejects,
            message=["not an image"] * rejects,
            batch=[batch] * rejects,
            shard=[shard] * rejects,
            ingested_at=[when] * rejects,
        )
        table = pa.concat_tables([table, pa.table(bad, schema=KEYS_SCHEMA)])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=100_000)
    return path


def land_shard(
    layout: LibraryLayout, lake: Lake, shard: str, md5s: list[str], **keys: Any
) -> dict[str, Any]:
    """A synthetic shard as its run leaves it: its keys file (:func:`write_keys`, with
    ``keys``' options) and its rows written to the lake; what ``write_shard`` returns."""
    path = layout.keys_path(shard)
    write_keys(
        path, batch=batch_of(shard), shard=shard, n_buckets=lake.n_buckets, md5s=md5s, **keys
    )
    return write_shard(lake, shard, path)
