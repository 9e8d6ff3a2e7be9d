"""Where batches come from: a folder, an S3 prefix, or a manifest of URIs with extra columns.

A batch is listed as a stream of :class:`SourceItem` (a URI and the manifest's extra columns),
never held whole in memory. A bad manifest stops planning with an error that names the file, the
row and the reason; a URI that cannot be read at ingest time becomes a reject row instead.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from asset_library.storage import parse_s3_uri

MANIFEST_SUFFIXES = (".csv", ".parquet", ".jsonl", ".ndjson")
READY_MARKER = "_READY"
_MANIFEST_BATCH_ROWS = 65_536


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One image to ingest: where its bytes are, and the business attributes that came with it."""

    uri: str
    extras: dict[str, Any] = field(default_factory=dict)


class ManifestError(ValueError):
    """A manifest that cannot be planned; the message names the file, the row and the reason."""


class SourceReadError(Exception):
    """The bytes behind a URI could not be read; ``reason`` is a short code for the reject row."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_manifest(location: str) -> bool:
    return location.lower().endswith(MANIFEST_SUFFIXES)


def normalize_source(source: str) -> str:
    """A source as recorded in a plan: S3 URIs as given, local paths made absolute, so a shard
    run started from any working directory reads the same files."""
    return source if is_s3(source) else str(Path(source).expanduser().resolve())


def iter_batch(source: str, s3_client: Any = None) -> Iterator[SourceItem]:
    """Every image of a batch, in a stable order, streamed."""
    if is_manifest(source):
        yield from iter_manifest(source, s3_client)
    elif is_s3(source):
        yield from (SourceItem(uri) for uri in iter_s3_prefix(source, s3_client))
    else:
        root = Path(source).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"batch source {source!r} is neither a folder nor a manifest")
        yield from (SourceItem(str(path)) for path in iter_folder(root))


def iter_folder(root: Path) -> Iterator[Path]:
    """Files below ``root``, recursively and sorted; hidden files and ``_`` markers are skipped."""
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", "_")))
        for name in sorted(files):
            if not name.startswith((".", "_")):
                yield Path(directory) / name


def iter_s3_prefix(uri: str, s3_client: Any) -> Iterator[str]:
    """Object URIs under an ``s3://bucket/prefix``, paged; markers are skipped."""
    bucket, prefix = parse_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    paginator = s3_client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"].rsplit("/", 1)[-1]
            if name and not name.startswith((".", "_")):
                yield f"s3://{bucket}/{obj['Key']}"


def iter_manifest(location: str, s3_client: Any = None) -> Iterator[SourceItem]:
    """Rows of a CSV, Parquet or JSON Lines manifest with a ``uri`` column, checked row by row."""
    base_dir = None if is_s3(location) else Path(location).resolve().parent
    row_number = 0
    for batch in _manifest_batches(location, s3_client):
        if "uri" not in batch.column_names:
            raise ManifestError(
                f"manifest {location}: no 'uri' column (columns: {', '.join(batch.column_names)})"
            )
        for row in batch.to_pylist():
            row_number += 1
            uri = row.pop("uri")
            yield SourceItem(_checked_uri(location, row_number, uri, base_dir), row)
    if row_number == 0:
        raise ManifestError(f"manifest {location}: it has no rows")


def _checked_uri(location: str, row: int, uri: Any, base_dir: Path | None) -> str:
    where = f"manifest {location}, row {row}"
    if uri is None or (isinstance(uri, str) and not uri.strip()):
        raise ManifestError(f"{where}: the uri is empty")
    if not isinstance(uri, str):
        raise ManifestError(f"{where}: the uri {uri!r} is not text")
    uri = uri.strip()
    if is_s3(uri):
        try:
            bucket, key = parse_s3_uri(uri)
        except ValueError as error:
            raise ManifestError(f"{where}: malformed S3 uri {uri!r}: {error}") from None
        if not key or key.endswith("/"):
            raise ManifestError(f"{where}: S3 uri {uri!r} names no object")
        return uri
    if "://" in uri:
        raise ManifestError(f"{where}: unsupported uri scheme in {uri!r} (use a path or s3://)")
    if any(ord(ch) < 32 for ch in uri):
        raise ManifestError(f"{where}: the uri {uri!r} has control characters")
    path = Path(uri)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return str(path)


def _manifest_batches(location: str, s3_client: Any) -> Iterator[Any]:
    """The manifest as Arrow record batches; unreadable files raise ManifestError."""
    lower = location.lower()
    try:
        source: Any = _open_binary(location, s3_client)
        if lower.endswith(".parquet"):
            yield from pq.ParquetFile(source).iter_batches(batch_size=_MANIFEST_BATCH_ROWS)
        elif lower.endswith(".csv"):
            reader = pa_csv.open_csv(
                source,
                convert_options=pa_csv.ConvertOptions(column_types={"uri": "string"}),
            )
            yield from reader
        else:
            yield from _jsonl_batches(location, source)
    except ManifestError:
        raise
    except Exception as error:
        raise ManifestError(f"manifest {location}: unreadable: {error}") from error


def _jsonl_batches(location: str, source: Any) -> Iterator[Any]:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ManifestError(f"manifest {location}, line {number}: not JSON: {error}") from None
        if not isinstance(row, dict):
            raise ManifestError(f"manifest {location}, line {number}: not a JSON object")
        rows.append(row)
        if len(rows) == _MANIFEST_BATCH_ROWS:
            yield pa.RecordBatch.from_pylist(rows)
            rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows)


def _open_binary(location: str, s3_client: Any) -> Any:
    if is_s3(location):
        bucket, key = parse_s3_uri(location)
        body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return io.BytesIO(body)
    return open(location, "rb")  # noqa: SIM115 - closed by the reader that consumes it


def read_uri(uri: str, s3_client: Any = None) -> bytes:
    """The bytes behind a URI, or SourceReadError with a reason code for the reject row."""
    if is_s3(uri):
        return _read_s3(uri, s3_client)
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise SourceReadError("missing", f"{uri}: no such file") from None
    except PermissionError:
        raise SourceReadError("denied", f"{uri}: permission denied") from None
    except IsADirectoryError:
        raise SourceReadError("unreadable", f"{uri}: is a directory") from None
    except OSError as error:
        raise SourceReadError("unreadable", f"{uri}: {error.strerror or error}") from None


def _read_s3(uri: str, s3_client: Any) -> bytes:
    """Missing or forbidden objects are the data's fault; a store that is down is not, so
    connection errors propagate and fail the shard, to be re-run."""
    from botocore.exceptions import ClientError

    bucket, key = parse_s3_uri(uri)
    try:
        return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}:
            raise SourceReadError("missing", f"{uri}: no such object ({code})") from None
        if code in {"AccessDenied", "403"}:
            raise SourceReadError("denied", f"{uri}: access denied ({code})") from None
        raise
