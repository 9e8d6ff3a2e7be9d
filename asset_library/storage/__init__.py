"""Write-once, content-addressed object storage for image bytes.

Images are stored under a key derived from their MD5 (`object_key`), so a key names exactly one
body: a store never overwrites an intact object, and "the key holds its body" means "the image is
stored". An object that was damaged after it was written (truncated, overwritten) no longer
matches its key: `put_if_absent` of the right bytes replaces it, and `verify_objects` finds it.
Two back ends share one interface:

- `LocalObjectStore`, a folder: the embedded default, no server needed;
- `S3ObjectStore`, any S3 API (AWS, SeaweedFS, MinIO...) through a boto3 client.

Both verify integrity on write (the local store hashes the body; S3 sends `Content-MD5`, so the
server refuses a corrupted body with `BadDigest`) and both are safe against concurrent writers of
the same key (a hard link on disk, `If-None-Match: *` on S3): exactly one writer wins.

One module per concern, each importing only those listed before it: :mod:`.errors` (what the
stores raise), :mod:`.base` (the interface and the key rules), :mod:`.local` and
:mod:`.s3_store` (the back ends), :mod:`.verify` (stored images checked against their keys) and
:mod:`.location` (the store a library records and the store a location opens). Callers import
the public names from here; :mod:`.remote` (a library's own files at an ``s3://`` home) is used
by the library layout alone.

This package deliberately imports no Dagster, so workers and scripts can use it on their own.
"""

from asset_library.storage.base import (
    ObjectProblem,
    ObjectStat,
    ObjectStore,
    PutResult,
    check_key,
    object_key,
)
from asset_library.storage.errors import (
    DamagedObjectError,
    DigestMismatchError,
    ObjectNotFoundError,
    ObjectStoreError,
    StoreMismatchError,
)
from asset_library.storage.local import LocalObjectStore
from asset_library.storage.location import bind_store, open_store, store_location
from asset_library.storage.s3_store import S3ObjectStore, parse_s3_uri, s3_client_from_env
from asset_library.storage.verify import DamageRecord, read_image, verify_objects

__all__ = [
    "DamageRecord",
    "DamagedObjectError",
    "DigestMismatchError",
    "LocalObjectStore",
    "ObjectNotFoundError",
    "ObjectProblem",
    "ObjectStat",
    "ObjectStore",
    "ObjectStoreError",
    "PutResult",
    "S3ObjectStore",
    "StoreMismatchError",
    "bind_store",
    "check_key",
    "object_key",
    "open_store",
    "parse_s3_uri",
    "read_image",
    "s3_client_from_env",
    "store_location",
    "verify_objects",
]
