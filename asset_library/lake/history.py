"""A table's commit history: which commits changed rows and which only rewrote them.

Compaction's sorted rewrite (:data:`~asset_library.lake.compaction.REWRITE_MARK`) and a
vacuum's two commits change no row: a reader level with the version before them is level with
the version after them. The merge skips them in the change feed, its key cache stays level
across them, and the serving store stays level across them.
"""

from __future__ import annotations

from deltalake import DeltaTable

from asset_library.lake.compaction import REWRITE_MARK
from asset_library.lake.table import Lake

#: Commits that change no row: a vacuum's two (it deletes files no live version reads).
VACUUM_OPERATIONS = {"VACUUM START", "VACUUM END"}


def commit_history(lake: Lake, table: DeltaTable, start: int, end: int) -> dict[int, dict] | None:
    """The commit entries of versions ``start..end`` by version (``None`` if unreadable).

    Read from a handle at the latest version: delta-rs's ``history()`` lists the newest
    commits in storage but numbers them down from the handle's loaded version, so a commit
    landing meanwhile would shift every label. If the table moved while its history was read,
    read it again; after three tries give up (callers then assume the least)."""
    if end < start:
        return {}
    name = table.table_uri.rstrip("/").rsplit("/", 1)[-1]
    for _ in range(3):
        probe = lake.open(name)
        if probe is None:
            return None
        latest = probe.version()
        entries = probe.history(max(1, latest - start + 1))
        probe.update_incremental()
        if probe.version() == latest:
            return {
                int(entry["version"]): entry
                for entry in entries
                if start <= int(entry["version"]) <= end
            }
    return None


def is_rewrite(entry: dict) -> bool:
    """Whether a commit rewrote rows as they were (compaction's mark)."""
    ((key, value),) = REWRITE_MARK.items()
    return entry.get(key) == value


def changes_no_row(entry: dict) -> bool:
    """Whether a commit left every row as it was: a rewrite or a vacuum."""
    return is_rewrite(entry) or entry.get("operation") in VACUUM_OPERATIONS


def rewrites(lake: Lake, table: DeltaTable, start: int, end: int) -> set[int]:
    """Versions in ``start..end`` that rewrote rows unchanged: none if the history cannot be
    read (slower, never wrong)."""
    entries = commit_history(lake, table, start, end) or {}
    return {version for version, entry in entries.items() if is_rewrite(entry)}


def rows_unchanged_since(lake: Lake, name: str, version: int) -> int | None:
    """The table's latest version if no commit after ``version`` changed a row (so a copy of
    its rows at ``version`` is level with it), else ``None`` (also if the history is
    unreadable: never level by guess)."""
    table = lake.open(name)
    if table is None:
        return None
    latest = table.version()
    entries = commit_history(lake, table, version + 1, latest)
    if entries is None or set(entries) != set(range(version + 1, latest + 1)):
        return None
    return latest if all(changes_no_row(entry) for entry in entries.values()) else None
