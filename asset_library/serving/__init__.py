"""The serving store: the lake's answers per md5 in a SQLite file or a PostgreSQL database, for
lookups at online speed.

The lake stays the truth: the store records the Delta versions it is level with, and a reader
answers only while the store is level with ``images``; otherwise the caller reads the lake.

One module per concern, each importing only those listed before it: :mod:`.schema` (the
tables, their ``meta`` and where a SQLite file may live), :mod:`.backend` (SQLite or
PostgreSQL: what differs between them), :mod:`.reader` (records read from the store),
:mod:`.sync` (the store brought level with the lake) and :mod:`.check` (the store against the
lake). Callers import the public names from here.
"""

from asset_library.serving.backend import (
    STORE_SETTING,
    Backend,
    PostgresBackend,
    SqliteBackend,
    backend_of,
    configured_backend,
)
from asset_library.serving.check import StoreCheck, check_store
from asset_library.serving.reader import StoreReader, StoreUnavailable, attributes_by_origin
from asset_library.serving.schema import (
    MAX_ATTRIBUTE_PAGE,
    MAX_SOURCES_PAGE,
    RECORD_SOURCES,
    network_filesystem,
)
from asset_library.serving.sync import SyncResult, sync

__all__ = [
    "MAX_ATTRIBUTE_PAGE",
    "MAX_SOURCES_PAGE",
    "RECORD_SOURCES",
    "STORE_SETTING",
    "Backend",
    "PostgresBackend",
    "SqliteBackend",
    "StoreCheck",
    "StoreReader",
    "StoreUnavailable",
    "SyncResult",
    "attributes_by_origin",
    "backend_of",
    "check_store",
    "configured_backend",
    "network_filesystem",
    "sync",
]
