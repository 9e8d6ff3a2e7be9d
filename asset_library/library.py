"""The Python API of the output side: ``Library(path)`` answers lookups and queries.

It reads only the lake and the catalog (DuckDB, read-only), never the Dagster instance, so any
number of readers can run while shards are being ingested.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb

from asset_library.catalog import connect
from asset_library.lake import LibraryLayout

_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")


def default_library_path() -> Path:
    return Path(os.environ.get("ASSET_LIBRARY_HOME") or "library").expanduser().resolve()


class Library:
    """An image library on disk: lookups by md5, SQL over the catalog, similarity search."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        root = Path(path).expanduser().resolve() if path is not None else default_library_path()
        if not (root / "library.json").exists():
            raise FileNotFoundError(f"no asset library at {root} (no library.json)")
        self.layout = LibraryLayout.open(root)

    @property
    def path(self) -> Path:
        return self.layout.root

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A read-only connection to the catalog: views ``images``, ``occurrences``,
        ``rejects``, ``attributes`` and the table macros."""
        return connect(self.layout, read_only=True)

    def query(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Rows of a query as dicts; values are bound parameters (``?`` or ``$name``)."""
        with self.connect() as connection:
            result = connection.execute(sql, params or [])
            if result.description is None:
                return []
            names = [d[0] for d in result.description]
            return [dict(zip(names, row, strict=True)) for row in result.fetchall()]

    def lookup(self, md5: str) -> dict[str, Any] | None:
        """The image with this key, with its attributes and every source it was ingested from;
        ``None`` if the library does not have it."""
        if not _MD5.match(md5):
            raise ValueError(f"not an md5 key: {md5!r} (expected 32 hexadecimal digits)")
        rows = self.query("SELECT * FROM image(?)", [md5])
        if not rows:
            return None
        image = rows[0]
        image["attributes"] = {
            row["attribute"]: _typed_value(row["value"], row["value_type"])
            for row in self.query("SELECT * FROM attributes_of(?)", [md5])
        }
        image["sources"] = [
            row["source_uri"]
            for row in self.query(
                "SELECT source_uri FROM occurrences WHERE bucket = (SELECT bucket FROM image(?)) "
                "AND md5 = lower(?) ORDER BY ingested_at, shard, ordinal",
                [md5, md5],
            )
        ]
        return image


def _typed_value(value: str, value_type: str) -> Any:
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
