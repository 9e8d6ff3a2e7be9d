"""Resources: where the library lives, where image bytes go, and where batches land.

Every setting comes from the environment, so the same code location serves the embedded default
(a local folder, no server) and S3:

======================== ==================================================================
ASSET_LIBRARY_HOME       the library: a folder (the embedded default, ``./library``) or
                         ``s3://bucket/prefix``, where everything durable then lives (settings,
                         plans, trigger records, keys files, lake, objects, index); anything
                         else is refused
ASSET_LIBRARY_CACHE      this machine's cache folder (default ``$XDG_CACHE_HOME/asset-library``,
                         else ``~/.cache/asset-library``): an S3 library's working copies under
                         ``libraries/<bucket>/<prefix>``, with the CLI's Dagster instance and
                         progress files (unless ``DAGSTER_HOME`` is set); deleting it loses
                         nothing
ASSET_LIBRARY_OBJECTS    where image bytes go: ``s3://bucket/prefix`` or a folder (default:
                         the store the library records, else ``<home>/objects``); a library
                         refuses a store other than the one it recorded at its first ingest
ASSET_LIBRARY_VERIFY_SAMPLE  objects whose bytes ``uploads_present`` reads and hashes per run
                         (default 100; every object's size is checked)
ASSET_LIBRARY_LAKE       where the lake's Delta tables live: ``s3://bucket/prefix`` or a folder
                         (default ``<home>/lake``)
ASSET_LIBRARY_LANDING    the landing zone the sensor watches: ``s3://bucket/prefix`` or a
                         folder (default ``<home>/landing``)
ASSET_LIBRARY_WORKERS    fingerprinting processes per shard run (default: every core)
ASSET_LIBRARY_SHARD_SIZE most images per shard when a batch is planned (default 10,000,000)
ASSET_LIBRARY_ALLOWED_ROOTS  folders (os.pathsep-separated) a batch may read local files from
                         besides its own folder (a folder batch's folder, a local manifest's
                         folder); needed for absolute paths in manifests and any local path in
                         an S3 manifest. Recorded in each plan when it is made (default: none)
ASSET_LIBRARY_MAX_IMAGE_BYTES  the largest source file a shard reads; larger ones are rejects
                         (``too_large``) (default 536870912, 512 MiB)
ASSET_LIBRARY_SERVING_STORE  the serving store in PostgreSQL: ``postgresql://user@host:port/db``
                         (default: ``<home>/serving/store.sqlite`` in a folder library; none
                         for a lake on S3). Its password from
                         ``ASSET_LIBRARY_SERVING_STORE_PASSWORD`` (or libpq's ``PGPASSWORD``),
                         never logged
S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION   for S3 (the keys are
                         ``dg.EnvVar``: read when a run starts, never shown in the UI)
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
from dagster_duckdb import DuckDBResource

from asset_library.ids import DEFAULT_BUCKETS
from asset_library.ingest.access import (
    DEFAULT_MAX_IMAGE_BYTES,
    ReadPolicy,
    allowed_roots_from,
    max_image_bytes_from,
)
from asset_library.ingest.plan import DEFAULT_MAX_IMAGES_PER_SHARD
from asset_library.ingest.sources import read_uri
from asset_library.lake import Lake
from asset_library.layout import HOME_ENV, LibraryLayout, resolve_home
from asset_library.s3 import SECRET_VARIABLES, delta_storage_options, is_s3, s3_settings
from asset_library.storage import (
    LocalObjectStore,
    ObjectStore,
    S3ObjectStore,
    bind_store,
    parse_s3_uri,
)

DEFAULT_VERIFY_SAMPLE = 100

#: What the Dagster layer opens DuckDB with (the keys preview, the shard's checks): in memory,
#: one connection per use, so runs side by side never wait on a file lock.
IN_MEMORY_DUCKDB = DuckDBResource(database=":memory:")


class LibraryResource(dg.ConfigurableResource):
    """The library root and how shard runs use the machine."""

    root: str
    n_buckets: int = DEFAULT_BUCKETS
    max_images_per_shard: int = DEFAULT_MAX_IMAGES_PER_SHARD
    workers: int | None = None
    io_threads: int = 10  # dagster-aws S3 clients pool 10 connections
    #: the lake's location ("" = <root>/lake) and, for S3, delta-rs storage options; keys that
    #: this process's environment holds are left out and read from it when the lake opens
    lake_location: str = ""
    lake_storage_options: dict[str, str] = {}

    def layout(self) -> LibraryLayout:
        return LibraryLayout.open(self.root, self.n_buckets)

    def lake(self) -> Lake:
        layout = self.layout()
        if is_s3(self.lake_location):
            recorded = layout.settings().get("lake")
            if self.lake_location not in (recorded, layout.lake_location):
                # Readers of this library find its lake here (a URI, never a local path).
                layout.update_settings(lake=self.lake_location)
            secrets = {name: value for name, value in s3_settings().secrets.items() if value}
            options = {**secrets, **self.lake_storage_options}
            return Lake(
                self.lake_location, layout.n_buckets, options, layout.image_keys_dir, layout
            )
        if self.lake_location:
            return Lake(self.lake_location, layout.n_buckets, {}, layout.image_keys_dir, layout)
        return Lake.of(layout, {})


class ObjectStoreResource(dg.ConfigurableResource, ABC):
    """Write-once storage of image bytes under their md5 key."""

    verify_sample: int = DEFAULT_VERIFY_SAMPLE

    @abstractmethod
    def open(self) -> ObjectStore: ...

    @abstractmethod
    def location(self) -> str:
        """``s3://bucket/prefix`` or the folder: what a library records as its store."""

    def open_for(self, layout: LibraryLayout, *, record: bool) -> ObjectStore:
        """The store, once it is known to be the library's own (recorded first, if ``record``
        and the library has none yet); ``StoreMismatchError`` before any byte moves if not."""
        bind_store(layout, self.location(), record=record)
        return self.open()


class LocalObjectStoreResource(ObjectStoreResource):
    """A folder: the embedded default, no server needed."""

    path: str

    def open(self) -> ObjectStore:
        return LocalObjectStore(Path(self.path))

    def location(self) -> str:
        return str(Path(self.path).expanduser().resolve())


class S3ObjectStoreResource(ObjectStoreResource):
    """An S3 bucket (and prefix), through dagster-aws's S3Resource."""

    bucket: str
    prefix: str = ""
    s3: dg.ResourceDependency[S3Resource]

    def open(self) -> ObjectStore:
        return S3ObjectStore(self.s3.get_client(), self.bucket, self.prefix)

    def location(self) -> str:
        prefix = self.prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"


class SourceReaderResource(dg.ConfigurableResource):
    """Reads batch sources: local paths, and ``s3://`` URIs through the S3 resource.

    ``allowed_roots`` are folders any batch may read besides its own (recorded in each plan
    when it is made); ``max_image_bytes`` is the largest source file read.
    """

    s3: dg.ResourceDependency[S3Resource]
    allowed_roots: list[str] = []
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def s3_client(self) -> Any:
        return self.s3.get_client()

    def reader(self, roots: list[str]) -> Any:
        """A ``uri -> bytes`` function for a batch that may read local files under ``roots``,
        holding one thread-safe client for the whole run."""
        policy = ReadPolicy(tuple(roots), self.max_image_bytes)
        return partial(read_uri, s3_client=self.s3_client(), policy=policy)


class LandingZoneResource(dg.ConfigurableResource):
    """The folder or S3 prefix the landing sensor watches for new batches."""

    location: str


def s3_resource_from_env(environ: Mapping[str, str]) -> S3Resource:
    """The S3 resource; keys that come from this process's environment stay ``dg.EnvVar``s
    (the UI shows the variable, not the secret); keys given in ``environ`` alone are literal."""
    settings = s3_settings(environ)
    secrets: dict[str, Any] = {}
    for name, value in settings.secrets.items():
        if value and os.environ.get(name) == value:
            secrets[name.lower()] = dg.EnvVar(name)
        else:
            secrets[name.lower()] = value
    return S3Resource(endpoint_url=settings.endpoint_url, region_name=settings.region, **secrets)


def _home(environ: Mapping[str, str], root: str | None) -> str:
    """The library's home, a folder or an ``s3://`` URL (:func:`resolve_home`)."""
    return resolve_home(root or environ.get(HOME_ENV) or "library")


def _objects_location(environ: Mapping[str, str], home: str) -> str:
    """Where image bytes go: the setting, else the store the library recorded, else its
    ``objects`` folder (read only: loading definitions creates no library)."""
    layout = LibraryLayout.at(home)
    return (
        environ.get("ASSET_LIBRARY_OBJECTS") or layout.recorded_objects() or layout.objects_location
    )


def store_kinds(
    environ: Mapping[str, str] | None = None, *, root: str | None = None
) -> dict[str, str]:
    """The asset kind of each store (``objects``, ``lake``) as this environment configures it,
    read as ``build_resources`` reads it: ``s3`` or ``filesystem``."""
    environ = os.environ if environ is None else environ
    home = _home(environ, root)
    layout = LibraryLayout.at(home)
    recorded = layout.settings() if layout.fetch(layout.settings_path) else {}
    locations = {
        "objects": _objects_location(environ, home),
        "lake": environ.get("ASSET_LIBRARY_LAKE") or recorded.get("lake") or "",
    }
    return {store: "s3" if is_s3(at) else "filesystem" for store, at in locations.items()}


def with_store_kinds(assets: dg.AssetsDefinition, stores: Mapping[str, str]) -> dg.AssetsDefinition:
    """``assets`` with each asset that ``stores`` maps to a store (``objects``, ``lake``) given
    that store's kind. Kinds are fixed when the definitions load, so they are read from the
    environment then, as the resources are."""
    kinds = store_kinds()

    def add_kind(spec: dg.AssetSpec) -> dg.AssetSpec:
        store = stores.get(spec.key.to_user_string())
        return spec if store is None else spec.replace_attributes(kinds={*spec.kinds, kinds[store]})

    return assets.map_asset_specs(add_kind)


def build_resources(
    environ: Mapping[str, str] | None = None, *, root: str | None = None
) -> dict[str, Any]:
    """The resources for this environment: local folders unless S3 locations are given."""
    environ = os.environ if environ is None else environ
    home = _home(environ, root)
    workers = _int_setting(environ, "ASSET_LIBRARY_WORKERS", minimum=0)
    shard_size = _int_setting(environ, "ASSET_LIBRARY_SHARD_SIZE", minimum=1)
    s3 = s3_resource_from_env(environ)
    objects = _objects_location(environ, home)
    verify_sample = int(environ.get("ASSET_LIBRARY_VERIFY_SAMPLE") or DEFAULT_VERIFY_SAMPLE)
    if is_s3(objects):
        bucket, prefix = parse_s3_uri(objects)
        object_store: ObjectStoreResource = S3ObjectStoreResource(
            bucket=bucket, prefix=prefix, s3=s3, verify_sample=verify_sample
        )
    else:
        object_store = LocalObjectStoreResource(path=objects, verify_sample=verify_sample)
    # The lake set, else the one the library records, else an S3 library's own (on S3 too): an
    # S3 lake's storage options are made here from this environment.
    layout = LibraryLayout.at(home)
    recorded = layout.settings().get("lake") if layout.fetch(layout.settings_path) else None
    lake = environ.get("ASSET_LIBRARY_LAKE") or recorded or ""
    lake = lake or (layout.lake_location if is_s3(home) else "")
    return {
        "library": LibraryResource(
            root=home,
            lake_location=lake,
            lake_storage_options=_without_process_secrets(delta_storage_options(environ))
            if is_s3(lake)
            else {},
            workers=workers,
            max_images_per_shard=shard_size or DEFAULT_MAX_IMAGES_PER_SHARD,
        ),
        "object_store": object_store,
        "sources": SourceReaderResource(
            s3=s3,
            allowed_roots=allowed_roots_from(environ),
            max_image_bytes=max_image_bytes_from(environ),
        ),
        "landing": LandingZoneResource(
            location=environ.get("ASSET_LIBRARY_LANDING") or LibraryLayout.at(home).landing_location
        ),
        "s3": s3,
        "duckdb": IN_MEMORY_DUCKDB,
    }


@dg.definitions
def resources() -> dg.Definitions:
    """The code location's resources, from the environment it loads in."""
    return dg.Definitions(resources=build_resources())


def _without_process_secrets(options: dict[str, str]) -> dict[str, str]:
    """Storage options minus the keys this process's environment holds (read at run time)."""
    return {
        name: value
        for name, value in options.items()
        if not (name in SECRET_VARIABLES and os.environ.get(name) == value)
    }


def _int_setting(environ: Mapping[str, str], name: str, *, minimum: int) -> int | None:
    """An integer setting, ``None`` when unset; a bad value names the variable."""
    text = (environ.get(name) or "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"{name}={text!r}: expected a whole number of at least {minimum}")
    return value
