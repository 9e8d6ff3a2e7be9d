"""Where a library's objects live: a location in one spelling, the store a library records,
and the store a location opens."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from asset_library.layout import LibraryLayout
from asset_library.s3 import is_s3
from asset_library.storage.base import ObjectStore
from asset_library.storage.errors import StoreMismatchError
from asset_library.storage.local import LocalObjectStore
from asset_library.storage.s3_store import S3ObjectStore, parse_s3_uri, s3_client_from_env


def store_location(location: str | os.PathLike[str]) -> str:
    """A store location in one spelling, so two can be compared: `s3://bucket/prefix` (no
    trailing slash) or an absolute folder path."""
    text = os.fspath(location)
    if is_s3(text):
        bucket, prefix = parse_s3_uri(text)
        prefix = prefix.strip("/")
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    if text.startswith("file://"):
        text = text[len("file://") :]
    return str(Path(text).expanduser().resolve())


def bind_store(layout: LibraryLayout, location: str | os.PathLike[str], *, record: bool) -> str:
    """Check that `location` is the object store the library records; with `record`, record it
    if the library has none yet. Returns the location in the form `store_location` gives.

    Raises `StoreMismatchError` before anything is written when the library records another
    store: a typo in a bucket name must not scatter a library's bytes over two stores.
    """
    wanted = store_location(location)
    recorded = layout.recorded_objects()
    if recorded is None:
        if record:
            layout.record_objects(wanted)
        return wanted
    recorded = store_location(recorded)
    if recorded != wanted:
        raise StoreMismatchError(
            f"library {layout.location} keeps its images in {recorded}, but this run is configured "
            f"for {wanted} (ASSET_LIBRARY_OBJECTS); nothing was stored. Unset "
            "ASSET_LIBRARY_OBJECTS to use the library's store, or, to move the library on "
            f'purpose, copy its objects to the new store and set "objects" in '
            f"{layout.location}/library.json to it.",
            code="StoreMismatch",
        )
    return wanted


def open_store(location: str | os.PathLike[str], client: Any = None) -> ObjectStore:
    """The store a location names: `s3://bucket/prefix` for S3, anything else a folder.

    Without `client`, an S3 location gets one from `s3_client_from_env()`.
    """
    text = os.fspath(location)
    if is_s3(text):
        bucket, prefix = parse_s3_uri(text)
        return S3ObjectStore(client or s3_client_from_env(), bucket, prefix)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return LocalObjectStore(text)
