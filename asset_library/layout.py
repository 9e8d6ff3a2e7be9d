"""Where a library keeps everything, and the one way files are replaced: atomically.

A library is a URL (its home): a folder (the embedded default) or ``s3://bucket/prefix``
(:func:`resolve_home` accepts these and refuses anything else). ``library.json`` records what is
fixed when the library is created (its bucket count, and from its first ingest its object
store); every other path is derived from the root here, so no path is spelled twice.

Files are read and written in a local folder, :attr:`LibraryLayout.root`: for a folder library
the library itself, for an S3 library this machine's cache of it
(``$ASSET_LIBRARY_CACHE/libraries/<bucket>/<prefix>``). A writer of a durable file publishes it
after writing it (:meth:`LibraryLayout.publish`) and a reader fetches it before reading it
(:meth:`LibraryLayout.fetch`); both are no-ops for a folder library, so the code is one path.
What is never published (the CLI's Dagster instance, progress files, the serving store,
thumbnails) is a cache: deleting it loses no answer.
Every file a writer replaces goes through :func:`atomic_path` (or, for a file written by a
writer that holds its own temporary name, :func:`rename_durably`): written beside its target
under a private name, fsynced, renamed into place on success (the folder fsynced after), removed
on failure, so a reader never sees half a file and a crash never leaves one.
"""

from __future__ import annotations

import functools
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asset_library.ids import (
    DEFAULT_BUCKETS,
    batch_of,
    check_batch_id,
    check_buckets,
    check_shard_key,
)
from asset_library.s3 import is_s3

if TYPE_CHECKING:
    from asset_library.storage.remote import Remote

SETTINGS_FILE = "library.json"
#: A batch's plan, in its plan folder (:meth:`LibraryLayout.plan_dir`).
PLAN_FILE = "plan.json"
#: Private files being written end with this suffix; a killed writer's leftovers are found by it.
TEMP_SUFFIX = ".tmp"


#: The variables that name a library's home and this machine's cache folder.
HOME_ENV = "ASSET_LIBRARY_HOME"
CACHE_ENV = "ASSET_LIBRARY_CACHE"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class InvalidHomeError(ValueError):
    """A library home that is neither a folder nor an ``s3://bucket[/prefix]`` URL."""

    def __init__(self, home: str, reason: str) -> None:
        super().__init__(
            f"library home {home!r}: {reason}; a library is a folder or s3://bucket[/prefix]"
        )
        self.home = home


def resolve_home(home: str | os.PathLike[str] | None = None) -> str:
    """A library home in one spelling: an absolute folder path, or ``s3://bucket`` /
    ``s3://bucket/prefix`` (no trailing slash). ``None`` or empty: ``$ASSET_LIBRARY_HOME``,
    else ``./library``. Anything with another scheme (``gs://x``, ``http://x``), a malformed
    S3 URL (``s3:/x``, ``s3://``) or a prefix S3 and a folder would not treat alike raises
    :class:`InvalidHomeError` naming it: it never becomes a local folder named after it."""
    text = os.fspath(home) if home is not None else ""
    text = text or os.environ.get(HOME_ENV) or "library"
    if not _SCHEME.match(text):
        return str(Path(text).expanduser().resolve())
    if not text.startswith("s3://"):
        scheme = text.split(":", 1)[0]
        reason = "not an S3 URL (s3://...)" if scheme == "s3" else f"unsupported scheme {scheme}:"
        if "://" not in text:  # perhaps a folder with a colon in its name
            reason += f" (a folder of that name is ./{text})"
        raise InvalidHomeError(text, reason)
    bucket, _, prefix = text[len("s3://") :].partition("/")
    if not bucket:
        raise InvalidHomeError(text, "no bucket named")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidHomeError(text, f"{bucket!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    for segment in prefix.split("/") if prefix else ():
        if not segment or segment in (".", "..") or segment.startswith(".") or "\\" in segment:
            raise InvalidHomeError(text, f"prefix segment {segment!r} is not allowed")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def default_library_path() -> str:
    """``ASSET_LIBRARY_HOME``, else ``./library``: where a command finds its library by default
    (:func:`resolve_home`)."""
    return resolve_home()


def cache_home(environ: Mapping[str, str] | None = None) -> Path:
    """This machine's cache folder: ``$ASSET_LIBRARY_CACHE``, else
    ``$XDG_CACHE_HOME/asset-library``, else ``~/.cache/asset-library``."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser().resolve()
    base = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return (base / "asset-library").resolve()


def library_cache(home: str) -> Path:
    """The cache folder of the S3 library at ``home``: ``<cache>/libraries/<bucket>/<prefix>``."""
    return cache_home() / "libraries" / home[len("s3://") :]


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

    def __init__(self, root: str | Path) -> None:
        super().__init__(f"no asset library at {root}")
        self.root = root


@dataclass(frozen=True)
class LibraryLayout:
    """Paths of one library; the library's bucket count is fixed when it is created.

    ``root`` is the local folder files are read and written in; ``home`` the library's URL when
    it is on S3 (empty for a folder library, whose root is the library itself)."""

    root: Path
    home: str = ""

    @classmethod
    def at(cls, home: str | os.PathLike[str] | None = None) -> LibraryLayout:
        """The layout of the library at ``home`` (:func:`resolve_home`), creating nothing."""
        resolved = resolve_home(home)
        if is_s3(resolved):
            return cls(library_cache(resolved), resolved)
        return cls(Path(resolved))

    @classmethod
    def open(
        cls, root: str | os.PathLike[str] | None, n_buckets: int = DEFAULT_BUCKETS
    ) -> LibraryLayout:
        """The library at ``root``, created with ``n_buckets`` if it does not exist yet."""
        layout = cls.at(root)
        layout.root.mkdir(parents=True, exist_ok=True)
        if layout.fetch(layout.settings_path):
            return layout
        settings = json.dumps({"n_buckets": check_buckets(n_buckets)})
        if layout.remote is None:
            if not layout.settings_path.exists():
                atomic_write_text(layout.settings_path, settings)
            return layout
        from asset_library.storage.remote import ConflictError

        atomic_write_text(layout.settings_path, settings)
        try:
            layout.remote.publish(layout.settings_path, if_absent=True)
        except ConflictError:  # another machine created it first: its settings hold
            layout.fetch(layout.settings_path)
        return layout

    @classmethod
    def existing(cls, root: str | os.PathLike[str] | None) -> LibraryLayout:
        """The library at ``root``, which must exist: readers open it without creating anything,
        so a mistyped path is an error (:class:`NoLibraryError`), not a new empty library."""
        layout = cls.at(root)
        if not layout.fetch(layout.settings_path) or not layout.settings_path.is_file():
            raise NoLibraryError(layout.location)
        return layout

    # -- where the library is, and its durable files

    @property
    def location(self) -> str:
        """The library's home: ``s3://bucket/prefix`` or its folder."""
        return self.home or str(self.root)

    @property
    def remote(self) -> Remote | None:
        """The S3 side of an S3 library (``None`` for a folder library)."""
        if not self.home:
            return None
        return _remote(self.home, self.root)

    def home_of(self, path: Path) -> str:
        """Where a file of the library lives: its path in a folder library, its URL in an S3
        library's home (what a message names, rather than the cache's copy)."""
        if not self.home:
            return str(path)
        return f"{self.home}/{self._inside(path).relative_to(self.root).as_posix()}"

    def _inside(self, path: Path) -> Path:
        if not path.is_relative_to(self.root):
            raise ValueError(f"{path} is not a file of the library at {self.location}")
        return path

    def publish(self, path: Path) -> Path:
        """Make a file just written (atomically) in :attr:`root` durable at the home: uploaded
        for an S3 library, nothing more for a folder library."""
        if self.remote is not None:
            self.remote.publish(self._inside(path))
        return path

    def publish_new(self, path: Path) -> bool:
        """:meth:`publish` only if the home has no such file yet (a conditional put for an S3
        library): False when another writer got there first."""
        if self.remote is None:
            return True
        from asset_library.storage.remote import ConflictError

        try:
            self.remote.publish(self._inside(path), if_absent=True)
        except ConflictError:
            return False
        return True

    def fetch(self, path: Path, *, immutable: bool = False) -> bool:
        """Make the local copy of a file level with the home before it is read (an S3
        library: downloaded if it changed, or only if missing when ``immutable``; removed if
        the home has none). Whether the file exists."""
        if self.remote is not None:
            return self.remote.fetch(self._inside(path), immutable=immutable)
        return path.exists()

    def pull(self, folder: Path) -> Path:
        """Fetch every file the home holds under ``folder`` (each re-read if it changed).
        Local files the home lacks are left alone (a writer here may not have published them
        yet). ``folder`` is returned."""
        if self.remote is None:
            return folder
        for path in self.remote.listing(self._inside(folder)):
            self.remote.fetch(path)
        return folder

    def push(
        self,
        folder: Path,
        *,
        order: Callable[[Path], int] = lambda _: 0,
        gone: Iterable[Path] = (),
    ) -> None:
        """Publish the files under ``folder``: first those of order 0 the home lacks or holds
        at another size (written once, under names of their own), then every file of order 1,
        2... in turn (manifests that name the others, the one naming them all last); then
        remove at the home the files in ``gone`` (the replaced manifest named them, the new one
        does not). A file at the home that is not here stays: another machine may be
        publishing it."""
        if self.remote is None:
            return
        listed = self.remote.listing(self._inside(folder))
        from asset_library.storage.remote import walk

        for path in sorted(walk(folder), key=order):
            if order(path) or listed.get(path) != path.stat().st_size:
                self.remote.publish(path)
        removed = [self._inside(path) for path in gone]
        if removed:
            self.remote.delete(removed)

    def read_version(self, path: Path) -> str | None:
        """The version (ETag) of the home's copy of ``path`` that this machine fetched or
        published last (``None``: none known, or a folder library): what
        :meth:`publish_replacing` is conditional on. Read it before reading the file: a copy
        fetched in between then fails the condition rather than passing it."""
        return self.remote.etag(self._inside(path)) if self.remote is not None else None

    def publish_replacing(self, path: Path, text: str, *, read: str | None) -> None:
        """Write ``path`` atomically and make it the home's copy only if the home still holds
        the version ``read`` (an ETag from :meth:`read_version`; ``None``: the home had none):
        else :class:`~asset_library.storage.remote.ConflictError`, and the local file is left
        as it was. For a folder library: an atomic write."""
        with atomic_path(self._inside(path)) as tmp:
            tmp.write_text(text)
            if self.remote is not None:
                self.remote.publish(path, source=tmp, if_absent=read is None, if_match=read)

    def remove(self, path: Path) -> None:
        """Delete a file here and at the home."""
        path.unlink(missing_ok=True)
        if self.remote is not None:
            self.remote.delete([self._inside(path)])

    # -- settings

    @property
    def settings_path(self) -> Path:
        return self.root / SETTINGS_FILE

    def settings(self) -> dict[str, Any]:
        """What the library recorded about itself when it was created."""
        try:
            self.fetch(self.settings_path)
            return json.loads(self.settings_path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{self.location}/{SETTINGS_FILE}: unreadable library settings: {error}"
            ) from None

    def update_settings(self, **values: Any) -> None:
        """Record more settings (e.g. the object store), keeping what is there. On S3 the
        write is conditional on the version read, and retried if another writer came first."""
        for _ in range(10):
            current = self.settings()
            atomic_write_text(self.settings_path, json.dumps({**current, **values}, indent=2))
            if self.remote is None:
                return
            from asset_library.storage.remote import ConflictError

            try:
                self.remote.publish(
                    self.settings_path, if_match=self.remote.etag(self.settings_path) or "*"
                )
                return
            except ConflictError:
                self.settings_path.unlink(missing_ok=True)
        raise RuntimeError(f"{self.location}/{SETTINGS_FILE}: kept changing under other writers")

    @property
    def n_buckets(self) -> int:
        return int(self.settings()["n_buckets"])

    def recorded_objects(self) -> str | None:
        """The object store the library records: ``s3://...`` or an absolute folder path;
        None for a library that has not stored an image yet (or has no ``library.json``)."""
        if not self.fetch(self.settings_path):
            return None
        recorded = self.settings().get("objects")
        if recorded is None or is_s3(str(recorded)):
            return recorded
        if self.home:
            return f"{self.home}/{recorded}"
        return str((self.root / recorded).resolve())

    def record_objects(self, location: str) -> None:
        """Record the library's object store. A store inside the library is recorded relative
        to its home, so a copied or moved library still finds its bytes."""
        if self.home and location.startswith(self.home + "/"):
            location = location[len(self.home) + 1 :].strip("/")
        elif not is_s3(location):
            path = Path(location).expanduser().resolve()
            inside = path.is_relative_to(self.root) and not self.home
            location = path.relative_to(self.root).as_posix() if inside else str(path)
        self.update_settings(objects=location)

    def _at_home(self, name: str) -> str:
        """Where a store named ``name`` inside the library is: a URL or a folder path."""
        return f"{self.home}/{name}" if self.home else str(self.root / name)

    @property
    def objects_location(self) -> str:
        """The default object store: ``<home>/objects``."""
        return self._at_home("objects")

    @property
    def lake_location(self) -> str:
        """The default lake: ``<home>/lake``."""
        return self._at_home("lake")

    @property
    def landing_location(self) -> str:
        """The default landing zone: ``<home>/landing``."""
        return self._at_home("landing")

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
        """The library's own Dagster instance (runs started from a terminal): inside a folder
        library, in this machine's cache of an S3 library."""
        return self.root / ".dagster"

    @property
    def damaged_objects_dir(self) -> Path:
        """One file per md5 whose stored object a reader found damaged, until it is repaired."""
        return self.root / "damaged_objects"

    @property
    def image_keys_dir(self) -> Path:
        """The cache of the md5s the lake's ``images`` holds (rebuilt when stale)."""
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


@functools.cache
def _remote(home: str, cache: Path) -> Remote:
    """One S3 side (and one client) per library and process."""
    from asset_library.storage.remote import Remote

    return Remote(home, cache)
