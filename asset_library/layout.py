"""Where a library keeps everything, and the one way files are replaced: atomically.

A library is a folder. ``library.json`` records what is fixed when the library is created (its
bucket count, and from its first ingest its object store); every other path is derived from the
root here, so no path is spelled twice.
Every file a writer replaces goes through :func:`atomic_path` (or, for a file written by a
writer that holds its own temporary name, :func:`rename_durably`): written beside its target
under a private name, fsynced, renamed into place on success (the folder fsynced after), removed
on failure, so a reader never sees half a file and a crash never leaves one.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asset_library.ids import (
    DEFAULT_BUCKETS,
    batch_of,
    check_batch_id,
    check_buckets,
    check_shard_key,
)
from asset_library.s3 import is_s3

SETTINGS_FILE = "library.json"
#: A batch's plan, in its plan folder (:meth:`LibraryLayout.plan_dir`).
PLAN_FILE = "plan.json"
#: Private files being written end with this suffix; a killed writer's leftovers are found by it.
TEMP_SUFFIX = ".tmp"


def default_library_path() -> Path:
    """``ASSET_LIBRARY_HOME``, else ``./library``: where a command finds its library by default."""
    return Path(os.environ.get("ASSET_LIBRARY_HOME") or "library").expanduser().resolve()


def temp_path_for(path: Path) -> Path:
    """A private name beside ``path``: hidden, unique, ending in :data:`TEMP_SUFFIX`."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename, made
    durable (:func:`rename_durably`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        rename_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rename_durably(
    source: Path, target: Path, rename: Callable[[Path, Path], None] = os.replace
) -> None:
    """Rename a written file (or folder) into place so that a crash leaves the old one or the
    whole new one: its bytes reach the disk before the rename (else a power cut can leave the
    new name on an empty or partial file), and the rename itself after (its folder synced).
    ``rename``: ``os.rename`` to fail rather than replace a folder that is there."""
    sync_to_disk(source)
    rename(source, target)
    sync_directory(target.parent)


def sync_to_disk(path: Path) -> None:
    """fsync a file, or every file under a folder and the folders themselves."""
    if path.is_dir():
        for inner in path.iterdir():
            sync_to_disk(inner)
        sync_directory(path)
        return
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_directory(folder: Path) -> None:
    """fsync a folder, so the names renamed or linked into it persist (POSIX; Windows cannot
    open a folder for it, and its renames are journaled by NTFS)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_orphan_temp_files(folder: Path, pattern: str = "*") -> list[Path]:
    """Delete temporary files a killed writer left in ``folder`` (matching ``pattern``)."""
    removed = []
    if folder.is_dir():
        for path in folder.glob(f".{pattern}{TEMP_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class NoLibraryError(FileNotFoundError):
    """A path given as a library that holds none (no ``library.json``)."""

    def __init__(self, root: Path) -> None:
        super().__init__(f"no asset library at {root}")
        self.root = root


@dataclass(frozen=True)
class LibraryLayout:
    """Paths of one library root; the library's bucket count is fixed when it is created."""

    root: Path

    @classmethod
    def open(cls, root: str | Path, n_buckets: int = DEFAULT_BUCKETS) -> LibraryLayout:
        """The library at ``root``, created with ``n_buckets`` if it does not exist yet."""
        layout = cls(Path(root).expanduser().resolve())
        layout.root.mkdir(parents=True, exist_ok=True)
        if not layout.settings_path.exists():
            atomic_write_text(
                layout.settings_path, json.dumps({"n_buckets": check_buckets(n_buckets)})
            )
        return layout

    @classmethod
    def existing(cls, root: str | os.PathLike[str]) -> LibraryLayout:
        """The library at ``root``, which must exist: readers open it without creating anything,
        so a mistyped path is an error (:class:`NoLibraryError`), not a new empty library."""
        layout = cls(Path(root).expanduser().resolve())
        if not layout.settings_path.is_file():
            raise NoLibraryError(layout.root)
        return layout

    @property
    def settings_path(self) -> Path:
        return self.root / SETTINGS_FILE

    def settings(self) -> dict[str, Any]:
        """What the library recorded about itself when it was created."""
        try:
            return json.loads(self.settings_path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{self.settings_path}: unreadable library settings: {error}"
            ) from None

    def update_settings(self, **values: Any) -> None:
        """Record more settings (e.g. the object store), keeping what is there."""
        atomic_write_text(self.settings_path, json.dumps({**self.settings(), **values}, indent=2))

    @property
    def n_buckets(self) -> int:
        return int(self.settings()["n_buckets"])

    def recorded_objects(self) -> str | None:
        """The object store the library records: ``s3://...`` or an absolute folder path;
        None for a library that has not stored an image yet (or has no ``library.json``)."""
        if not self.settings_path.exists():
            return None
        recorded = self.settings().get("objects")
        if recorded is None or is_s3(str(recorded)):
            return recorded
        return str((self.root / recorded).resolve())

    def record_objects(self, location: str) -> None:
        """Record the library's object store. A folder inside the library is recorded relative
        to its root, so a copied or moved library still finds its bytes."""
        if not is_s3(location):
            path = Path(location).expanduser().resolve()
            inside = path.is_relative_to(self.root)
            location = path.relative_to(self.root).as_posix() if inside else str(path)
        self.update_settings(objects=location)

    @property
    def objects_dir(self) -> Path:
        return self.root / "objects"

    @property
    def landing_dir(self) -> Path:
        return self.root / "landing"

    @property
    def lake_dir(self) -> Path:
        return self.root / "lake"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def segments_manifest_path(self) -> Path:
        """The similarity index's manifest: its segments and the versions it reached."""
        return self.index_dir / "segments.json"

    @property
    def near_duplicates_path(self) -> Path:
        """The near-duplicate groups the library found."""
        return self.index_dir / "near_duplicates.parquet"

    @property
    def dagster_home(self) -> Path:
        """The library's own Dagster instance (runs started from a terminal)."""
        return self.root / ".dagster"

    @property
    def damaged_objects_dir(self) -> Path:
        """One file per md5 whose stored object a reader found damaged, until it is repaired."""
        return self.root / "damaged_objects"

    @property
    def image_keys_dir(self) -> Path:
        """The local cache of the md5s the lake's ``images`` holds (rebuilt when stale)."""
        return self.root / "image_keys"

    @property
    def serving_store_path(self) -> Path:
        """The serving store (SQLite) of a folder library: rebuilt from the lake on demand."""
        return self.root / "serving" / "store.sqlite"

    @property
    def triggers_dir(self) -> Path:
        return self.root / "triggers"

    @property
    def skipped_landings_dir(self) -> Path:
        """Why a landed batch was not ingested: one record per landed name."""
        return self.root / "triggers" / "skipped"

    def plan_dir(self, batch: str) -> Path:
        return self.root / "plans" / check_batch_id(batch)

    def plan_path(self, batch: str) -> Path:
        """The batch's plan file: its shards and where each came from."""
        return self.plan_dir(batch) / PLAN_FILE

    def keys_path(self, shard: str) -> Path:
        """The shard's fingerprint rows: the output of its one pass over the bytes."""
        return self.root / "shards" / f"{check_shard_key(shard)}.parquet"

    def progress_path(self, shard: str) -> Path:
        """The running shard's progress (``ingest.progress``), rewritten as it goes."""
        return self.root / "progress" / f"{check_shard_key(shard)}.json"

    def remove_orphan_shard_files(self, shard: str) -> list[Path]:
        """Delete the temporary files a killed run of ``shard`` left where shard runs write:
        beside its keys file and its plan file (the lake's tables commit through their log)."""
        pattern = f"{check_shard_key(shard)}.parquet.*"
        folders = (self.keys_path(shard).parent, self.plan_dir(batch_of(shard)))
        return [path for folder in folders for path in remove_orphan_temp_files(folder, pattern)]

    def table_dir(self, table: str) -> Path:
        """A Delta table's folder when the lake is local (``<root>/lake/<table>``)."""
        return self.lake_dir / table
