"""Read-only SQL for readers of a library: one query per call, and no files but the library's.

Two layers, because neither is enough alone:

- :func:`check_read_only_query` accepts exactly one statement that is a query. DuckDB parses as
  a "query" more than reads (``WITH x AS (COPY ... TO ...) SELECT ...`` writes a file,
  ``WITH x AS (INSERT ...)`` writes rows, ``json_execute_serialized_sql`` runs SQL given as
  text), so the whole syntax tree is checked, not only the statement's type.
- :func:`lock_down` turns a catalog connection's database off for everything outside the
  library: no file but the allowed ones is readable or writable, no extension is installed or
  loaded, and no setting can be changed afterwards. An allowed folder stays writable to DuckDB,
  so the statement check is what keeps ``COPY`` out of the library itself.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import duckdb

#: Query nodes that only read; any other node in a query's tree (INSERT, UPDATE, DELETE,
#: COPY inside a WITH, ...) makes it a write.
_READ_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})

#: Functions that run SQL given as text (hidden from this check) or change the database's state.
_REFUSED_FUNCTIONS = frozenset(
    {
        "query",
        "json_execute_serialized_sql",
        "checkpoint",
        "force_checkpoint",
        "truncate_duckdb_logs",
        "setval",
        "write_log",
    }
)
#: ... and those that switch a feature or a resource on or off.
_REFUSED_FUNCTION_PREFIXES = ("enable_", "disable_")
_REFUSED_FUNCTION_PART = "external_resource"

#: Settings that keep extensions out: none installed, none loaded, no new repositories.
_EXTENSION_SETTINGS: dict[str, bool | str | list[str]] = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "allow_extension_repositories": "forbidden",
}


class ReadOnlyQueryError(ValueError):
    """SQL that is not exactly one read-only query; the message names what was refused."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the library is read-only: {reason}")


class InvalidQueryError(ValueError):
    """SQL that does not parse, or no statement at all: a mistake, not a refused write."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"not valid SQL: {reason}")


def check_read_only_query(sql: str) -> str:
    """Return ``sql`` unchanged if it is exactly one query that only reads; raise
    :class:`InvalidQueryError` if it does not parse, :class:`ReadOnlyQueryError` naming what was
    refused if it is anything but one query."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise InvalidQueryError(str(error)) from None
    if not statements:
        raise InvalidQueryError("no statement given: expected one query")
    kinds = [_type_name(statement) for statement in statements]
    if len(kinds) > 1:
        raise ReadOnlyQueryError(
            f"only one statement per call: got {len(kinds)} ({', '.join(kinds)})"
        )
    if kinds[0] != duckdb.StatementType.SELECT.name:
        raise ReadOnlyQueryError(f"only queries: got {_statement_name(sql, kinds[0])}")
    tree = _syntax_tree(sql)
    for node in _walk(tree):
        node_type = node.get("type")
        if (
            isinstance(node_type, str)
            and node_type.endswith("_NODE")
            and node_type not in _READ_NODES
        ):
            name = node_type.removesuffix("_NODE").removesuffix("_QUERY")
            raise ReadOnlyQueryError(f"only queries: got {name} inside the query")
        function = node.get("function_name")
        if isinstance(function, str) and _is_refused_function(function):
            raise ReadOnlyQueryError(f"function {function}() is not allowed in a query")
    return sql


def lock_down(
    connection: duckdb.DuckDBPyConnection,
    allowed_paths: Sequence[str | os.PathLike[str]] = (),
) -> duckdb.DuckDBPyConnection:
    """Lock ``connection``'s database to reading ``allowed_paths`` only, and return it.

    Call it after the catalog's views and macros exist: views over files keep working only for
    files under ``allowed_paths`` (folders, each with everything below it, or single files;
    resolved, as the catalog spells them). Tables registered from Python (Arrow datasets) need
    no file access, so such a catalog passes none. Settings are per database: every connection
    to the same database (DuckDB shares one per file within a process) is locked with it, and
    locking an already locked database again succeeds only with the same paths.
    """
    directories, files = _split_paths(allowed_paths)
    if _setting(connection, "lock_configuration"):
        _check_same_lock(connection, directories, files)
        return connection
    settings: dict[str, bool | str | list[str]] = {
        **_EXTENSION_SETTINGS,
        "allowed_configs": [],
        "allowed_directories": directories,
        "allowed_paths": files,
        "enable_external_access": False,  # after the allowed paths: they cannot be set later
        "lock_configuration": True,  # last: nothing can be changed after it
    }
    connection.execute(";".join(f"SET {name} = {_literal(v)}" for name, v in settings.items()))
    return connection


def _literal(value: bool | str | list[str]) -> str:
    """A setting's value as SQL (one round trip for all settings instead of one each)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return "[" + ", ".join(_literal(item) for item in value) + "]"


def _split_paths(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[str], list[str]]:
    """Folders (with a trailing separator, so ``lake`` does not allow ``lake2``) and files."""
    directories, files = [], []
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if path.is_file():
            files.append(str(path))
        else:  # a folder, or one the catalog will create
            directories.append(str(path).rstrip(os.sep) + os.sep)
    return directories, files


def _check_same_lock(
    connection: duckdb.DuckDBPyConnection, directories: list[str], files: list[str]
) -> None:
    """A locked database is reused only if it allows no more than asked, besides the files
    DuckDB allows itself (the database file, its WAL, its spill folder)."""
    if _setting(connection, "enable_external_access"):
        raise RuntimeError("this database's settings are locked with external access on")
    allowed = set(_setting(connection, "allowed_directories"))
    allowed |= set(_setting(connection, "allowed_paths"))
    own = tuple(_own_paths(connection))
    extra = {path for path in allowed - {*directories, *files} if not path.startswith(own)}
    if extra or not allowed.issuperset([*directories, *files]):
        raise RuntimeError(
            f"this database is already locked to other paths ({sorted(allowed)}), "
            f"not {[*directories, *files]}"
        )


def _own_paths(connection: duckdb.DuckDBPyConnection) -> Iterator[str]:
    yield str(Path(_setting(connection, "temp_directory")).resolve())
    for (path,) in connection.execute(
        "SELECT path FROM duckdb_databases() WHERE path IS NOT NULL"
    ).fetchall():
        yield str(Path(path).resolve())


def _setting(connection: duckdb.DuckDBPyConnection, name: str) -> Any:
    row = connection.execute("SELECT current_setting(?)", [name]).fetchone()
    assert row is not None
    return row[0]


_parser_lock = threading.Lock()


@cache
def _parser() -> duckdb.DuckDBPyConnection:
    """A private in-memory database that only serializes syntax trees (it never reads data)."""
    return lock_down(duckdb.connect())


def _syntax_tree(sql: str) -> dict[str, Any]:
    with _parser_lock:
        row = _parser().execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
    assert row is not None
    tree = json.loads(row[0])
    if tree.get("error"):
        raise ReadOnlyQueryError(f"the query cannot be checked: {tree.get('error_message')}")
    return tree


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    """Every object in a JSON tree, depth first."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _type_name(statement: duckdb.Statement) -> str:
    try:
        return statement.type.name
    except ValueError:  # a type the Python client cannot name (UPDATE EXTENSIONS)
        return "OTHER"


def _is_refused_function(name: str) -> bool:
    name = name.lower()
    return (
        name in _REFUSED_FUNCTIONS
        or name.startswith(_REFUSED_FUNCTION_PREFIXES)
        or _REFUSED_FUNCTION_PART in name
    )


def _statement_name(sql: str, kind: str) -> str:
    """The statement's first keyword (``COPY``, ``INSTALL``), with DuckDB's type where they
    differ: DuckDB files INSTALL under LOAD and CHECKPOINT under CALL."""
    starts = (start for start, token in duckdb.tokenize(sql) if token == duckdb.token_type.keyword)
    start = next(starts, None)
    first = kind if start is None else sql[start:].split(None, 1)[0].rstrip(";(").upper()
    return first if first == kind else f"{first} ({kind})"
