"""The serving store: the lake's answers per md5 in SQLite or PostgreSQL, kept level with
``images`` by the ``refresh_library`` job, checked against the lake, rebuilt on demand
(``rebuild: true``)."""

import dagster as dg

from asset_library.defs.assets.library import GROUP
from asset_library.defs.resources import LibraryResource
from asset_library.library import Library
from asset_library.serving import SqliteBackend, check_store, configured_backend, sync


class ServingStoreConfig(dg.Config):
    """``rebuild``: every row again from the lake's current rows, not from its changes."""

    rebuild: bool = False
    #: How many records the check compares with the lake's.
    check_sample: int = 100


@dg.asset(
    deps=["images"],
    group_name=GROUP,
    kinds={"sqlite", "postgres"},
    check_specs=[
        dg.AssetCheckSpec(
            "serving_store_level",
            asset="serving_store",
            description="As many image rows as images; a sample of records equal to the lake's.",
        )
    ],
    description="Per md5 the image's record, attributes by origin, first sources and their "
    "count, in one SQLite file in the library or in PostgreSQL (ASSET_LIBRARY_SERVING_STORE): "
    "what lookups read. Brought level from the "
    "images, occurrences and attributes commits since its last sync, written as a new run "
    "(a cost per shard); runs of a size tier merge four into one.",
)
def serving_store(library: LibraryResource, config: ServingStoreConfig):
    lake = library.lake()
    backend = configured_backend(library.layout().serving_store_path)
    if backend is None or (lake.is_s3 and isinstance(backend, SqliteBackend)):
        yield dg.MaterializeResult(metadata={"skipped": "a lake on S3: lookups read the lake"})
        yield dg.AssetCheckResult(  # no store, so none can answer out of level with the lake
            check_name="serving_store_level",
            passed=True,
            description="no serving store is kept for a lake on S3 without "
            "ASSET_LIBRARY_SERVING_STORE: lookups read the lake",
            metadata={"kept": False},
        )
        return
    synced = sync(lake, backend, rebuild=config.rebuild)
    yield dg.MaterializeResult(
        metadata={
            "store": backend.describe(),
            "rebuilt": synced.rebuilt,
            "reason": synced.reason,
            "images_version": synced.images_version,
            "occurrences_version": synced.occurrences_version,
            "attributes_version": synced.attributes_version,
            "images_changed": synced.images_changed,
            "occurrences_changed": synced.occurrences_changed,
            "attributes_changed": synced.attributes_changed,
            "sources_refilled": synced.refilled,
            "run_rows": synced.run_rows,
            "runs_merged": synced.runs_merged,
            "merged_rows": synced.merged_rows,
            "runs": synced.runs,
            "seconds": round(synced.seconds, 3),
            "bytes": backend.size_bytes(),
        }
    )
    checked = check_store(Library(library.layout().location), config.check_sample)
    yield dg.AssetCheckResult(
        check_name="serving_store_level",
        passed=checked.passed,
        description=checked.reason,
        metadata={
            "store_rows": checked.store_rows,
            "images_rows": checked.lake_rows,
            "sampled": checked.sampled,
            "differing": ", ".join(checked.differing[:20]),
        },
    )
