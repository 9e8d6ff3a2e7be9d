"""Library-wide assets: ``images`` merged from the shards that landed, the similarity index that
follows it, the near-duplicate groups, and the full audit (only when asked for).

``refresh_sensor`` runs the first three as the ``refresh_library`` job when shards land."""

import dagster as dg
from pydantic import Field

from asset_library.defs.checks import audit, images_md5_unique
from asset_library.defs.resources import LibraryResource, ObjectStoreResource, with_store_kinds
from asset_library.defs.tags import tag_run
from asset_library.ids import batch_of
from asset_library.lake import Catalog, compact, lake_files, merge_images, row_count
from asset_library.near_duplicates import NearDuplicates
from asset_library.search.thresholds import (
    DEFAULT_CONFIRM_DISTANCE,
    DEFAULT_MIN_QUALITY,
    DEFAULT_PHASH_THRESHOLD,
)
from asset_library.similarity import SimilarityIndex
from asset_library.storage import DamageRecord

GROUP = "library"


@dg.asset(
    deps=["occurrences", "rejects", "attributes"],
    group_name=GROUP,
    kinds={"deltalake"},
    check_specs=[
        dg.AssetCheckSpec(
            "images_md5_unique",
            asset="images",
            description="No md5 has two images rows, in the buckets this merge touched.",
        )
    ],
    description="Delta table, one row per md5: every occurrences commit since the last merge "
    "folded in (change data feed), touching only the buckets that changed.",
)
def images(context: dg.AssetExecutionContext, library: LibraryResource):
    lake = library.lake()
    lake.ensure()
    merged = merge_images(lake)
    # A refresh launched by hand learns its batches only now: what it merged.
    tag_run(context, [batch_of(shard) for shard in merged.shards])
    counts = {name: row_count(lake.open(name)) for name in ("images", "rejects", "attributes")}
    yield dg.MaterializeResult(
        metadata={
            "images": counts["images"],
            "rejects": counts["rejects"],
            "attributes": counts["attributes"],
            "dagster/row_count": counts["images"],
            "occurrences_versions": f"{merged.from_version + 1}..{merged.to_version}",
            "shards_merged": ", ".join(merged.shards[:50]),
            "buckets_touched": len(merged.buckets),
            "md5s_merged": merged.md5s,
            "inserted": merged.inserted,
            "updated": merged.updated,
            "deleted": merged.deleted,
            "seconds": round(merged.seconds, 3),
        }
    )
    # Not blocking: the similarity index follows images whatever this says.
    yield images_md5_unique(lake, merged.buckets)


@dg.asset(
    deps=[images],
    group_name=GROUP,
    kinds={"numpy"},
    description="Exact Hamming-radius index over pHash, aHash and dHash; one segment per "
    "merge of new md5s, read from the images change feed: nothing is rebuilt.",
)
def similarity_index(library: LibraryResource) -> dg.MaterializeResult:
    index = SimilarityIndex(library.layout())
    synced = index.sync(library.lake())
    return dg.MaterializeResult(
        metadata={
            "images": synced.images,
            "segments": len(index.segments),
            "segments_added": len(synced.added),
            "md5s_removed": len(synced.removed),
            "images_version": index.images_version,
            "bytes": sum(i.nbytes() for i in index.indexes.values()),
        }
    )


@dg.asset(
    deps=[similarity_index],
    group_name=GROUP,
    kinds={"parquet"},
    description=f"Connected groups of images within pHash distance {DEFAULT_PHASH_THRESHOLD} "
    f"(and dHash distance {DEFAULT_CONFIRM_DISTANCE}, as a search confirms a match) of a "
    "neighbour: the catalog's near_duplicates view.",
)
def near_duplicate_groups(library: LibraryResource) -> dg.MaterializeResult:
    groups_file = NearDuplicates(library.layout(), library.lake())
    groups = groups_file.compute()
    groups_file.write(groups)
    largest = "\n".join(
        f"- group {n}: {len(group)} images, e.g. `{group[0]}`"
        for n, group in enumerate(groups[:10])
    )
    return dg.MaterializeResult(
        metadata={
            "threshold": DEFAULT_PHASH_THRESHOLD,
            "min_quality": DEFAULT_MIN_QUALITY,
            "confirm_dhash_distance": DEFAULT_CONFIRM_DISTANCE,
            "groups": len(groups),
            "images_in_groups": sum(len(group) for group in groups),
            "largest_group": len(groups[0]) if groups else 0,
            "largest_groups": dg.MetadataValue.md(largest or "no near-duplicates"),
        }
    )


@dg.asset(
    deps=[images],
    group_name=GROUP,
    kinds={"duckdb"},
    check_specs=[
        dg.AssetCheckSpec(name, asset="library_audit", blocking=True)
        for name in (
            "md5_unique",
            "hash_coverage",
            "uploads_present",
            "attribute_keys_in_images",
            "occurrences_counted",
        )
    ],
    description="The full audit, library-wide: md5 uniqueness, hash coverage, uploads present "
    "(exhaustive to 100k images, else a 10k sample), attribute keys among images, each "
    "occurrence counted once in images (bucket by bucket). Costs the "
    "library: run it on purpose (job audit_library), not on every refresh.",
)
def library_audit(library: LibraryResource, object_store: ObjectStoreResource):
    lake = library.lake()
    catalog = Catalog(lake)
    try:
        store = object_store.open_for(library.layout(), record=False)
        damaged = DamageRecord(library.layout().damaged_objects_dir).md5s()
        results = audit(catalog, store, content_sample=object_store.verify_sample, suspects=damaged)
    finally:
        catalog.close()
    yield dg.MaterializeResult(
        metadata={
            "files": dg.MetadataValue.json(lake_files(lake)),
            "failed": ", ".join(r.check_name or "" for r in results if not r.passed),
        }
    )
    yield from results


class CompactionConfig(dg.Config):
    """How much one compaction run may rewrite: the buckets of a table carry at once (the
    shard that fills a high tier), so a cap spreads that carry over the next runs."""

    max_megabytes_per_table: int | None = Field(
        default=None,
        gt=0,
        description="Read at most this many MB of files per table in one run, the most "
        "crowded buckets first; the rest wait for the next run. None: every bucket due.",
    )


@dg.asset(
    deps=[images],
    group_name=GROUP,
    kinds={"deltalake"},
    description="Every table's buckets compacted by size tiers (a tier's files merged into one "
    "once it holds 8; large files of a tier not full left alone), then vacuumed (files "
    "replaced, or listed by no commit, more than 7 days ago deleted). Run by the compact_library "
    "job.",
)
def lake_compaction(library: LibraryResource, config: CompactionConfig) -> dg.MaterializeResult:
    lake = library.lake()
    merge_images(lake)  # merged first: the change feed it reads must not be vacuumed away
    budget = config.max_megabytes_per_table
    done = compact(lake, max_bytes=None if budget is None else budget * 1_000_000)
    return dg.MaterializeResult(
        metadata={name: dg.MetadataValue.json(m) for name, m in done.items()}
    )


@dg.definitions
def library() -> dg.Definitions:
    """The library-wide assets; the lake's tables of the kind of the store the lake is in."""
    return dg.Definitions(
        assets=[
            with_store_kinds(images, {"images": "lake"}),
            similarity_index,
            near_duplicate_groups,
            library_audit,
            with_store_kinds(lake_compaction, {"lake_compaction": "lake"}),
        ]
    )
