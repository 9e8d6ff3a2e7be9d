"""Where the store lives: a SQLite file in a folder library (the embedded default) or a
PostgreSQL database (``ASSET_LIBRARY_SERVING_STORE=postgresql://…``), which several ``serve``
replicas on several machines read and which an ``s3://`` library needs.

The sync and the reader write their statements once, with ``?`` parameters and SQL both
databases take (``ON CONFLICT`` upserts); what differs per database lives here: the tables'
DDL, how a connection is opened, how a batch of rows is written (``executemany`` in SQLite,
``COPY`` into a staging table, then one ``INSERT … SELECT`` in PostgreSQL), the errors that
mean "cannot answer".
"""

from __future__ import annotations

import io
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from asset_library.serving.schema import RUN_SCHEMA, SCHEMA, network_filesystem, remove_store

#: The setting naming a PostgreSQL store; unset, a folder library keeps a SQLite file.
STORE_SETTING = "ASSET_LIBRARY_SERVING_STORE"
#: The store's password, when the setting's URL carries none (libpq's ``PGPASSWORD`` works too).
PASSWORD_SETTING = "ASSET_LIBRARY_SERVING_STORE_PASSWORD"
#: Seconds a connection to a PostgreSQL store may take before the store counts as unavailable.
CONNECT_TIMEOUT_S = 5
#: What a SQLite store's WAL is cut to once checkpointed (bytes).
WAL_LIMIT_BYTES = 64 << 20
#: Rows per ``COPY`` into PostgreSQL's staging tables: what one buffer holds at most.
PG_PAGE = 50_000

#: The tables in PostgreSQL: the SQLite layout, with text compared byte-wise (``"C"``) so md5s,
#: ingest times and shard names order as in SQLite and DuckDB whatever the database's locale.
PG_SCHEMA = (
    'CREATE TABLE IF NOT EXISTS meta (key TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL);'
)
PG_RUN_SCHEMA = """
CREATE TABLE images_{run} (md5 TEXT COLLATE "C" PRIMARY KEY, record TEXT);
CREATE TABLE counts_{run} (md5 TEXT COLLATE "C" PRIMARY KEY, n BIGINT NOT NULL);
CREATE TABLE sources_{run} (
  md5 TEXT COLLATE "C", ingested_at TEXT COLLATE "C", shard TEXT COLLATE "C", ordinal BIGINT,
  source_uri TEXT, PRIMARY KEY (md5, ingested_at, shard, ordinal));
CREATE TABLE attributes_{run} (
  md5 TEXT COLLATE "C", origin TEXT COLLATE "C", attribute TEXT COLLATE "C",
  value TEXT COLLATE "C", value_type TEXT COLLATE "C", n BIGINT NOT NULL,
  PRIMARY KEY (md5, origin, attribute, value, value_type));
"""
#: The store's tables (a run's carry its id): what a rebuild drops, and what is weighed.
STORE_TABLES = r"^(meta|(images|counts|sources|attributes)(_[0-9]+)?)$"
#: A statement inserting rows one by one: its table and what follows its VALUES.
_INSERT = re.compile(r"INSERT INTO (\w+) VALUES \(\?(?:, \?)*\)(.*)", re.S)
#: What COPY's text format escapes in a value.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class StoreWriter:
    """One write connection: statements with ``?`` parameters, rows written in bulk."""

    #: The scalar function giving the smaller of two values.
    least = "min"
    #: A key column's type, comparable with the tables' md5s.
    key = "TEXT"
    #: A run's tables (``{run}``: its id).
    run_schema = RUN_SCHEMA

    #: The statement listing the database's tables.
    list_tables = "SELECT name FROM sqlite_schema WHERE type = 'table'"

    def drop_store_tables(self) -> None:
        """Every table of the store but ``meta`` gone (whatever layout or runs it held)."""
        for (name,) in self.execute(self.list_tables):
            if name != "meta" and re.match(STORE_TABLES, name):
                self.execute(f"DROP TABLE IF EXISTS {name}")

    def create_run(self, run: int) -> None:
        """A run's empty tables."""
        for statement in self.run_schema.format(run=run).split(";"):
            if statement.strip():
                self.execute(statement)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        raise NotImplementedError

    def write(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """``sql`` once per row, in bulk."""
        raise NotImplementedError


class Backend:
    """A store's database: how it is opened, written and named."""

    #: The errors that mean the store cannot answer (read the lake).
    errors: tuple[type[Exception], ...] = ()
    #: The errors after which the store is rebuilt from nothing (a damaged file).
    damaged: tuple[type[Exception], ...] = ()
    #: The placeholder style readers write in (``:name``), as this database takes it.
    kind = ""

    def describe(self) -> str:
        """The store's name for messages and metadata (never a password)."""
        raise NotImplementedError

    @contextmanager
    def transaction(self) -> Iterator[StoreWriter]:
        """One write transaction over the store's tables (created if absent)."""
        raise NotImplementedError
        yield

    def remove(self) -> None:
        """The store gone: rebuilt from nothing by the next sync."""

    def connect_reader(self) -> Any:
        """A read-only connection (DB-API), for one thread at a time."""
        raise NotImplementedError

    def reader_sql(self, sql: str) -> str:
        """A reader's statement (``:name`` parameters) as this database takes it."""
        return sql

    def size_bytes(self) -> int:
        """What the store's tables and indexes weigh."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# SQLite


class _SqliteWriter(StoreWriter):
    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.connection.execute(sql, params).fetchall()

    def write(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.connection.executemany(sql, rows)


@dataclass(frozen=True)
class SqliteBackend(Backend):
    """The store in one SQLite file of a folder library (WAL: readers keep their snapshot
    while a sync writes). Not on a network filesystem: SQLite's locks are not to be trusted
    there."""

    path: Path
    errors = (sqlite3.Error,)
    damaged = (sqlite3.DatabaseError,)
    kind = "sqlite"

    def describe(self) -> str:
        return str(self.path)

    @contextmanager
    def transaction(self) -> Iterator[StoreWriter]:
        found = network_filesystem(self.path.parent)
        if found is not None:
            raise ValueError(f"{self.path}: SQLite on a network filesystem ({found}) is not safe")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode = WAL").fetchall()
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}").fetchall()
            # A shard's rows land all over the B-trees: a cache that holds their pages (a cap,
            # allocated as used) spares reading each page back once per row.
            connection.execute("PRAGMA cache_size = -262144")
            connection.executescript(SCHEMA)
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteWriter(connection)
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            # Every page a sync changed is in the WAL: copied into the file, the WAL is cut to
            # nothing (a shard's sync can dirty most pages of a large store: a WAL as large as
            # the store, kept, doubled its disk and slowed each read through its index). A
            # reader on an older snapshot makes this a passive checkpoint; the limit then cuts
            # the WAL when the next writer starts it over.
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            connection.close()

    def remove(self) -> None:
        remove_store(self.path)

    def connect_reader(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise FileNotFoundError(f"no serving store at {self.path}")
        return sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, check_same_thread=False)

    def size_bytes(self) -> int:
        return sum(
            Path(f"{self.path}{suffix}").stat().st_size
            for suffix in ("", "-wal")
            if Path(f"{self.path}{suffix}").exists()
        )


# --------------------------------------------------------------------------------------------
# PostgreSQL


class _PgWriter(StoreWriter):
    least = "LEAST"
    key = 'TEXT COLLATE "C"'
    run_schema = PG_RUN_SCHEMA
    list_tables = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"

    def __init__(self, connection: Any) -> None:
        self.cursor = connection.cursor()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        self.cursor.execute(sql.replace("?", "%s"), tuple(params))
        return self.cursor.fetchall() if self.cursor.description is not None else []

    def write(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        from psycopg2.extras import execute_batch

        insert = _INSERT.match(sql)
        if insert is None:  # a DELETE per key (rare: removed images and sources)
            execute_batch(self.cursor, sql.replace("?", "%s"), list(rows), page_size=1000)
            return
        # An INSERT: the rows copied into a staging table (COPY: no statement to parse per
        # row), then moved by one INSERT … SELECT with the statement's ON CONFLICT clause.
        table, rest = insert.group(1), insert.group(2)
        stage = f"stage_{table}"
        self.cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table})")
        batch: list[Sequence[Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == PG_PAGE:
                self._copy(stage, batch)
                batch = []
        if batch:
            self._copy(stage, batch)
        self.cursor.execute(f"INSERT INTO {table} SELECT * FROM {stage}{rest}")
        self.cursor.execute(f"TRUNCATE {stage}")

    def _copy(self, stage: str, rows: list[Sequence[Any]]) -> None:
        """Rows into ``stage`` by ``COPY`` (text format: ``\\N`` for NULL, escapes for the
        characters it reserves)."""
        text = io.StringIO()
        for row in rows:
            text.write(
                "\t".join("\\N" if v is None else str(v).translate(_COPY_ESCAPES) for v in row)
            )
            text.write("\n")
        text.seek(0)
        self.cursor.copy_expert(f"COPY {stage} FROM STDIN", text)


def _psycopg2() -> Any:
    import psycopg2

    return psycopg2


@dataclass(frozen=True)
class PostgresBackend(Backend):
    """The store in a PostgreSQL database (``postgresql://user@host:port/db``): a sync is one
    transaction, so readers on any machine see the old state or the new (MVCC)."""

    url: str
    kind = "postgresql"

    @property
    def errors(self) -> tuple[type[Exception], ...]:  # type: ignore[override]
        return (_psycopg2().Error,)

    def describe(self) -> str:
        return redact(self.url)

    def _connect(self) -> Any:
        password = os.environ.get(PASSWORD_SETTING)
        extra = {"password": password} if password and not urlsplit(self.url).password else {}
        # A store that does not answer within seconds is unavailable: lookups read the lake.
        return _psycopg2().connect(
            self.url, application_name="asset-library", connect_timeout=CONNECT_TIMEOUT_S, **extra
        )

    @contextmanager
    def transaction(self) -> Iterator[StoreWriter]:
        connection = self._connect()
        try:
            with connection:  # one transaction: committed, or rolled back on an error
                writer = _PgWriter(connection)
                # Two syncs at once would interleave their changes: the second waits.
                writer.execute("SELECT pg_advisory_xact_lock(hashtext('asset-library store'))")
                writer.cursor.execute(PG_SCHEMA)
                yield writer
        finally:
            connection.close()

    def remove(self) -> None:
        connection = self._connect()
        try:
            with connection:
                cursor = connection.cursor()
                cursor.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                    "AND tablename ~ %s",
                    (STORE_TABLES,),
                )
                for (name,) in cursor.fetchall():
                    cursor.execute(f'DROP TABLE IF EXISTS "{name}"')
        finally:
            connection.close()

    def connect_reader(self) -> Any:
        connection = self._connect()
        # One snapshot per call (a level check and the rows it reads), nothing written.
        connection.set_session(isolation_level="REPEATABLE READ", readonly=True)
        return connection

    def reader_sql(self, sql: str) -> str:
        return re.sub(r"(?<!:):(\w+)", r"%(\1)s", sql)

    def size_bytes(self) -> int:
        connection = self._connect()
        try:
            cursor = connection.cursor()
            cursor.execute(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
                "AND n.nspname = current_schema() AND c.relname ~ %s",
                (STORE_TABLES,),
            )
            return int(cursor.fetchone()[0])
        finally:
            connection.close()


def redact(url: str) -> str:
    """``url`` without its password (``***``): what messages and metadata may show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def backend_of(setting: str | None, sqlite_path: Path | None) -> Backend | None:
    """The store a library uses: PostgreSQL if ``setting`` names one, else the SQLite file at
    ``sqlite_path`` (``None``: the library has no store, as an ``s3://`` library without the
    setting). A setting of another scheme is named in the error."""
    if setting:
        scheme = urlsplit(setting).scheme
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(
                f"{STORE_SETTING}={redact(setting)!r}: not a postgresql:// URL "
                "(unset it for the SQLite file in a folder library)"
            )
        return PostgresBackend(setting)
    return None if sqlite_path is None else SqliteBackend(sqlite_path)


def configured_backend(sqlite_path: Path | None) -> Backend | None:
    """:func:`backend_of` for this process's environment."""
    return backend_of(os.environ.get(STORE_SETTING), sqlite_path)
