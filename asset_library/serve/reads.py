"""What the service reads from a library, shared by the JSON API and the gallery pages.

Every read is one query on the catalog with its values bound as parameters; pages are
``limit``/``offset`` slices of a stable order, with the total.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asset_library.lake.catalog import MACROS
from asset_library.library import Library
from asset_library.storage import ObjectStore, open_store

#: The media type of each canonical format (``images.format``).
MEDIA_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "pnm": "image/x-portable-anymap",
    "ico": "image/vnd.microsoft.icon",
    "tga": "image/x-tga",
    "avif": "image/avif",
    "heif": "image/heif",
    "jpeg2000": "image/jp2",
}

#: The most rows a page may skip, and the largest id a path may name: the catalog's integers
#: are 64-bit, so a larger number is refused as bad input (422), never sent to a query.
MAX_OFFSET = 2**62
MAX_ID = 2**63 - 1

#: What a gallery tile or a group member shows of an image.
SUMMARY_COLUMNS = "md5, width, height, format, size_bytes, quality, source_uri"


class LibraryPool:
    """A few ``Library`` handles shared by the request threads, one thread each at a time
    (a DuckDB connection serves one thread at a time)."""

    def __init__(self, path: str | Path, size: int) -> None:
        self.path = path
        self._free: queue.LifoQueue[Library] = queue.LifoQueue()
        self._free.put(Library(path))  # fails now, not on the first request, if it's no library
        self._made = 1
        self._size = size
        self._lock = threading.Lock()
        self._store: tuple[str, ObjectStore] | None = None

    @contextmanager
    def borrow(self) -> Iterator[Library]:
        with self._lock:
            make = self._free.empty() and self._made < self._size
            if make:
                self._made += 1
        library = Library(self.path) if make else self._free.get()
        try:
            yield library
        finally:
            self._free.put(library)

    def object_store(self, library: Library) -> ObjectStore:
        """The library's recorded store, opened once (an S3 client is costly to make)."""
        location = str(library.layout.recorded_objects() or library.layout.objects_location)
        with self._lock:
            if self._store is None or self._store[0] != location:
                self._store = (location, open_store(location))
            return self._store[1]


def image_format(library: Library, md5: str) -> str | None:
    """The stored format of an image, ``None`` if the library does not have it."""
    rows = library.query("SELECT format FROM image(?)", [md5])
    return rows[0]["format"] if rows else None


def image_pixels(library: Library, md5: str) -> int | None:
    """The pixels of an image's first frame, ``None`` if the library does not have it: what
    decoding it costs, known before its bytes are read."""
    rows = library.query("SELECT width * height AS pixels FROM image(?)", [md5])
    return int(rows[0]["pixels"] or 0) if rows else None


@dataclass(frozen=True)
class Page:
    """One slice of an ordered result, with the total it was cut from."""

    total: int
    limit: int
    offset: int
    items: list[dict[str, Any]]

    @property
    def has_next(self) -> bool:
        return self.offset + self.limit < self.total


class MacroArgumentsError(ValueError):
    """The query string does not give a macro exactly its arguments."""


def macro_arguments(macro: str) -> list[str]:
    """The argument names of a table macro; ``KeyError`` naming the known ones."""
    if macro not in MACROS:
        raise KeyError(f"unknown macro {macro!r}: use one of {', '.join(sorted(MACROS))}")
    return [name.strip() for name in MACROS[macro][0].split(",")]


def call_macro(
    library: Library, macro: str, given: Mapping[str, str], limit: int, offset: int
) -> Page:
    """A page of a table macro's rows, its arguments bound from ``given`` by name. Macros
    without an order of their own are ordered by their first column (md5) so pages are stable."""
    names = macro_arguments(macro)
    missing = [name for name in names if name not in given]
    unknown = sorted(set(given) - set(names))
    if missing or unknown:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"unknown {', '.join(unknown)}"] if unknown else []
        raise MacroArgumentsError(
            f"{macro} takes {', '.join(names)} (as query parameters): {'; '.join(problems)}"
        )
    values = [given[name] for name in names]
    call = f"{macro}({', '.join('?' for _ in names)})"  # the name is one of MACROS' keys
    body = MACROS[macro][1]  # its own ORDER BY is its last, outside parentheses (a window's)
    own_order = "ORDER BY" in body and ")" not in body.rpartition("ORDER BY")[2]
    order = "" if own_order else " ORDER BY 1"
    total = library.query(f"SELECT count(*) AS n FROM {call}", values)[0]["n"]
    rows = library.query(f"SELECT * FROM {call}{order} LIMIT ? OFFSET ?", [*values, limit, offset])
    return Page(total, limit, offset, rows)


def duplicate_groups(library: Library, limit: int, offset: int) -> Page:
    """Near-duplicate groups, largest first: ``group``, ``size`` and the members' md5s."""
    total = library.query("SELECT count(DISTINCT group_id) AS n FROM near_duplicates")[0]["n"]
    rows = library.query(
        "SELECT group_id AS group, any_value(group_size) AS size, list(md5 ORDER BY md5) AS md5s "
        "FROM near_duplicates GROUP BY group_id ORDER BY group_id LIMIT ? OFFSET ?",
        [limit, offset],
    )
    return Page(total, limit, offset, rows)


def group_members(library: Library, group: int) -> list[dict[str, Any]]:
    """The images of one near-duplicate group (empty if there is no such group)."""
    return library.query(
        f"SELECT {SUMMARY_COLUMNS} FROM images WHERE md5 IN "
        "(SELECT md5 FROM near_duplicates WHERE group_id = ?) ORDER BY md5",
        [group],
    )


def rejects(library: Library, reason: str | None, limit: int, offset: int) -> Page:
    """Rejected sources in the order they were ingested, of one reason or all."""
    where, values = ("WHERE reason = ?", [reason]) if reason else ("", [])
    total = library.query(f"SELECT count(*) AS n FROM rejects {where}", values)[0]["n"]
    rows = library.query(
        "SELECT source_uri, md5, size_bytes, format, reason, message, batch, shard, ingested_at "
        f"FROM rejects {where} ORDER BY ingested_at, shard, ordinal LIMIT ? OFFSET ?",
        [*values, limit, offset],
    )
    return Page(total, limit, offset, rows)


def stats(library: Library) -> dict[str, Any]:
    """Counts: images by format, rejects by reason, near-duplicate groups, and each batch."""
    images = library.query("SELECT count(*) AS n, sum(size_bytes) AS bytes FROM images")[0]
    by_format = library.query(
        "SELECT format, count(*) AS n FROM images GROUP BY format ORDER BY n DESC, format"
    )
    by_reason = library.query(
        "SELECT reason, count(*) AS n FROM rejects GROUP BY reason ORDER BY n DESC, reason"
    )
    groups = library.query(
        "SELECT count(DISTINCT group_id) AS groups, count(*) AS images FROM near_duplicates"
    )[0]
    batches = library.query(
        "SELECT batch, count(DISTINCT shard) AS shards, count(*) AS occurrences, "
        "count(DISTINCT md5) AS images, min(ingested_at) AS first_ingested_at, "
        "max(ingested_at) AS last_ingested_at FROM occurrences GROUP BY batch "
        "ORDER BY first_ingested_at, batch"
    )
    rejected = {r["batch"]: r["n"] for r in library.query(
        "SELECT batch, count(*) AS n FROM rejects GROUP BY batch"
    )}  # fmt: skip
    return {
        "images": images["n"],
        "bytes": int(images["bytes"] or 0),
        "formats": {r["format"]: r["n"] for r in by_format},
        "rejects": {r["reason"]: r["n"] for r in by_reason},
        "near_duplicate_groups": groups["groups"],
        "images_in_groups": groups["images"],
        "batches": [{**b, "rejects": rejected.get(b["batch"], 0)} for b in batches],
    }
