"""Columns the ingest and the lake share: what the library knows of an image, declared once.

A shard's keys file and the lake's ``occurrences`` and ``images`` tables all carry these
columns under these names and types, so a reader can move rows between them by name.
"""

from __future__ import annotations

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")

#: An image's own facts: its key, size, format, dimensions as displayed, hashes and information
#: score. The same for every occurrence of the same bytes.
IMAGE_COLUMNS: list[tuple[str, pa.DataType]] = [
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
