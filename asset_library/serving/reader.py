"""Reading the store: a lookup's record per md5, while the store is level with the lake.

The lake stays the truth: a reader answers only while the store is level with ``images`` (the
version ``meta`` records is its latest commit); otherwise it raises :class:`StoreUnavailable`
and the caller reads the lake.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from asset_library.ids import bucket_of
from asset_library.lake import ORIGINS, Lake, rows_unchanged_since
from asset_library.serving.backend import Backend, SqliteBackend
from asset_library.serving.runs import Run, by_value_index, newest, parse_runs, table, union
from asset_library.serving.schema import RECORD_COLUMNS, RECORD_SOURCES, STORE_FORMAT

_BY_MD5 = "md5 = :md5"
_ATTRIBUTE = "origin, attribute, value, value_type"


def record_sql(kind: str, runs: Sequence[Run]) -> str:
    """A record's parts over ``runs`` in one statement (one snapshot): the version the store is
    level with, the runs it read and its layout (``meta``), the image's newest record, its
    count, its attributes and its first sources (JSON arrays)."""
    head = (
        "SELECT (SELECT value FROM meta WHERE key = 'images_version'), "
        "(SELECT value FROM meta WHERE key = 'runs'), "
        "(SELECT value FROM meta WHERE key = 'format')"
    )
    if not runs:  # an empty store
        return f"{head}, NULL, NULL, '[]', '[]'"
    record = union("images", runs, "record", _BY_MD5)
    count = union("counts", runs, "n", _BY_MD5)
    attributes = (
        f"SELECT {_ATTRIBUTE} FROM ({union('attributes', runs, f'{_ATTRIBUTE}, n', _BY_MD5)}) "
        f"unioned GROUP BY {_ATTRIBUTE} HAVING sum(n) > 0"
    )
    sources = (
        "SELECT source_uri, ingested_at, shard, ordinal FROM "
        f"({newest('sources', runs, 'source_uri', _BY_MD5)}) latest "
        f"WHERE source_uri IS NOT NULL ORDER BY ingested_at, shard, ordinal "
        f"LIMIT {RECORD_SOURCES}"
    )
    if kind == "sqlite":
        attributes = (
            "SELECT json_group_array(json_array(origin, attribute, value, value_type)) "
            f"FROM ({attributes}) a"
        )
        sources = f"SELECT json_group_array(source_uri) FROM ({sources}) s"
    else:  # PostgreSQL: json_agg, the arrays as text, decoded as SQLite's are
        attributes = (
            "SELECT CAST(coalesce(json_agg(json_build_array(origin, attribute, value, "
            f"value_type)), '[]') AS text) FROM ({attributes}) a"
        )
        sources = (
            "SELECT CAST(coalesce(json_agg(source_uri ORDER BY ingested_at, shard, ordinal), "
            f"'[]') AS text) FROM ({sources}) s"
        )
    return (
        f"{head}, (SELECT record FROM ({record}) r ORDER BY run DESC LIMIT 1), "
        f"(SELECT sum(n) FROM ({count}) c), ({attributes}), ({sources})"
    )


def _value_sql(kind: str, run: Run) -> str:
    """One run's rows of an attribute value (of one origin, or any) after a cursor, in md5
    order, from its index by value (a seek, then rows in order: no sort)."""
    if kind == "sqlite":
        return (
            f"SELECT md5, origin, value_type, n FROM {table('attributes', run)} "
            f"INDEXED BY {by_value_index(run)} WHERE attribute = :attribute "
            "AND value = :value AND md5 > :after AND (:origin IS NULL OR origin = :origin) "
            "ORDER BY md5 LIMIT :chunk"
        )
    return (
        f"SELECT md5, origin, value_type, n FROM {table('attributes', run)} "
        "WHERE attribute = :attribute AND value = :value AND md5 > :after "
        "AND (CAST(:origin AS text) IS NULL OR origin = :origin) ORDER BY md5 LIMIT :chunk"
    )


#: The md5s of a page, as one parameter (a JSON array) either database expands.
_IN_PAGE = {
    "sqlite": "md5 IN (SELECT value FROM json_each(:md5s))",
    "postgresql": "md5 IN (SELECT json_array_elements_text(CAST(:md5s AS json)))",
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
    #: The runs last read from ``meta`` (``None``: not read yet), and their text.
    _runs: list[Run] | None = field(default=None, repr=False)
    _runs_text: str | None = field(default=None, repr=False)

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

    def level(self, *tables: str) -> list[Run]:
        """The store's runs, if it is level with the lake's latest commit of ``images`` (and
        of these other tables): a read of ``meta`` (a few rows) and one ``stat`` of the next
        commit's log file per table."""
        try:
            found = dict(self._query("SELECT key, value FROM meta", {}).fetchall())
        except self._errors() as error:
            self.close()
            raise StoreUnavailable(f"serving store {self._name()} unreadable: {error}") from None
        self._check_layout(found.get("format"))
        for name in ("images", *tables):
            self._check_level(found.get(f"{name}_version"), name)
        return self._runs_of(found.get("runs"))

    def _check_layout(self, layout: str | None) -> None:
        """:class:`StoreUnavailable` unless the store is of the layout this reader reads."""
        if layout != STORE_FORMAT:
            raise StoreUnavailable(
                f"serving store {self._name()} is of layout {layout!r}, not {STORE_FORMAT!r} "
                "(the next sync rebuilds it)"
            )

    def _runs_of(self, text: str | None) -> list[Run]:
        """The runs ``meta`` lists (parsed once per list)."""
        if text != self._runs_text or self._runs is None:
            self._runs, self._runs_text = parse_runs(text), text
        return self._runs

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """Several statements in one snapshot of the store (a sync commits, or merges runs
        away, between them or not at all)."""
        connection = self._open()
        sqlite = isinstance(self.store, SqliteBackend)
        if sqlite:
            connection.execute("BEGIN")
        try:
            yield
        finally:
            if self._connection is not None:  # (closed if it could not be read)
                if sqlite:
                    connection.execute("ROLLBACK")
                else:
                    self._end()

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
        (``images``: those with one), or its md5 and bucket. Read in one snapshot of the
        store, level with ``images`` and ``attributes``; :class:`StoreUnavailable` if it is
        not. Each run's rows come in md5 order from its index; merged, an md5 has the value
        while its count over the runs is above 0."""
        errors: tuple[type[Exception], ...] = (*self._errors(), ValueError, KeyError)
        try:
            with self._snapshot():
                runs = self.level("attributes")
                params = {"attribute": attribute, "value": value, "origin": origin}
                having = self._having(runs, params, after, limit)
                if not images:
                    n_buckets = self.lake.n_buckets
                    return [
                        {"md5": md5, "bucket": bucket_of(md5, n_buckets)}
                        for md5 in itertools.islice(having, limit)
                    ]
                found: list[tuple[str, str, int]] = []
                while len(found) < limit:
                    md5s = list(itertools.islice(having, limit - len(found)))
                    if not md5s:
                        break
                    found.extend(self._image_rows(runs, md5s))
            rows = _records_of([text for _, text, _ in found])
        except errors as error:
            self.close()
            raise StoreUnavailable(f"serving store {self._name()} unreadable: {error}") from None
        for row, (_, _, count) in zip(rows, found, strict=True):
            row["occurrences"] = count
        return rows

    def _having(
        self, runs: Sequence[Run], params: dict[str, Any], after: str, limit: int
    ) -> Iterator[str]:
        """The md5s after ``after`` having the value, in order: each run's rows merged."""
        merged = heapq.merge(
            *(self._value_rows(run, params, after, limit + 8) for run in runs),
            key=lambda row: row[0],
        )
        for md5, rows in itertools.groupby(merged, key=lambda row: row[0]):
            counts: dict[tuple[str, str], int] = {}
            for _, origin, value_type, n in rows:
                counts[origin, value_type] = counts.get((origin, value_type), 0) + n
            if any(n > 0 for n in counts.values()):
                yield md5

    def _value_rows(
        self, run: Run, params: dict[str, Any], after: str, chunk: int
    ) -> Iterator[tuple[str, str, str, int]]:
        """One run's rows of the value after ``after``, in md5 order, a chunk at a time (an
        md5's rows never split between chunks); each chunk twice the last."""
        sql = _value_sql(self._backend.kind, run)
        while True:
            rows = self._query(sql, {**params, "after": after, "chunk": chunk}).fetchall()
            if len(rows) < chunk:
                yield from rows
                return
            last = rows[-1][0]
            whole = [row for row in rows if row[0] != last]  # the last md5's may go on
            yield from whole
            if whole:
                after = whole[-1][0]
            chunk *= 2

    def _image_rows(self, runs: Sequence[Run], md5s: list[str]) -> list[tuple[str, str, int]]:
        """(md5, record, count) of those of ``md5s`` that have an image row, in their order."""
        where = _IN_PAGE[self._backend.kind]
        params = {"md5s": json.dumps(md5s)}
        records: dict[str, tuple[int, str | None]] = {}
        for md5, record, run in self._query(
            union("images", runs, "md5, record", where), params
        ).fetchall():
            if md5 not in records or records[md5][0] < run:
                records[md5] = (run, record)
        counts: dict[str, int] = {}
        for md5, n, _ in self._query(union("counts", runs, "md5, n", where), params).fetchall():
            counts[md5] = counts.get(md5, 0) + int(n)
        return [
            (md5, text, counts.get(md5, 0))
            for md5 in md5s
            if (text := records.get(md5, (0, None))[1]) is not None
        ]

    def record(self, md5: str) -> dict[str, Any] | None:
        """The image's record as ``Library.lookup`` gives it, ``None`` if it has none;
        :class:`StoreUnavailable` if the store cannot say. One statement: one snapshot of
        the store, even while a sync commits (read again if its runs changed since the
        last read)."""
        errors: tuple[type[Exception], ...] = (*self._errors(), ValueError, KeyError)
        try:
            for _ in range(3):
                if self._runs is None:
                    self.level()
                runs = self._runs or []
                try:
                    sql = record_sql(self._backend.kind, runs)
                    row = self._query(sql, {"md5": md5}).fetchone()
                except self._errors():
                    if self._connection is None or self._runs is None:
                        raise  # not a run merged away: the store cannot answer
                    self._end()
                    self._runs = None  # runs merged away since the last read: read them again
                    continue
                finally:
                    self._end()
                version, runs_text, layout, text, count, attributes, sources = row
                self._check_layout(layout)
                if runs_text == self._runs_text:
                    break
                self._runs_of(runs_text)  # a sync added runs since: read with them
            else:
                raise StoreUnavailable(f"serving store {self._name()}: its runs keep changing")
            self._check_level(version)
            if text is None:
                return None
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
            with self._snapshot():
                runs = self.level()
                if not runs:
                    return None
                found = self._query(
                    f"SELECT (SELECT record FROM ({union('images', runs, 'record', _BY_MD5)}) r "
                    f"ORDER BY run DESC LIMIT 1), "
                    f"(SELECT sum(n) FROM ({union('counts', runs, 'n', _BY_MD5)}) c)",
                    {"md5": md5},
                ).fetchone()
                if found is None or found[0] is None:
                    return None
                count = int(found[1] or 0)
                if offset + limit > RECORD_SOURCES and count > RECORD_SOURCES:
                    raise StoreUnavailable(
                        f"the store keeps the first {RECORD_SOURCES} sources only"
                    )
                rows = self._query(
                    f"SELECT source_uri FROM ({newest('sources', runs, 'source_uri', _BY_MD5)}) "
                    "latest WHERE source_uri IS NOT NULL "
                    "ORDER BY ingested_at, shard, ordinal LIMIT :limit OFFSET :offset",
                    {"md5": md5, "limit": limit, "offset": offset},
                ).fetchall()
                return [uri for (uri,) in rows], count
        except self._errors() as error:
            self.close()
            raise StoreUnavailable(f"serving store {self._name()} unreadable: {error}") from None


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
