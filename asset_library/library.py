"""The Python API of the output side: ``Library(path)`` answers lookups and queries.

It reads only the lake (through its Delta logs), the similarity index and the library's
settings, never the Dagster instance, so any number of readers can run while shards are being
ingested. A reader sees each table as of its latest commit: ``images`` is merged after the shard
tables, so for a moment ``occurrences`` may hold rows that ``images`` does not count yet.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from asset_library.ids import InvalidIdError, bucket_of, check_md5, is_md5
from asset_library.ingest.dihedral import query_fingerprint
from asset_library.ingest.fingerprint import fingerprint, hamming
from asset_library.lake import IMAGES_SCHEMA, ORIGINS, Catalog, Lake
from asset_library.lake.catalog import IMAGE_VIEW_COLUMNS
from asset_library.lake.sql_guard import check_read_only_query
from asset_library.layout import LibraryLayout
from asset_library.near_duplicates import NearDuplicates
from asset_library.search.codec import hex_to_int
from asset_library.search.quality import CONFIRMING_HASH, informative
from asset_library.search.thresholds import (
    DEFAULT_CONFIRM_DISTANCE,
    DEFAULT_MIN_QUALITY,
    DEFAULT_PHASH_THRESHOLD,
)
from asset_library.serving import (
    MAX_ATTRIBUTE_PAGE,
    MAX_SOURCES_PAGE,
    RECORD_SOURCES,
    Backend,
    StoreReader,
    StoreUnavailable,
    attributes_by_origin,
    configured_backend,
)
from asset_library.similarity import HASH_KINDS, SimilarityIndex, loaded_index
from asset_library.storage import ObjectStore, open_store, read_image

if TYPE_CHECKING:  # pandas is imported by ``frame`` alone: the CLI starts without it
    import pandas as pd

log = logging.getLogger(__name__)
IMAGES_TABLE_COLUMNS = IMAGES_SCHEMA.names
#: How a query may be turned before it is searched: as it is, or all 8 rotations and flips.
TRANSFORMS = ("none", "dihedral")


class ImageNotFoundError(ValueError):
    """An md5 the library does not have."""

    def __init__(self, md5: str) -> None:
        super().__init__(f"no image with md5 {md5} in the library")
        self.md5 = md5


class Library:
    """An image library on disk: lookups by md5, SQL over the catalog, similarity search."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.layout = LibraryLayout.existing(path)
        self.lake = Lake.of(self.layout)
        self._index: SimilarityIndex | None = None
        self._catalog: Catalog | None = None
        self._index_stamp: int | None = None
        self._reader: StoreReader | None = None
        self._fallback: str | None = None
        #: Where the serving store lives: ``ASSET_LIBRARY_SERVING_STORE`` (PostgreSQL) or the
        #: SQLite file in the library.
        self.serving_backend: Backend | None = configured_backend(self.layout.serving_store_path)

    @property
    def path(self) -> str:
        """The library's home: its folder, or ``s3://bucket/prefix``."""
        return self.layout.location

    def object_store(self) -> ObjectStore:
        """Where this library's image bytes are: the store it records (``<root>/objects``
        before its first ingest); S3 through ``s3_client_from_env()``."""
        return open_store(self.layout.recorded_objects() or self.layout.objects_location)

    def connect(self) -> Catalog:
        """The catalog, level with the lake's latest commits: views ``images``,
        ``occurrences``, ``rejects``, ``attributes`` and the table macros; one read-only
        query per ``execute``, on a connection that opens no file itself. Kept open by this
        ``Library`` between calls."""
        return self._level()

    def _level(self, *tables: str) -> Catalog:
        """The catalog with these tables (all if none named) level with their latest commits."""
        if self._catalog is None:
            self._catalog = Catalog(self.lake, NearDuplicates(self.layout, self.lake, self.index))
        elif tables:
            self._catalog.refresh(tables)
        else:
            self._catalog.refresh()
        return self._catalog

    def query(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Rows of one read-only query as dicts; values are bound parameters (``?`` or
        ``$name``). SQL that does not parse raises ``InvalidQueryError``, anything but one query
        ``ReadOnlyQueryError`` (both ValueErrors)."""
        check_read_only_query(sql)
        with self.connect() as connection:
            result = connection.execute(sql, params or [])
            if result.description is None:
                return []
            names = [d[0] for d in result.description]
            return [dict(zip(names, row, strict=True)) for row in result.fetchall()]

    def frame(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> pd.DataFrame:
        """``query`` as a pandas DataFrame (DuckDB's own conversion, column types kept)."""
        import pandas as pd

        check_read_only_query(sql)
        with self.connect() as connection:
            result = connection.execute(sql, params or [])
            return pd.DataFrame() if result.description is None else result.df()

    def lookup(self, md5: str, *, fallback: bool = True) -> dict[str, Any] | None:
        """The image with this key, with its attributes, its first sources and their count;
        ``None`` if the library does not have it.

        ``attributes`` holds the values by where they came from: ``derived`` (worked out from
        the image's bytes: EXIF, size) and ``manifest`` (given by a manifest's columns), each
        attribute name to its value, or to the list of its values when it has several. A
        manifest column named like a derived attribute stays under ``manifest``.
        ``sources`` holds the first :data:`RECORD_SOURCES` (by ingest time), ``sources_count``
        all of them (:meth:`sources` pages through them). ``answered_by`` says what answered:
        ``store`` (the serving store, level with the lake) or ``lake`` (the store is absent,
        damaged or behind: logged). With ``fallback=False`` the lake is not read:
        :class:`StoreUnavailable` says why the store cannot answer (a caller that must not wait
        on the lake, such as the service's event loop, reads it elsewhere)."""
        md5 = check_md5(md5)
        try:
            record = self.store_record(md5)
        except StoreUnavailable as why:
            if not fallback:
                raise
            self._fell_back(str(why))
            record = self.lake_record(md5)
            answered_by = "lake"
        else:
            answered_by = "store"
        return None if record is None else {**record, "answered_by": answered_by}

    def store_record(self, md5: str) -> dict[str, Any] | None:
        """The image's record from the serving store; :class:`StoreUnavailable` if it cannot
        answer (absent, damaged, behind the lake)."""
        if self._reader is None:
            self._reader = StoreReader(self.serving_backend, self.lake)
        return self._reader.record(md5)

    def _fell_back(self, why: str) -> None:
        """Log the first fallback to the lake, and each new reason, not every lookup."""
        if why != self._fallback:
            log.warning("lookups read the lake: %s", why)
            self._fallback = why

    def lake_record(self, md5: str) -> dict[str, Any] | None:
        """The image's record read from the lake (its bucket of images, occurrences and
        attributes): what the serving store must answer."""
        md5 = check_md5(md5)
        # Straight from the key's bucket: pyarrow opens only that bucket's files.
        bucket = int(bucket_of(md5, self.lake.n_buckets))
        catalog = self._level("images", "occurrences", "attributes")
        found = catalog.rows_of("images", bucket, md5).to_pylist()
        if not found:
            return None
        image = _view_row(found[0])
        cube = catalog.rows_of("attributes", bucket, md5).to_pylist()
        sources = self._lake_sources(catalog, bucket, md5)
        # Counted from the occurrences read here (what the images view shows once merged).
        image["occurrences"] = len(sources)
        image["attributes"] = attributes_by_origin(
            (r["attribute"], r["value"], r["value_type"], r["origin"]) for r in cube
        )
        image["sources"] = sources[:RECORD_SOURCES]
        image["sources_count"] = len(sources)
        return image

    def images_with_attribute(
        self,
        attribute: str,
        value: str,
        *,
        origin: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> dict[str, Any]:
        """A page of the images having this attribute value, in md5 order: ``rows`` (at most
        ``limit``, up to :data:`MAX_ATTRIBUTE_PAGE`), each the image's row as the ``images``
        view gives it (its first source and its count of all sources); ``cursor``, the
        ``after`` of the next page (the last md5 of this one; ``None`` after the last page);
        and ``answered_by``. ``value`` is the value's text as the cube holds it (``'true'``,
        ``'42'``); ``origin`` (``derived`` or ``manifest``) keeps the images having it from
        there, ``None`` from either. A page costs the same however deep it is: it starts after
        its cursor. Answered from the serving store while it is level with the lake's
        ``images`` and ``attributes``, else from the lake (logged), with the same rows."""
        return self._with_attribute(attribute, value, origin, limit, after, images=True)

    def md5s_with_attribute(
        self,
        attribute: str,
        value: str,
        *,
        origin: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> dict[str, Any]:
        """:meth:`images_with_attribute` with ``md5`` and ``bucket`` alone in each row (and
        the images of a shard not yet merged into ``images`` among them, as the
        ``md5s_with_attribute`` macro has them)."""
        return self._with_attribute(attribute, value, origin, limit, after, images=False)

    def _with_attribute(
        self,
        attribute: str,
        value: str,
        origin: str | None,
        limit: int,
        after: str | None,
        images: bool,
    ) -> dict[str, Any]:
        start = _attribute_page_checked(attribute, value, origin, limit, after)
        try:
            rows = self.store_attribute_page(
                attribute, value, origin=origin, after=start, limit=limit + 1, images=images
            )
            answered_by = "store"
        except StoreUnavailable as why:
            self._fell_back(str(why))
            rows = self.lake_attribute_page(
                attribute, value, origin=origin, after=start, limit=limit + 1, images=images
            )
            answered_by = "lake"
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "attribute": attribute,
            "value": value,
            "origin": origin,
            "limit": limit,
            "after": after,
            "cursor": rows[-1]["md5"] if more else None,
            "rows": rows,
            "answered_by": answered_by,
        }

    def store_attribute_page(
        self,
        attribute: str,
        value: str,
        *,
        origin: str | None,
        after: str,
        limit: int,
        images: bool,
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` rows of :meth:`images_with_attribute` (``images``) or
        :meth:`md5s_with_attribute` after the md5 ``after`` (``""``: from the first), from the
        serving store; :class:`StoreUnavailable` if it cannot answer."""
        if self._reader is None:
            self._reader = StoreReader(self.serving_backend, self.lake)
        return self._reader.with_attribute(attribute, value, origin, after, limit, images)

    def lake_attribute_page(
        self,
        attribute: str,
        value: str,
        *,
        origin: str | None,
        after: str,
        limit: int,
        images: bool,
    ) -> list[dict[str, Any]]:
        """:meth:`store_attribute_page` read from the lake: the md5s from the attribute index
        (the cube, by origin), the rows from their buckets of ``images`` and ``occurrences``.
        What the serving store must answer."""
        tables = ("images", "occurrences") if images else ()
        catalog = self._level("attributes", "attribute_index", *tables)
        if origin is None:
            having = "SELECT md5, bucket FROM md5s_with_attribute(?, ?)"
            values: list[Any] = [attribute, value]
        else:
            having = (
                "SELECT DISTINCT md5, bucket FROM attribute_occurrences "
                "WHERE attribute = ? AND value = ? AND origin = ?"
            )
            values = [attribute, value, origin]
        merged = " AND md5 IN (SELECT md5 FROM images)" if images else ""
        found = catalog.execute(
            f"SELECT md5, bucket FROM ({having}) WHERE md5 > ?{merged} ORDER BY md5 LIMIT ?",
            [*values, after, limit],
        ).fetchall()
        if not images:
            return [{"md5": md5, "bucket": bucket} for md5, bucket in found]
        md5s, buckets = [m for m, _ in found], [b for _, b in found]
        rows = {r["md5"]: r for r in catalog.rows_in("images", buckets, md5s).to_pylist()}
        counts = Counter(catalog.rows_in("occurrences", buckets, md5s).column("md5").to_pylist())
        # Counted from the occurrences, as lake_record counts them (and the store does).
        return [{**_view_row(rows[md5]), "occurrences": counts[md5]} for md5 in md5s]

    def _lake_sources(self, catalog: Catalog, bucket: int, md5: str) -> list[str]:
        occurrences = sorted(
            catalog.rows_of("occurrences", bucket, md5).to_pylist(),
            key=lambda r: (r["ingested_at"], r["shard"], r["ordinal"]),
        )
        return [r["source_uri"] for r in occurrences]

    def sources(self, md5: str, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """A page of the image's sources in ingest order: ``sources`` (at most ``limit``, up
        to :data:`MAX_SOURCES_PAGE`, from ``offset``), ``sources_count``, ``limit``,
        ``offset`` and ``answered_by``. :class:`ImageNotFoundError` if it has none."""
        md5 = check_md5(md5)
        if not 1 <= limit <= MAX_SOURCES_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_SOURCES_PAGE}, not {limit}")
        if offset < 0:
            raise ValueError(f"offset must be 0 or more, not {offset}")
        try:
            if self._reader is None:
                self._reader = StoreReader(self.serving_backend, self.lake)
            found = self._reader.sources(md5, limit, offset)
            answered_by = "store"
        except StoreUnavailable:  # past the kept sources: the lake has them all
            catalog = self._level("images", "occurrences")
            bucket = int(bucket_of(md5, self.lake.n_buckets))
            if catalog.rows_of("images", bucket, md5).num_rows == 0:
                found = None
            else:
                every = self._lake_sources(catalog, bucket, md5)
                found = every[offset : offset + limit], len(every)
            answered_by = "lake"
        if found is None:
            raise ImageNotFoundError(md5)
        page, count = found
        return {
            "md5": md5,
            "sources_count": count,
            "limit": limit,
            "offset": offset,
            "sources": page,
            "answered_by": answered_by,
        }

    def similar(
        self,
        image: bytes | str | os.PathLike[str],
        *,
        max_distance: int | None = None,
        limit: int | None = 20,
        hash: str = "phash",
        transforms: str = "none",
        min_quality: int | None = DEFAULT_MIN_QUALITY,
        confirm: int | None = DEFAULT_CONFIRM_DISTANCE,
    ) -> list[dict[str, Any]]:
        """Images within ``max_distance`` bits of an image, nearest first.

        ``image`` is the image's bytes, a path to an image file (fingerprinted as at ingest),
        or the md5 of an image in the library. ``max_distance`` defaults to
        :data:`~asset_library.ingest.fingerprint.DEFAULT_PHASH_THRESHOLD` (8 bits).
        ``transforms="dihedral"`` also finds copies stored rotated by 90/180/270 degrees or
        mirrored (pHash only): each record then says which ``transform`` of the query matched.
        Results whose information score (``quality``) is below ``min_quality`` are left out,
        and a query below it finds nothing (flat images' hashes are rounding noise); pass
        ``min_quality=None`` to keep them. A match is kept only when a second hash confirms
        it, within ``confirm`` bits (dHash for a pHash or aHash search, pHash for a dHash one;
        :mod:`asset_library.search.quality`); pass ``confirm=None`` to keep every match. Each
        record has ``md5``, ``distance``, ``width``, ``height``, ``format``, ``quality`` and
        one ``source_uri``.
        """
        if hash not in HASH_KINDS:
            raise ValueError(f"unknown hash {hash!r}: use one of {', '.join(HASH_KINDS)}")
        if transforms not in TRANSFORMS:
            raise ValueError(f"unknown transforms {transforms!r}: use one of {TRANSFORMS}")
        if transforms == "dihedral" and hash != "phash":
            raise ValueError("transforms='dihedral' works with the phash only")
        distance = DEFAULT_PHASH_THRESHOLD if max_distance is None else int(max_distance)
        if not 0 <= distance <= 64:
            raise ValueError(f"max_distance must be between 0 and 64, not {distance}")
        if confirm is not None and not 0 <= confirm <= 64:
            raise ValueError(f"confirm must be between 0 and 64 bits, not {confirm}")
        second = CONFIRMING_HASH[hash]
        catalog = self._level("images")  # one look at the lake for the whole call
        hashes, query_quality = self._query_hashes(image, hash, transforms, catalog)
        index = self.index()
        # IndexNotReady: missing, or behind the lake
        index.check_level(self.lake, catalog.table("images"))
        matches: dict[str, list[tuple[int, str]]] = {}  # md5 -> (distance, transform)
        for transform, (value, _) in hashes.items():
            for md5, d in index.query(value, distance, kind=hash):
                matches.setdefault(md5, []).append((d, transform))
        if not matches:
            return []
        details = self._details(catalog, list(matches), second)
        found: dict[str, tuple[int, str]] = {}  # md5 -> the nearest match a second hash confirms
        for md5, candidates in matches.items():
            stored = details.get(md5, {}).get(second)
            for d, transform in sorted(candidates):
                if (
                    confirm is None
                    or stored is None
                    or hamming(hashes[transform][1], stored) <= confirm
                ):
                    found[md5] = (d, transform)
                    break
        ordered = sorted(found.items(), key=lambda item: (item[1][0], item[0]))
        if min_quality is not None:
            qualities = [details.get(md5, {}).get("quality") for md5, _ in ordered]
            keep = informative(
                query_quality,
                np.array([np.nan if q is None else q for q in qualities], dtype=np.float64),
                min_quality,
            )
            ordered = [item for item, kept in zip(ordered, keep, strict=True) if kept]
        records = []
        for md5, (d, transform) in ordered[:limit] if limit is not None else ordered:
            shown = {k: v for k, v in details.get(md5, {}).items() if k not in ("md5", second)}
            record = {"md5": md5, "distance": d, **shown}
            if transforms == "dihedral":
                record["transform"] = transform
            records.append(record)
        return records

    def _details(self, catalog: Catalog, md5s: list[str], second: str) -> dict[str, dict[str, Any]]:
        """What a search result shows of each image, and its ``second`` hash that confirms a
        match, read from ``images`` by bucket (pyarrow, the hits' buckets and row groups only)."""
        buckets = [bucket_of(m, self.lake.n_buckets) for m in md5s]
        rows = catalog.rows_in("images", buckets, md5s)
        shown = ["md5", "width", "height", "format", "quality", "source_uri", second]
        return {row["md5"]: row for row in rows.select(shown).to_pylist()}

    def near_duplicate_groups(self) -> list[list[str]]:
        """The near-duplicate groups the library last computed, largest first."""
        groups: dict[int, list[str]] = {}
        for row in self.query("SELECT group_id, md5 FROM near_duplicates ORDER BY group_id, md5"):
            groups.setdefault(row["group_id"], []).append(row["md5"])
        return list(groups.values())

    def index(self) -> SimilarityIndex:
        """The similarity index as the ``similarity_index`` asset last saved it (memory-mapped),
        reloaded when that asset saved a newer one. Readers never write it."""
        manifest = self.layout.segments_manifest_path
        self.layout.fetch(manifest)  # an S3 library's: re-read if it changed
        stamp = manifest.stat().st_mtime_ns if manifest.exists() else None
        if self._index is None or stamp != self._index_stamp:
            self._index = loaded_index(self.layout, self.lake)
            self._index_stamp = stamp
        return self._index

    def _query_hashes(
        self,
        image: bytes | str | os.PathLike[str],
        kind: str,
        transforms: str,
        catalog: Catalog,
    ) -> tuple[dict[str, tuple[int, int]], int | None]:
        """By transform, the hash to search with and the second hash that confirms a match
        (for ``dihedral``, the eight pHash and dHash variants), and the query's information
        score. A query by md5 uses its stored hashes, or its stored bytes when the variants
        need the image's own pixels."""
        second = CONFIRMING_HASH[kind]
        if isinstance(image, str) and is_md5(image) and not Path(image).exists():
            md5 = check_md5(image)
            rows = catalog.rows_of("images", bucket_of(md5, self.lake.n_buckets), md5)
            if rows.num_rows == 0:
                raise ImageNotFoundError(md5)
            quality = rows["quality"][0].as_py()
            if transforms == "none":
                stored = (hex_to_int(rows[kind][0].as_py()), hex_to_int(rows[second][0].as_py()))
                return {"identity": stored}, quality
            data, name = read_image(self.object_store(), md5), f"image {md5}"
        elif isinstance(image, bytes | bytearray):
            data, name = bytes(image), "the given bytes"
        else:
            data, name = Path(image).read_bytes(), str(image)
        if transforms == "none":
            fp = fingerprint(data)
            phashes: dict[str, str] = {}
            dhashes: dict[str, str] = {}
        else:
            fp, phashes, dhashes = query_fingerprint(data)
        if not fp.ok:
            raise ValueError(f"{name} cannot be searched with: {fp.reason}: {fp.message}")
        if transforms == "none":
            return {
                "identity": (hex_to_int(getattr(fp, kind)), hex_to_int(getattr(fp, second)))
            }, fp.quality
        variants = {t: (hex_to_int(phashes[t]), hex_to_int(dhashes[t])) for t in phashes}
        return variants, fp.quality


def _view_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """An ``images`` table row as the ``images`` view shows it (the hashes as integers too),
    its ``occurrences`` as first merged: the caller counts them."""
    image = {name: row[name] for name in IMAGES_TABLE_COLUMNS if name in row}
    for kind in HASH_KINDS:
        image[f"{kind}_int"] = int(row[kind], 16) if row[kind] else None
    return {name: image[name] for name in IMAGE_VIEW_COLUMNS}


def _attribute_page_checked(
    attribute: object, value: object, origin: object, limit: object, after: object
) -> str:
    """The md5 a page of images having an attribute value starts after (``""``: the first);
    ``ValueError`` naming the input that is not as it must be."""
    if not isinstance(attribute, str) or not attribute:
        raise ValueError(f"attribute must be a non-empty text, not {attribute!r}")
    if not isinstance(value, str):
        raise ValueError(f"value must be the value's text (as the cube holds it), not {value!r}")
    if origin is not None and origin not in ORIGINS:
        raise ValueError(f"origin must be one of {', '.join(ORIGINS)} (or none), not {origin!r}")
    if (
        not isinstance(limit, int)
        or isinstance(limit, bool)
        or not 1 <= limit <= MAX_ATTRIBUTE_PAGE
    ):
        raise ValueError(f"limit must be between 1 and {MAX_ATTRIBUTE_PAGE}, not {limit!r}")
    if after is None:
        return ""
    if not is_md5(after):
        raise InvalidIdError(
            f"after must be the cursor of the page before (an md5: 32 hexadecimal digits), "
            f"not {after!r}"
        )
    return str(after).lower()
