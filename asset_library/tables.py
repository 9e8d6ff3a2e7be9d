"""A shard's rows in the base table, the rejects table and the cube table, from its keys file.

The base table holds one row per image occurrence (an md5 may occur in many shards); the cube
table holds open-ended attributes as (md5, attribute, value, value_type) rows: every extra column
of the manifest, plus a few attributes derived at ingest (see :data:`DERIVED_ATTRIBUTES`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from asset_library.lake import write_bucketed, write_single
from asset_library.layout import LibraryLayout

#: Attributes the library derives for every image, documented for users of the cube.
DERIVED_ATTRIBUTES = {
    "exif.make": "camera maker from EXIF Make",
    "exif.model": "camera model from EXIF Model",
    "exif.captured_at": "capture time from EXIF DateTimeOriginal, as YYYY-MM-DD HH:MM:SS",
    "image.aspect_ratio": "width / height as displayed, 4 decimals",
    "image.megapixels": "width x height / 1e6, 3 decimals",
    "image.animated": "true when the image has more than one frame",
}

CUBE_SCHEMA = pa.schema(
    [
        ("md5", pa.string()),
        ("attribute", pa.string()),
        ("value", pa.string()),
        ("value_type", pa.string()),
        ("origin", pa.string()),
        ("source_uri", pa.string()),
        ("batch", pa.string()),
        ("shard", pa.string()),
        ("bucket", pa.int32()),
    ]
)

BASE_COLUMNS_SQL = """
    md5, size_bytes, format, width, height, orientation, frames,
    phash, ahash, dhash,
    ('0x' || phash)::UBIGINT AS phash_int,
    ('0x' || ahash)::UBIGINT AS ahash_int,
    ('0x' || dhash)::UBIGINT AS dhash_int,
    source_uri, batch, shard, ordinal, ingested_at, bucket
"""


def write_base_table(
    layout: LibraryLayout, shard: str, connection: duckdb.DuckDBPyConnection
) -> dict[str, Any]:
    """The shard's accepted images into ``lake/base`` by bucket, its rejects into ``rejects``."""
    keys = _literal(layout.keys_path(shard))
    per_bucket = write_bucketed(
        layout,
        "base",
        shard,
        f"SELECT {BASE_COLUMNS_SQL} FROM read_parquet('{keys}') WHERE status = 'ok'",
        connection,
    )
    rejects = write_single(
        layout.rejects_path(shard),
        "SELECT source_uri, md5, size_bytes, format, reason, message, batch, shard, ordinal, "
        f"ingested_at FROM read_parquet('{keys}') WHERE status <> 'ok' ORDER BY ordinal",
        connection,
    )
    return {"rows": sum(per_bucket.values()), "buckets": len(per_bucket), "rejects": rejects}


def write_cube_table(
    layout: LibraryLayout, shard: str, connection: duckdb.DuckDBPyConnection
) -> dict[str, Any]:
    """The shard's attribute rows into ``lake/cube`` by bucket."""
    staging = layout.root / "lake" / "_staging" / f"cube-{shard}-{uuid.uuid4().hex[:8]}.parquet"
    staging.parent.mkdir(parents=True, exist_ok=True)
    attributes: set[str] = set()
    try:
        with pq.ParquetWriter(staging, CUBE_SCHEMA) as writer:
            for rows in _cube_rows(layout.keys_path(shard)):
                attributes.update(row["attribute"] for row in rows)
                writer.write_table(pa.Table.from_pylist(rows, schema=CUBE_SCHEMA))
        per_bucket = write_bucketed(
            layout, "cube", shard, f"SELECT * FROM read_parquet('{_literal(staging)}')", connection
        )
    finally:
        staging.unlink(missing_ok=True)
    return {"rows": sum(per_bucket.values()), "attributes": sorted(attributes)}


def _cube_rows(keys_path: Path) -> Iterator[list[dict[str, Any]]]:
    columns = ["md5", "status", "extras", "width", "height", "frames", "camera_make"]
    columns += ["camera_model", "captured_at", "source_uri", "batch", "shard", "bucket"]
    for batch in pq.ParquetFile(keys_path).iter_batches(batch_size=20_000, columns=columns):
        rows: list[dict[str, Any]] = []
        for image in batch.to_pylist():
            if image["status"] != "ok":
                continue
            common = {k: image[k] for k in ("md5", "source_uri", "batch", "shard", "bucket")}
            extras = json.loads(image["extras"]) if image["extras"] else {}
            for attribute, value in extras.items():
                if value is not None:
                    rows.append(
                        {**common, **typed(value), "attribute": attribute, "origin": "manifest"}
                    )
            for attribute, value in derived_attributes(image).items():
                rows.append({**common, **typed(value), "attribute": attribute, "origin": "derived"})
        if rows:
            yield rows


def derived_attributes(image: dict[str, Any]) -> dict[str, Any]:
    """What the library knows of every image beyond the base columns."""
    found: dict[str, Any] = {}
    if image.get("camera_make"):
        found["exif.make"] = image["camera_make"]
    if image.get("camera_model"):
        found["exif.model"] = image["camera_model"]
    captured = _exif_time(image.get("captured_at"))
    if captured:
        found["exif.captured_at"] = captured
    width, height = image.get("width"), image.get("height")
    if width and height:
        found["image.aspect_ratio"] = round(width / height, 4)
        found["image.megapixels"] = round(width * height / 1e6, 3)
    found["image.animated"] = bool((image.get("frames") or 1) > 1)
    return found


def typed(value: Any) -> dict[str, str]:
    """A value as text plus its type, so the cube can cast it back when queried."""
    if isinstance(value, bool):
        return {"value": "true" if value else "false", "value_type": "boolean"}
    if isinstance(value, int):
        return {"value": str(value), "value_type": "integer"}
    if isinstance(value, float):
        return {"value": repr(value), "value_type": "double"}
    if isinstance(value, str):
        return {"value": value, "value_type": value_type_of(value)}
    if hasattr(value, "isoformat"):
        return {"value": value.isoformat(sep=" "), "value_type": "timestamp"}
    return {"value": json.dumps(value, default=str), "value_type": "json"}


def _exif_time(value: str | None) -> str | None:
    """EXIF writes ``YYYY:MM:DD HH:MM:SS``; anything else is dropped rather than guessed."""
    if not value or len(value) < 19 or value[4] != ":" or value[7] != ":":
        return None
    text = f"{value[0:4]}-{value[5:7]}-{value[8:10]} {value[11:19]}"
    return text if _looks_like_timestamp(text) and not text.startswith("0000") else None


_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
_DOUBLE = re.compile(r"-?(0|[1-9][0-9]*)\.[0-9]*[1-9]")


def value_type_of(text: str) -> str:
    """What a text value reads as, without changing it: ``integer`` and ``double`` only for
    their one canonical spelling (``02134``, ``1.10`` and ``1e5`` stay ``string``, since
    reading them as numbers would not give the text back), ``boolean`` for ``true``/``false``,
    ``timestamp`` for ISO ``YYYY-MM-DD[ HH:MM:SS]``, else ``string``."""
    if _INTEGER.fullmatch(text):
        return "integer"
    if _DOUBLE.fullmatch(text):
        return "double"
    if text in ("true", "false"):
        return "boolean"
    if _looks_like_timestamp(text):
        return "timestamp"
    return "string"


def _looks_like_timestamp(text: str) -> bool:
    from datetime import datetime

    if len(text) < 10 or text[4] != "-" or text[7] != "-":
        return False
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _literal(path: Path) -> str:
    return str(path).replace("'", "''")
