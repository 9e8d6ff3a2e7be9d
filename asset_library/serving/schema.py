"""The store's tables, the ``meta`` it records, and where a SQLite store may live.

Per md5 it holds the image's row (the ``images`` view's columns), how many sources it has, its
first :data:`RECORD_SOURCES` sources (by ingested_at, shard, ordinal) and its attributes by
origin, each with how many occurrences carry it; the attributes are indexed by value as well
(:data:`BY_VALUE_INDEX_SQL`), for the pages of images having one. These are kept as runs of
changes (:mod:`.runs`). ``meta`` records the layout, the lake, the Delta versions the store is
level with and its runs; a file of another layout is rebuilt.

SQLite on a network filesystem corrupts under concurrent use: such a library has no store
(:func:`network_filesystem`) and answers from the lake.
"""

from __future__ import annotations

from pathlib import Path

from asset_library.lake.catalog import IMAGE_VIEW_COLUMNS

#: How many sources a record carries (the first, by ingested_at, shard, ordinal); the rest
#: page through ``Library.sources``. The store keeps these (a run: the first of those it adds).
RECORD_SOURCES = 10
#: The largest page of sources one call returns.
MAX_SOURCES_PAGE = 1000
#: The largest page of images (or md5s) having an attribute value one call returns.
MAX_ATTRIBUTE_PAGE = 1000
#: The file's layout; a file of another layout is rebuilt (3: runs, ``serving/runs.py``).
STORE_FORMAT = "3"
#: The record's columns kept as JSON: the ``images`` view's but the count (kept apart).
RECORD_COLUMNS = [c for c in IMAGE_VIEW_COLUMNS if c != "occurrences"]
#: Filesystem types on which SQLite's locks are not to be trusted.
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "afs", "ceph"}

#: What the store records (the layout, the lake, the versions it is level with, its runs),
#: created if absent each time a writer opens the file.
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
)
#: One run's tables (``{run}``: its id): an image's record (``NULL``: removed), its count's
#: change, its first sources (a ``NULL`` URI: removed) and its attribute counts' changes.
RUN_SCHEMA = """
CREATE TABLE images_{run} (md5 TEXT PRIMARY KEY, record TEXT) WITHOUT ROWID;
CREATE TABLE counts_{run} (md5 TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE sources_{run} (
  md5 TEXT, ingested_at TEXT, shard TEXT, ordinal INTEGER, source_uri TEXT,
  PRIMARY KEY (md5, ingested_at, shard, ordinal)) WITHOUT ROWID;
CREATE TABLE attributes_{run} (
  md5 TEXT, origin TEXT, attribute TEXT, value TEXT, value_type TEXT, n INTEGER NOT NULL,
  PRIMARY KEY (md5, origin, attribute, value, value_type)) WITHOUT ROWID;
"""
#: A run's attribute rows by value, in md5 order: a page starts where the last ended (one seek)
#: however deep it is. Its entries carry the rest of the row (the count, origin, value_type),
#: so a page reads no row of the table (a read of the row per entry made a rare value's md5s
#: 20x slower at 9.1M images). Made after the run's rows (one sort). The value type is not
#: among its leading columns: a value is asked for by its text, whatever its type, and the md5
#: order must hold across them.
BY_VALUE_INDEX_SQL = (
    "CREATE INDEX {index} ON {table} (attribute, value, md5, n, origin, value_type)"
)


def network_filesystem(path: Path) -> str | None:
    """The filesystem type under ``path`` if it is a network one (SQLite must not live
    there), else ``None``. Read from ``/proc/mounts`` (Linux); elsewhere assumed local."""
    mounts = Path("/proc/mounts")
    if not mounts.exists():
        return None
    target = str(path.resolve())
    best, kind = "", ""
    for line in mounts.read_text().splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(
            best
        ):
            best, kind = point, parts[2]
    return kind if kind in NETWORK_FILESYSTEMS else None


def remove_store(path: Path) -> None:
    """The store's file and its WAL files gone: a damaged store is rebuilt from nothing."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
