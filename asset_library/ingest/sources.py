"""Where batches come from: a folder, an S3 prefix, or a manifest of URIs with extra columns.

A batch is listed as a stream of :class:`SourceItem` (a URI and the manifest's extra columns),
never held whole in memory. A bad manifest stops planning with an error that names the file, the
row and the reason; a URI that cannot be read at ingest time becomes a reject row instead.

Manifest values are kept as the text that was written (``02134`` stays ``02134``, ``NA`` stays
``NA``): CSV cells are read as text, never type-guessed; JSON Lines string values are kept and
other JSON values become their JSON text; Parquet values are rendered as text. An empty cell, a
JSON ``null`` or a missing key means the image has no value for that column; a column name or
JSON key given twice is refused, since only one of its values could be kept. Bytes that are not
UTF-8 are decoded with U+FFFD in their place. Local URIs are recorded resolved (absolute, no
``..``, no symlinks); what a batch may read is decided in :mod:`asset_library.ingest.access`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from asset_library.ingest.access import ReadPolicy, SourceReadError, resolved
from asset_library.s3 import is_s3
from asset_library.storage import parse_s3_uri

__all__ = ["ManifestError", "SourceItem", "SourceReadError", "iter_batch", "read_uri"]

MANIFEST_SUFFIXES = (".csv", ".parquet", ".jsonl", ".ndjson")
READY_MARKER = "_READY"
_MANIFEST_BATCH_ROWS = 65_536
#: A CSV row must fit in one block; 32 MiB keeps cells of many megabytes readable.
_CSV_BLOCK_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One image to ingest: where its bytes are, and the business attributes that came with it
    (column name -> the text written in the manifest)."""

    uri: str
    extras: dict[str, str] = field(default_factory=dict)


class ManifestError(ValueError):
    """A manifest that cannot be planned; the message names the file, the row and the reason."""


def is_manifest(location: str) -> bool:
    return location.lower().endswith(MANIFEST_SUFFIXES)


def normalize_source(source: str) -> str:
    """A source as recorded in a plan: S3 URIs as given, local paths made absolute, so a shard
    run started from any working directory reads the same files."""
    return source if is_s3(source) else str(Path(source).expanduser().resolve())


def check_source(source: str) -> None:
    """Refuse a local source that is not there (a manifest that is no file, a folder that is no
    folder) before anything is created or run for it; an S3 source is checked by its listing."""
    if is_s3(source):
        return
    path = Path(source).expanduser()
    if is_manifest(source) and not path.is_file():
        raise FileNotFoundError(f"batch source {source!r}: no such manifest file")
    if not is_manifest(source) and not path.is_dir():
        raise FileNotFoundError(f"batch source {source!r} is neither a folder nor a manifest")


def iter_batch(source: str, s3_client: Any = None) -> Iterator[SourceItem]:
    """Every image of a batch, in a stable order, streamed."""
    if is_manifest(source):
        yield from iter_manifest(source, s3_client)
    elif is_s3(source):
        yield from (SourceItem(uri) for uri in iter_s3_prefix(source, s3_client))
    else:
        check_source(source)
        root = Path(source).expanduser().resolve()
        resolve = _Resolver()
        yield from (SourceItem(resolve(str(path))) for path in iter_folder(root))


def iter_folder(root: Path) -> Iterator[Path]:
    """Files below ``root``, recursively and sorted; hidden files and ``_`` markers are skipped.
    Linked folders are not descended into; linked files are listed (and refused when read if
    they lead out of the batch)."""
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
    """Rows of a CSV, Parquet or JSON Lines manifest with a ``uri`` column, checked row by row.
    Relative local URIs resolve in the manifest's folder; a manifest on S3 has no folder."""
    base_dir = None if is_s3(location) else Path(resolved(location)).parent
    resolve = _Resolver()
    rows = 0
    for row_number, row in _manifest_rows(location, s3_client):
        rows += 1
        if "uri" not in row:
            raise ManifestError(f"manifest {location}, row {row_number}: no 'uri' value")
        uri = row.pop("uri")
        extras = {name: text for name, value in row.items() if (text := as_text(value))}
        yield SourceItem(_checked_uri(location, row_number, uri, base_dir, resolve), extras)
    if rows == 0:
        raise ManifestError(f"manifest {location}: it has no rows")


def as_text(value: Any) -> str | None:
    """A manifest value as text; ``None`` for no value (null or empty)."""
    if type(value) is str:
        return value or None
    if value is None:
        return None
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    elif isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, datetime):
        text = value.isoformat(sep=" ")
    elif isinstance(value, date | time):
        text = value.isoformat()
    elif isinstance(value, int | float | Decimal):
        text = str(value)
    else:
        text = json.dumps(value, default=str, ensure_ascii=False)
    return text or None


class _Resolver:
    """:func:`resolved` for many files of few folders: each folder is resolved once per
    listing, each file's last component is still checked for a link. A folder changed into a
    link after this is caught when the file is read (the reader resolves again)."""

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        folder, name = os.path.split(path)
        if name in ("", ".", ".."):
            return resolved(path)
        real_folder = self._folders.get(folder)
        if real_folder is None:
            if len(self._folders) > 10_000:
                self._folders.clear()
            real_folder = self._folders[folder] = resolved(folder)
        full = os.path.join(real_folder, name)
        return resolved(full) if os.path.islink(full) else full


def _checked_uri(
    location: str, row: int, uri: Any, base_dir: Path | None, resolve: _Resolver
) -> str:
    where = f"manifest {location}, row {row}"
    if isinstance(uri, bytes):
        uri = uri.decode("utf-8", errors="replace")
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
    path = Path(uri).expanduser()
    if not path.is_absolute():
        if base_dir is None:
            return uri  # a relative path in an S3 manifest: nothing to resolve it in, refused
        path = base_dir / path
    return resolve(str(path))


def _manifest_rows(location: str, s3_client: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, column -> value) of a manifest; unreadable files raise ManifestError."""
    lower = location.lower()
    try:
        if lower.endswith(".parquet"):
            yield from _parquet_rows(location, _open_binary(location, s3_client))
        elif lower.endswith(".csv"):
            yield from _csv_rows(location, _open_binary(location, s3_client))
        else:
            yield from _jsonl_rows(location, _open_binary(location, s3_client))
    except ManifestError:
        raise
    except Exception as error:
        raise ManifestError(f"manifest {location}: unreadable: {error}") from error


def _parquet_rows(location: str, source: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    manifest = pq.ParquetFile(source)
    _require_uri_column(location, manifest.schema_arrow.names)
    _require_unique_names(location, "its columns", manifest.schema_arrow.names)
    number = 0
    for batch in manifest.iter_batches(batch_size=_MANIFEST_BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _csv_rows(location: str, source: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every cell as text: read as bytes (no type guessing, no null spellings), then decoded.
    The header is read first (a reader's schema), then the file again with every column typed
    as bytes."""
    read_options = pa_csv.ReadOptions(block_size=_CSV_BLOCK_BYTES, use_threads=False)
    bad_rows: list[Any] = []

    def on_bad_row(row: Any) -> str:
        bad_rows.append(row)
        return "error"

    parse_options = pa_csv.ParseOptions(invalid_row_handler=on_bad_row)
    number = 0
    try:
        names = pa_csv.open_csv(source, read_options, parse_options).schema.names
        _require_uri_column(location, names)
        _require_unique_names(location, "the header (line 1)", names)
        source.seek(0)
        reader = pa_csv.open_csv(
            source,
            read_options,
            parse_options,
            pa_csv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.binary()),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                null_values=[],
            ),
        )
        for batch in reader:
            columns = [_as_strings(column) for column in batch.columns]
            for values in zip(*columns, strict=True):
                number += 1
                yield number, dict(zip(names, values, strict=True))
    except pa.ArrowInvalid as error:
        if "Empty CSV" in str(error):
            raise ManifestError(f"manifest {location}: the file is empty (no header row)") from None
        if not bad_rows:
            raise
        bad = bad_rows[0]
        line = f"row {bad.number - 1} (line {bad.number})" if bad.number else f"after row {number}"
        raise ManifestError(
            f"manifest {location}, {line}: expected {bad.expected_columns} columns, "
            f"got {bad.actual_columns}"
        ) from None


def _as_strings(column: pa.Array) -> list[str]:
    """A column of CSV bytes as text: checked as UTF-8 by Arrow, decoded with U+FFFD in
    Python only when it is not."""
    try:
        return column.cast(pa.string()).to_pylist()
    except pa.ArrowInvalid:
        return [value.decode("utf-8", errors="replace") for value in column.to_pylist()]


def _jsonl_rows(location: str, source: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """One JSON object per line; keys may differ from row to row (a missing key: no value)."""
    for number, line in enumerate(source, start=1):
        text = line.decode("utf-8", errors="replace")
        if not text.strip():
            continue
        try:
            row = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as error:
            raise ManifestError(f"manifest {location}, line {number}: not JSON: {error}") from None
        except _RepeatedKeyError as error:
            raise _repeated_name(location, f"line {number}", error.key) from None
        if not isinstance(row, dict):
            raise ManifestError(f"manifest {location}, line {number}: not a JSON object")
        yield number, row


class _RepeatedKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key written twice: ``json`` keeps only the last."""
    row = dict(pairs)
    if len(row) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKeyError(key)
            seen.add(key)
    return row


def _require_unique_names(location: str, where: str, names: list[str]) -> None:
    """Refuse a column named twice: a row read into a dict would keep only its last value."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise _repeated_name(location, where, name)
        seen.add(name)


def _repeated_name(location: str, where: str, name: str) -> ManifestError:
    return ManifestError(
        f"manifest {location}, {where}: the name {name!r} is repeated, so all but one of its "
        "values would be lost; give each column its own name"
    )


def _require_uri_column(location: str, names: list[str]) -> None:
    if "uri" not in names:
        raise ManifestError(f"manifest {location}: no 'uri' column (columns: {', '.join(names)})")


def _open_binary(location: str, s3_client: Any) -> Any:
    if is_s3(location):
        bucket, key = parse_s3_uri(location)
        body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return io.BytesIO(body)
    return open(location, "rb")  # noqa: SIM115 - closed by the reader that consumes it


def read_uri(uri: str, s3_client: Any = None, policy: ReadPolicy | None = None) -> bytes:
    """The bytes behind a URI, or SourceReadError with a reason code for the reject row.
    Local files are read only where ``policy`` allows (by default: nowhere)."""
    policy = policy or ReadPolicy()
    if is_s3(uri):
        return policy.read_s3(uri, s3_client)
    return policy.read_local(uri)
