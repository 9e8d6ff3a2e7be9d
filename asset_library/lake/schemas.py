"""What the lake's tables hold: every table's schema, its partition column and sort order.

Tables (partitioned by ``bucket``, the top bits of the md5, see :func:`ids.bucket_of`; but one):

``occurrences``  one row per accepted source of an image (an md5 may occur in many shards)
``rejects``      one row per source that was not ingested, with its reason
``attributes``   the cube: (md5, attribute, value, value_type, origin) per occurrence
``images``       one row per md5: the image, its first occurrence and its occurrence count
                 when it was first merged (appended once, rewritten only when it loses one)
``image_counts`` the occurrence count changes since: ``images.occurrences`` + their sum is
                 the count
``attribute_index`` the cube by attribute (partitioned by ``part``, a hash of the attribute)

The ingest's keys files and these tables share their columns (an image's own facts, and where
each occurrence came from) under the same names and types, declared once here, so a reader can
move rows between them by name. The table format lives in this package and nowhere else.
"""

from __future__ import annotations

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")

#: An image's own facts: its key, size, format, dimensions as displayed, hashes and information
#: score. The same for every occurrence of the same bytes.
IMAGE_FACT_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("md5", pa.string()),
    ("size_bytes", pa.int64()),
    ("format", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("orientation", pa.int16()),
    ("frames", pa.int32()),
    ("phash", pa.string()),
    ("ahash", pa.string()),
    ("dhash", pa.string()),
    ("quality", pa.int16()),
]
#: Where an occurrence came from: its source, batch, shard, place in the batch and ingest time.
#: Every table of occurrences, and of rows made from one, carries these (or some of them).
PROVENANCE_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("source_uri", pa.string()),
    ("batch", pa.string()),
    ("shard", pa.string()),
    ("ordinal", pa.int64()),
    ("ingested_at", TIMESTAMP),
]


def provenance(*names: str) -> list[tuple[str, pa.DataType]]:
    """These provenance columns, in the order named (a table that lists them apart, or only
    some of them); every one when none is named."""
    declared = dict(PROVENANCE_COLUMNS)
    return [(name, declared[name]) for name in names] if names else list(PROVENANCE_COLUMNS)


#: Attributes the library derives for every image, documented for users of the cube.
#: A cube row's ``origin``: worked out from the image's bytes, or given by its manifest. Both
#: may name the same attribute (a manifest column ``exif.make``): they are told apart by it.
DERIVED, MANIFEST = "derived", "manifest"
ORIGINS = (DERIVED, MANIFEST)

#: The custom metadata key naming the shard a shard table's commit wrote.
SHARD_MARK = "asset_library.shard"

DERIVED_ATTRIBUTES = {
    "exif.make": "camera maker from EXIF Make",
    "exif.model": "camera model from EXIF Model",
    "exif.captured_at": "capture time from EXIF DateTimeOriginal, as YYYY-MM-DD HH:MM:SS",
    "image.aspect_ratio": "width / height as displayed, 4 decimals",
    "image.megapixels": "width x height / 1e6, 3 decimals",
    "image.animated": "true when the image has more than one frame",
}


OCCURRENCES_SCHEMA = pa.schema([*IMAGE_FACT_COLUMNS, *provenance(), ("bucket", pa.int32())])
REJECTS_SCHEMA = pa.schema(
    [
        *provenance("source_uri"),
        ("md5", pa.string()),
        ("size_bytes", pa.int64()),
        ("format", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        *provenance("batch", "shard", "ordinal", "ingested_at"),
        ("bucket", pa.int32()),
    ]
)
ATTRIBUTES_SCHEMA = pa.schema(
    [
        ("md5", pa.string()),
        ("attribute", pa.string()),
        ("value", pa.string()),
        ("value_type", pa.string()),
        ("origin", pa.string()),
        *provenance("source_uri", "batch", "shard"),
        ("bucket", pa.int32()),
    ]
)
#: One row per md5, written once when the md5 is first merged. ``source_uri``/``batch``/
#: ``shard``/``ordinal``/``ingested_at`` are those of its first occurrence then (by ingested_at,
#: shard, ordinal); ``occurrences`` counts them then, ``image_counts`` holds what changed since.
IMAGES_SCHEMA = pa.schema(
    [
        *IMAGE_FACT_COLUMNS,
        *provenance(),
        ("occurrences", pa.int64()),
        ("bucket", pa.int32()),
    ]
)
#: What ``image_counts`` adds to an md5's ``images.occurrences``: one row per merge that changed
#: the count of an md5 already in ``images`` (the sum of its rows is the change since then).
IMAGE_COUNTS_SCHEMA = pa.schema(
    [("md5", pa.string()), ("occurrences", pa.int64()), ("bucket", pa.int32())]
)
#: The cube again, by attribute: (attribute, value) -> the image and the occurrence that carried
#: it, partitioned by ``part``, a hash of the attribute, and sorted by (attribute, value), so a
#: query for one attribute value opens one partition's files and, by their statistics, few of
#: their row groups. It covers the image's columns but its hashes (random: two fifths of its
#: bytes), so that query reads nothing else: an image's rows among the billion would otherwise
#: need the md5 of every image for a join.
ATTRIBUTE_INDEX_SCHEMA = pa.schema(
    [
        ("attribute", pa.string()),
        ("value", pa.string()),
        *(column for column in IMAGE_FACT_COLUMNS if not column[0].endswith("hash")),
        *provenance(),
        ("bucket", pa.int32()),
        ("part", pa.int32()),
    ]
)
#: Partitions of ``attribute_index``: few, so a partition's files stay few and large.
ATTRIBUTE_PARTS = 16


def attribute_part_sql(attribute: str) -> str:
    """The DuckDB expression of an attribute's ``attribute_index`` partition (a constant when
    ``attribute`` is one, so DuckDB hands ``part = N`` to the scan)."""
    return f"(('0x' || md5({attribute})[1:4])::INTEGER % {ATTRIBUTE_PARTS})::INTEGER"


SCHEMAS: dict[str, pa.Schema] = {
    "occurrences": OCCURRENCES_SCHEMA,
    "rejects": REJECTS_SCHEMA,
    "attributes": ATTRIBUTES_SCHEMA,
    "images": IMAGES_SCHEMA,
    "image_counts": IMAGE_COUNTS_SCHEMA,
    "attribute_index": ATTRIBUTE_INDEX_SCHEMA,
}
#: Tables written (and compacted) sorted by md5 within each bucket, in this order.
SORTED_BY_MD5 = {
    "occurrences": "bucket, md5, ingested_at, shard, ordinal",
    "attributes": "bucket, md5, attribute, value",
    "images": "bucket, md5",
}
#: The partition column of each table: ``bucket`` (of the md5) but for the attribute index.
PARTITIONS = {name: "part" if name == "attribute_index" else "bucket" for name in SCHEMAS}
#: Tables whose changes are read as a feed: occurrences by the images merge, images by the index.
CHANGE_FEED = {"occurrences", "images"}


#: The index's columns that come from the occurrence that carried the value.
FROM_OCCURRENCE = [
    name for name in ATTRIBUTE_INDEX_SCHEMA.names if name not in ("attribute", "value", "part")
]
#: The attribute index rows of cube rows in ``{cube}`` (that do not hold their occurrence's
#: ordinal: a cube as committed), each with the row of the occurrence that carried it in
#: ``{occurrences}`` (by md5, shard and source; a source listed twice in one shard: its first
#: ordinal, so a cube row gains no twin, and its value counts once), one row per occurrence and
#: value (a manifest key named as a derived attribute, with its value, is one).
INDEX_SQL = f"""
    WITH occurrence AS (
      SELECT DISTINCT ON (md5, shard, source_uri) * FROM {{occurrences}}
      ORDER BY md5, shard, source_uri, ordinal
    )
    SELECT DISTINCT c.attribute, c.value, {", ".join(f"o.{name}" for name in FROM_OCCURRENCE)},
           {attribute_part_sql("c.attribute")} AS part
    FROM {{cube}} c JOIN occurrence o
      ON o.md5 = c.md5 AND o.shard = c.shard AND o.source_uri = c.source_uri
"""
#: How the attribute index is sorted within a partition: a value's rows are contiguous (in no
#: order among themselves: a sort by md5 as well took twice as long).
INDEX_ORDER = "part, attribute, value"
