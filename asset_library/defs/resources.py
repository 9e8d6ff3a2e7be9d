"""Resources: where the library lives, where image bytes go, and where batches land.

Every setting comes from the environment, so the same code location serves the embedded default
(a local folder, no server) and S3:

======================== ==================================================================
ASSET_LIBRARY_HOME       the library root folder (default ``./library``)
ASSET_LIBRARY_OBJECTS    where image bytes go: ``s3://bucket/prefix`` or a folder
                         (default ``<home>/objects``)
ASSET_LIBRARY_LAKE       where the lake's Delta tables live: ``s3://bucket/prefix`` or a folder
                         (default ``<home>/lake``)
ASSET_LIBRARY_LANDING    the landing zone the sensor watches: ``s3://bucket/prefix`` or a
                         folder (default ``<home>/landing``)
ASSET_LIBRARY_WORKERS    fingerprinting processes per shard run (default: every core)
ASSET_LIBRARY_SHARD_SIZE most images per shard when a batch is planned (default 10,000,000)
S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION   for S3
======================== ==================================================================
"""

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from asset_library.ids import DEFAULT_BUCKETS
from asset_library.ingest.plan import DEFAULT_MAX_IMAGES_PER_SHARD
from asset_library.ingest.sources import read_uri
from asset_library.lake import Lake
from asset_library.lake.tables import s3_storage_options
from asset_library.layout import LibraryLayout
from asset_library.storage import LocalObjectStore, ObjectStore, S3ObjectStore, parse_s3_uri


class LibraryResource(dg.ConfigurableResource):
    """The library root and how shard runs use the machine."""

    root: str
    n_buckets: int = DEFAULT_BUCKETS
    max_images_per_shard: int = DEFAULT_MAX_IMAGES_PER_SHARD
    workers: int | None = None
    io_threads: int = 10  # dagster-aws S3 clients pool 10 connections
    #: the lake's location ("" = <root>/lake) and, for S3, delta-rs storage options
    lake_location: str = ""
    lake_storage_options: dict[str, str] = {}

    def layout(self) -> LibraryLayout:
        return LibraryLayout.open(self.root, self.n_buckets)

    def lake(self) -> Lake:
        layout = self.layout()
        if self.lake_location.startswith("s3://"):
            if layout.settings().get("lake") != self.lake_location:
                # Readers of this library find its lake here (a URI, never a local path).
                layout.update_settings(lake=self.lake_location)
            return Lake(self.lake_location, layout.n_buckets, dict(self.lake_storage_options))
        if self.lake_location:
            return Lake(self.lake_location, layout.n_buckets, {})
        return Lake.of(layout, {})


class ObjectStoreResource(dg.ConfigurableResource, ABC):
    """Write-once storage of image bytes under their md5 key."""

    @abstractmethod
    def open(self) -> ObjectStore: ...


class LocalObjectStoreResource(ObjectStoreResource):
    """A folder: the embedded default, no server needed."""

    path: str

    def open(self) -> ObjectStore:
        return LocalObjectStore(Path(self.path))


class S3ObjectStoreResource(ObjectStoreResource):
    """An S3 bucket (and prefix), through dagster-aws's S3Resource."""

    bucket: str
    prefix: str = ""
    s3: dg.ResourceDependency[S3Resource]

    def open(self) -> ObjectStore:
        return S3ObjectStore(self.s3.get_client(), self.bucket, self.prefix)


class SourceReaderResource(dg.ConfigurableResource):
    """Reads batch sources: local paths, and ``s3://`` URIs through the S3 resource."""

    s3: dg.ResourceDependency[S3Resource]

    def s3_client(self) -> Any:
        return self.s3.get_client()

    def reader(self) -> Any:
        """A ``uri -> bytes`` function holding one thread-safe client for the whole run."""
        return partial(read_uri, s3_client=self.s3_client())


class LandingZoneResource(dg.ConfigurableResource):
    """The folder or S3 prefix the landing sensor watches for new batches."""

    location: str


def s3_resource_from_env(environ: Mapping[str, str]) -> S3Resource:
    return S3Resource(
        endpoint_url=environ.get("S3_ENDPOINT_URL") or environ.get("AWS_ENDPOINT_URL"),
        region_name=environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_access_key_id=environ.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=environ.get("AWS_SECRET_ACCESS_KEY"),
    )


def build_resources(
    environ: Mapping[str, str] | None = None, *, root: str | None = None
) -> dict[str, Any]:
    """The resources for this environment: local folders unless S3 locations are given."""
    environ = os.environ if environ is None else environ
    home = str(Path(root or environ.get("ASSET_LIBRARY_HOME") or "library").expanduser().resolve())
    workers = environ.get("ASSET_LIBRARY_WORKERS")
    shard_size = environ.get("ASSET_LIBRARY_SHARD_SIZE")
    s3 = s3_resource_from_env(environ)
    objects = environ.get("ASSET_LIBRARY_OBJECTS") or str(Path(home) / "objects")
    if objects.startswith("s3://"):
        bucket, prefix = parse_s3_uri(objects)
        object_store: ObjectStoreResource = S3ObjectStoreResource(
            bucket=bucket, prefix=prefix, s3=s3
        )
    else:
        object_store = LocalObjectStoreResource(path=objects)
    lake = environ.get("ASSET_LIBRARY_LAKE") or ""
    return {
        "library": LibraryResource(
            root=home,
            lake_location=lake,
            lake_storage_options=s3_storage_options(environ) if lake.startswith("s3://") else {},
            workers=int(workers) if workers else None,
            max_images_per_shard=int(shard_size) if shard_size else DEFAULT_MAX_IMAGES_PER_SHARD,
        ),
        "object_store": object_store,
        "sources": SourceReaderResource(s3=s3),
        "landing": LandingZoneResource(
            location=environ.get("ASSET_LIBRARY_LANDING") or str(Path(home) / "landing")
        ),
        "s3": s3,
    }
