"""Library-wide assets: the catalog, the similarity index and the near-duplicate groups."""

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from asset_library.catalog import NEAR_DUPLICATES_SCHEMA, build_catalog, connect
from asset_library.defs.resources import LibraryResource
from asset_library.ingest.fingerprint import DEFAULT_PHASH_THRESHOLD
from asset_library.similarity import SimilarityIndex

GROUP = "library"

#: Refresh once shards have landed: waits while shard runs are still going, then runs once for
#: everything that landed meanwhile. Unlike ``eager()``, it does not wait for every shard
#: partition ever added to exist, so one failed shard does not freeze the library.
REFRESH_WHEN_SHARDS_LAND = (
    (
        dg.AutomationCondition.newly_missing() | dg.AutomationCondition.any_deps_updated()
    ).since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("refresh when shards land")


@dg.asset(
    deps=["base_table", "cube_table"],
    group_name=GROUP,
    kinds={"duckdb"},
    automation_condition=REFRESH_WHEN_SHARDS_LAND,
    description="DuckDB views (images, occurrences, rejects, attributes) and table macros "
    "over the bucketed Parquet lake.",
)
def catalog(library: LibraryResource) -> dg.MaterializeResult:
    layout = library.layout()
    path = build_catalog(layout)
    with connect(layout) as connection:
        images, occurrences, rejects, attributes = connection.execute(
            "SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM occurrences), "
            "(SELECT count(*) FROM rejects), (SELECT count(*) FROM attributes)"
        ).fetchone()
    return dg.MaterializeResult(
        metadata={
            "images": images,
            "occurrences": occurrences,
            "rejects": rejects,
            "attributes": attributes,
            "dagster/row_count": images,
            "path": dg.MetadataValue.path(str(path)),
        }
    )


@dg.asset(
    deps=[catalog],
    group_name=GROUP,
    kinds={"numpy"},
    automation_condition=REFRESH_WHEN_SHARDS_LAND,
    description="Exact Hamming-radius index over pHash, aHash and dHash; one segment per "
    "shard, so a new shard adds a segment and nothing is rebuilt.",
)
def similarity_index(library: LibraryResource) -> dg.MaterializeResult:
    index = SimilarityIndex(library.layout())
    synced = index.sync()
    return dg.MaterializeResult(
        metadata={
            "images": synced.images,
            "segments": len(index.segments),
            "segments_added": len(synced.added),
            "segments_removed": len(synced.removed),
            "segments_unchanged": synced.unchanged,
            "bytes": sum(i.nbytes() for i in index.indexes.values()),
        }
    )


@dg.asset(
    deps=[similarity_index],
    group_name=GROUP,
    kinds={"parquet"},
    automation_condition=REFRESH_WHEN_SHARDS_LAND,
    description=f"Connected groups of images within pHash distance {DEFAULT_PHASH_THRESHOLD} "
    "of a neighbour: the catalog's near_duplicates view.",
)
def near_duplicate_groups(library: LibraryResource) -> dg.MaterializeResult:
    layout = library.layout()
    groups = SimilarityIndex(layout).groups(DEFAULT_PHASH_THRESHOLD)
    rows = {
        "group_id": [n for n, group in enumerate(groups) for _ in group],
        "group_size": [len(group) for group in groups for _ in group],
        "md5": [md5 for group in groups for md5 in group],
    }
    path = layout.table_dir("near_duplicates") / "groups.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".groups.parquet.tmp")
    pq.write_table(pa.table(rows, schema=NEAR_DUPLICATES_SCHEMA), tmp)
    tmp.replace(path)
    largest = "\n".join(
        f"- group {n}: {len(group)} images, e.g. `{group[0]}`"
        for n, group in enumerate(groups[:10])
    )
    return dg.MaterializeResult(
        metadata={
            "threshold": DEFAULT_PHASH_THRESHOLD,
            "groups": len(groups),
            "images_in_groups": len(rows["md5"]),
            "largest_group": len(groups[0]) if groups else 0,
            "largest_groups": dg.MetadataValue.md(largest or "no near-duplicates"),
        }
    )
