"""Reading the store: a lookup's record per md5, while the store is level with the lake.

The lake stays the truth: a reader answers only while the store is level with ``images`` (the
version ``meta`` records is its latest commit); otherwise it raises :class:`StoreUnavailable`
and the caller reads the lake.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from asset_library.ids import bucket_of
from asset_library.lake import ORIGINS, Lake, rows_unchanged_since
from asset_library.serving.backend import Backend, SqliteBackend
from asset_library.serving.schema import RECORD_COLUMNS, RECORD_SOURCES

#: A record's parts in one statement: the version the store is level with, the image's row,
#: its count, its attributes and its first sources (JSON arrays, in the order of the subquery).
_RECORD_SQL = f"""
SELECT (SELECT value FROM meta WHERE key = 'images_version'), i.record, c.n,
  (SELECT json_group_array(json_array(origin, attribute, value, value_type))
   FROM attributes WHERE md5 = :md5),
  (SELECT json_group_array(source_uri) FROM (
     SELECT source_uri FROM sources WHERE md5 = :md5
     ORDER BY ingested_at, shard, ordinal LIMIT {RECORD_SOURCES}))
FROM images i LEFT JOIN counts c ON c.md5 = i.md5 WHERE i.md5 = :md5
"""
#: The same in PostgreSQL (``json_agg``; the arrays as text, decoded as SQLite's are).
_PG_RECORD_SQL = f"""
SELECT (SELECT value FROM meta WHERE key = 'images_version'), i.record, c.n,
  (SELECT CAST(coalesce(json_agg(json_build_array(origin, attribute, value, value_type)),
                        '[]') AS text)
   FROM attributes WHERE md5 = :md5),
  (SELECT CAST(coalesce(json_agg(source_uri ORDER BY ingested_at, shard, ordinal), '[]')
               AS text) FROM (
     SELECT source_uri, ingested_at, shard, ordinal FROM sources WHERE md5 = :md5
     ORDER BY ingested_at, shard, ordinal LIMIT {RECORD_SOURCES}) first)
FROM images i LEFT JOIN counts c ON c.md5 = i.md5 WHERE i.md5 = :md5
"""


#: The images having an attribute value (of one origin, or any) after a cursor, in md5 order,
#: from the index by value (a seek, then rows in order: no sort); an md5 holding the value
#: under several origins or types comes once per such row, next to each other.
_WITH_VALUE = (
    "FROM attributes a INDEXED BY attributes_by_value "
    "WHERE a.attribute = :attribute AND a.value = :value AND a.md5 > :after "
    "AND (:origin IS NULL OR a.origin = :origin) ORDER BY a.md5"
)
#: Those with an ``images`` row (an md5 whose shard is written but not merged has none), with
#: the row and the count.
_IMAGES_WITH_VALUE = (
    "SELECT a.md5, i.record, c.n "
    + _WITH_VALUE.replace("WHERE", "JOIN images i ON i.md5 = a.md5 "
                          "LEFT JOIN counts c ON c.md5 = a.md5 WHERE")
)  # fmt: skip
_MD5S_WITH_VALUE = f"SELECT a.md5 {_WITH_VALUE}"
#: The same in PostgreSQL, which sends a result whole: one row per md5, ``limit`` of them.
_PG_WITH_VALUE = (
    "FROM attributes a WHERE a.attribute = :attribute AND a.value = :value AND a.md5 > :after "
    "AND (CAST(:origin AS text) IS NULL OR a.origin = :origin) ORDER BY a.md5 LIMIT :limit"
)
_PG_IMAGES_WITH_VALUE = (
    "SELECT DISTINCT ON (a.md5) a.md5, i.record, c.n "
    + _PG_WITH_VALUE.replace("WHERE", "JOIN images i ON i.md5 = a.md5 "
                             "LEFT JOIN counts c ON c.md5 = a.md5 WHERE")
)  # fmt: skip
_PG_MD5S_WITH_VALUE = f"SELECT DISTINCT a.md5 {_PG_WITH_VALUE}"
_SQL = {
    "sqlite": {"record": _RECORD_SQL, True: _IMAGES_WITH_VALUE, False: _MD5S_WITH_VALUE},
    "postgresql": {
        "record": _PG_RECORD_SQL,
        True: _PG_IMAGES_WITH_VALUE,
        False: _PG_MD5S_WITH_VALUE,
    },
}


#: How much of the store a reader maps into memory (SQLite caps it at its build's maximum).
MMAP_BYTES = 1 << 40


class StoreUnavailable(Exception):
    """Why the store cannot answer now (absent, damaged, behind the lake): read the lake."""


@dataclass
class StoreReader:
    """A read-only connection to the store (``None``: the library has none), for one thread
    at a time: each thread (each ``Library``) has its own."""

    store: Backend | Path | None
    lake: Lake
    _connection: Any = field(default=None, repr=False)
    _next_logs: dict[str, str] = field(default_factory=dict, repr=False)
    #: Per table, the version the store records and the latest version known to have
    #: changed no row since it.
    _level_at: dict[str, tuple[str, int]] = field(default_factory=dict, repr=False)
    _s3: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.store, Path):
            self.store = SqliteBackend(self.store)

    @property
    def _backend(self) -> Backend:
        if self.store is None:
            raise StoreUnavailable("the library has no serving store")
        assert isinstance(self.store, Backend)
        return self.store

    def _name(self) -> str:
        return "" if self.store is None else self._backend.describe()

    def _open(self) -> Any:
        if self._connection is None:
            backend = self._backend
            if self.lake.is_s3 and isinstance(backend, SqliteBackend):
                raise StoreUnavailable("a SQLite serving store serves a folder library's lake")
            try:
                connection = backend.connect_reader()
            except FileNotFoundError as missing:
                raise StoreUnavailable(str(missing)) from None
            except backend.errors as error:
                raise StoreUnavailable(f"serving store {self._name()}: {error}") from None
            if isinstance(backend, SqliteBackend):
                # Pages read from the OS's cache in place (up to SQLite's cap, 2 GB): a page of
                # images is a row here, a row there; 1.6x quicker than a read call for each.
                connection.execute(f"PRAGMA mmap_size = {MMAP_BYTES}").fetchall()
            self._connection = connection
        return self._connection

    def _query(self, sql: str, params: dict[str, Any]) -> Any:
        """A cursor over ``sql`` (``:name`` parameters) on the open connection."""
        cursor = self._open().cursor()
        cursor.execute(self._backend.reader_sql(sql), params)
        return cursor

    def _end(self) -> None:
        """The end of a read: PostgreSQL's snapshot let go (the next read sees new commits)."""
        if self._connection is not None and not isinstance(self.store, SqliteBackend):
            self._connection.rollback()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _errors(self) -> tuple[type[Exception], ...]:
        return (ValueError, KeyError) if self.store is None else self._backend.errors

    def level(self, *tables: str) -> Any:
        """The connection, if the store is level with the lake's latest commit of ``images``
        (and of these other tables): a read of ``meta`` (a few rows) and one ``stat`` of the
        next commit's log file per table."""
        try:
            found = dict(self._query("SELECT key, value FROM meta", {}).fetchall())
        except self._errors() as error:
            self.close()
            raise StoreUnavailable(f"serving store {self._name()} unreadable: {error}") from None
        for table in ("images", *tables):
            self._check_level(found.get(f"{table}_version"), table)
        return self._connection

    def _check_level(self, version: str | None, table: str = "images") -> None:
        """:class:`StoreUnavailable` unless ``table`` has no commit after ``version`` (the
        one the store records)."""
        if version is None:
            raise StoreUnavailable(f"serving store {self._name()} records no {table} version")
        if table not in self._next_logs:
            self._next_logs[table] = os.path.join(
                self.lake.uri(table), "_delta_log", "{:020d}.json"
            )
        recorded, level_at = self._level_at.get(table, (version, int(version)))
        if recorded != version:  # the store moved on: what was learnt of the old one is moot
            level_at = int(version)
        if self._exists(self._next_logs[table].format(level_at + 1)):
            # Commits that changed no row (a compaction's rewrite, a vacuum) leave the store
            # level: learnt once per new commit, then one stat a read again.
            later = rows_unchanged_since(self.lake, table, level_at)
            if later is None:
                raise StoreUnavailable(
                    f"serving store {self._name()} is behind the lake "
                    f"(at {table} version {version})"
                )
            level_at = later
        self._level_at[table] = (version, level_at)

    def _exists(self, log: str) -> bool:
        """Whether a commit's log file exists: a ``stat``, or one ``HEAD`` on S3."""
        if not self.lake.is_s3:
            return os.path.exists(log)
        if self._s3 is None:
            from asset_library.storage.s3_store import s3_client_from_env

            self._s3 = s3_client_from_env(max_attempts=2, read_timeout=10.0)
        bucket, _, key = log.removeprefix("s3://").partition("/")
        try:
            self._s3.head_object(Bucket=bucket, Key=key)
        except Exception as error:  # botocore's ClientError: a 404 says there is none
            status = getattr(error, "response", {}).get("ResponseMetadata", {})
            if status.get("HTTPStatusCode") == 404:
                return False
            raise StoreUnavailable(f"the lake's {log} unreadable: {error}") from None
        return True

    def with_attribute(
        self, attribute: str, value: str, origin: str | None, after: str, limit: int, images: bool
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` images having the attribute value (of ``origin``, or any), their md5
        after ``after``, in md5 order: each image's row as the ``images`` view gives it
        (``images``), or its md5 and bucket. Read in one snapshot of the store, level with
        ``images`` and ``attributes``; :class:`StoreUnavailable` if it is not."""
        errors: tuple[type[Exception], ...] = (*self._errors(), ValueError, KeyError)
        try:
            connection = self._open()
            sqlite = isinstance(self.store, SqliteBackend)
            if sqlite:
                connection.execute("BEGIN")  # the level seen and the rows read: one snapshot
            try:
                self.level("attributes")
                params = {
                    "attribute": attribute,
                    "value": value,
                    "after": after,
                    "origin": origin,
                    "limit": limit,
                }
                cursor = self._query(_SQL[self._backend.kind][images], params)
                found: list[tuple[str, str, int | None]] = []
                last = after
                for row in cursor:  # stepped lazily: a page reads its own rows only
                    if row[0] == last:
                        continue  # the same image under another origin or type
                    last = row[0]
                    found.append(row if images else (last, "", None))
                    if len(found) == limit:
                        break
                cursor.close()
            finally:
                if self._connection is not None:  # (closed if it could not be read)
                    if sqlite:
                        connection.execute("ROLLBACK")
                    else:
                        self._end()
            if not images:
                n_buckets = self.lake.n_buckets
                return [{"md5": md5, "bucket": bucket_of(md5, n_buckets)} for md5, *_ in found]
            rows = _records_of([text for _, text, _ in found])
        except errors as error:
            self.close()
            raise StoreUnavailable(f"serving store {self._name()} unreadable: {error}") from None
        for row, (_, _, count) in zip(rows, found, strict=True):
            row["occurrences"] = int(count or 0)
        return rows

    def record(self, md5: str) -> dict[str, Any] | None:
        """The image's record as ``Library.lookup`` gives it, ``None`` if it has none;
        :class:`StoreUnavailable` if the store cannot say. One statement: one snapshot of
        the store, even while a sync commits."""
        errors: tuple[type[Exception], ...] = (*self._errors(), ValueError, KeyError)
        try:
            try:
                row = self._query(_SQL[self._backend.kind]["record"], {"md5": md5}).fetchone()
                if row is None:
                    self.level()
                    return None
            finally:
                self._end()
            version, text, count, attributes, sources = row
            self._check_level(version)
            record = _record_of(text)
            record["occurrences"] = int(count or 0)
            record["attributes"] = attributes_by_origin(
                (name, value, kind, origin) for origin, name, value, kind in json.loads(attributes)
            )
            record["sources"] = json.loads(sources)
        except errors as error:
            self.close()
            raise StoreUnavailable(f"serving store {self._name()} unreadable: {error}") from None
        record["sources_count"] = record["occurrences"]
        return record

    def sources(self, md5: str, limit: int, offset: int) -> tuple[list[str], int] | None:
        """A page of the image's sources and their count (``None``: no such image), when the
        store keeps that page; :class:`StoreUnavailable` if it does not."""
        try:
            self.level()
            found = self._query(
                "SELECT c.n FROM images i LEFT JOIN counts c ON c.md5 = i.md5 WHERE i.md5 = :md5",
                {"md5": md5},
            ).fetchone()
            if found is None:
                return None
            count = int(found[0] or 0)
            if offset + limit > RECORD_SOURCES and count > RECORD_SOURCES:
                raise StoreUnavailable(f"the store keeps the first {RECORD_SOURCES} sources only")
            rows = self._query(
                "SELECT source_uri FROM sources WHERE md5 = :md5 "
                "ORDER BY ingested_at, shard, ordinal LIMIT :limit OFFSET :offset",
                {"md5": md5, "limit": limit, "offset": offset},
            ).fetchall()
            return [uri for (uri,) in rows], count
        except self._errors() as error:
            self.close()
            raise StoreUnavailable(f"serving store {self._name()} unreadable: {error}") from None
        finally:
            self._end()


def _record_of(text: str) -> dict[str, Any]:
    return _records_of([text])[0]


def _records_of(texts: list[str]) -> list[dict[str, Any]]:
    """Records from their JSON texts: decoded as one array (a decode per record costs twice
    as much), each ingest time parsed once (a shard's images share a few)."""
    times: dict[str, datetime] = {}
    records = []
    for values in json.loads(f"[{','.join(texts)}]"):
        record = dict(zip(RECORD_COLUMNS, values, strict=True))
        stamp = record["ingested_at"]
        if stamp is not None:
            parsed = times.get(stamp)
            if parsed is None:
                parsed = times[stamp] = datetime.fromisoformat(stamp)
            record["ingested_at"] = parsed
        records.append(record)
    return records


def attributes_by_origin(rows: Iterable[tuple[str, str, str, str]]) -> dict[str, dict[str, Any]]:
    """``{origin: {name: value}}`` from distinct (name, value, value_type, origin) rows: one
    value as itself (typed), several (a multi-valued attribute) as the list of them, sorted by
    their text."""
    values: dict[str, dict[str, list[Any]]] = {origin: {} for origin in ORIGINS}
    for name, value, kind, origin in sorted(set(rows)):
        values[origin].setdefault(name, []).append(typed_value(value, kind))
    return {
        origin: {name: found[0] if len(found) == 1 else found for name, found in named.items()}
        for origin, named in values.items()
    }


def typed_value(value: str, value_type: str) -> Any:
    """A cube value (text) as the type its ``value_type`` names; as text if it is not one."""
    try:
        if value_type == "integer":
            return int(value)
        if value_type == "double":
            return float(value)
        if value_type == "boolean":
            return value == "true"
    except ValueError:
        return value
    return value
