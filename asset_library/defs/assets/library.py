"""Library-wide assets: the catalog over every landed shard."""

import dagster as dg

from asset_library.catalog import build_catalog, connect
from asset_library.defs.resources import LibraryResource

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
