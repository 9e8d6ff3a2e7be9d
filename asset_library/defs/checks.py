"""Asset checks that guard the library. They run with the catalog, over the whole lake.

All are blocking: a failure fails the catalog run and stops what is built from the catalog.
"""

import random

import dagster as dg

from asset_library.catalog import connect
from asset_library.defs.resources import LibraryResource, ObjectStoreResource
from asset_library.storage import verify_objects

#: Up to this many images, every object is checked; above it, a uniform random sample.
UPLOAD_CHECK_EXHAUSTIVE_LIMIT = 100_000
UPLOAD_CHECK_SAMPLE = 10_000


def _result(passed: bool, description: str, **metadata: object) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata=metadata,
    )


@dg.asset_check(asset="catalog", blocking=True, description="Each md5 is one image.")
def md5_unique(library: LibraryResource) -> dg.AssetCheckResult:
    """An md5 seen with two sizes or two hashes, or an occurrence row written twice, means the
    lake has duplicated or corrupted rows; ``images`` then hides it, so it is looked for here."""
    with connect(library.layout()) as connection:
        conflicting, duplicated, images, distinct = connection.execute(
            """
            SELECT
              (SELECT count(*) FROM (SELECT md5 FROM occurrences GROUP BY md5
                 HAVING count(DISTINCT size_bytes) > 1 OR count(DISTINCT phash) > 1)),
              (SELECT count(*) FROM (SELECT shard, ordinal FROM occurrences
                 GROUP BY shard, ordinal HAVING count(*) > 1)),
              (SELECT count(*) FROM images),
              (SELECT count(DISTINCT md5) FROM images)
            """
        ).fetchone()
    passed = conflicting == 0 and duplicated == 0 and images == distinct
    return _result(
        passed,
        "md5 keys are unique" if passed else "duplicated or conflicting md5 rows in the lake",
        images=images,
        conflicting_md5s=conflicting,
        duplicated_occurrences=duplicated,
    )


@dg.asset_check(asset="catalog", blocking=True, description="Every image has all three hashes.")
def hash_coverage(library: LibraryResource) -> dg.AssetCheckResult:
    with connect(library.layout()) as connection:
        images, covered = connection.execute(
            """
            SELECT count(*), count(*) FILTER (WHERE
              length(phash) = 16 AND length(ahash) = 16 AND length(dhash) = 16)
            FROM images
            """
        ).fetchone()
    coverage = covered / images if images else 1.0
    return _result(
        covered == images,
        f"{coverage:.4%} of images have pHash, aHash and dHash",
        images=images,
        missing_hashes=images - covered,
        coverage=coverage,
    )


@dg.asset_check(
    asset="catalog", blocking=True, description="Every image's bytes are stored, undamaged."
)
def uploads_present(
    library: LibraryResource, object_store: ObjectStoreResource
) -> dg.AssetCheckResult:
    """Exhaustive up to 100k images; above, a random sample of 10k HEADs. At a billion images
    a full LIST is ~1M requests and hours; 10k HEADs take seconds and find a 0.05% loss rate
    with 99% probability. A full audit belongs to S3 Inventory, not to every refresh.

    Each checked object's size must be the image's; the bytes of ``verify_sample`` of them
    (and of any whose ETag disagrees) are read and hashed, to catch same-size damage."""
    layout = library.layout()
    with connect(layout) as connection:
        total = connection.execute("SELECT count(*) FROM images").fetchone()[0]
        if total <= UPLOAD_CHECK_EXHAUSTIVE_LIMIT:
            items = connection.execute("SELECT md5, size_bytes FROM images").fetchall()
            method = "exhaustive"
        else:
            fraction = min(1.0, 2 * UPLOAD_CHECK_SAMPLE / total)
            items = connection.execute(
                f"SELECT md5, size_bytes FROM images USING SAMPLE {fraction * 100:.6f}% (bernoulli)"
            ).fetchall()
            items = random.sample(items, min(len(items), UPLOAD_CHECK_SAMPLE))
            method = "random sample"
    store = object_store.open_for(layout, record=False)
    problems = verify_objects(store, items, object_store.verify_sample)
    missing = [p.md5 for p in problems if p.kind == "missing"]
    damaged = [p for p in problems if p.kind != "missing"]
    return _result(
        not problems,
        f"{len(items) - len(problems):,} of {len(items):,} checked objects intact ({method})"
        + "".join(f"; {p}" for p in problems[:10]),
        images=total,
        checked=len(items),
        content_checked=min(len(items), object_store.verify_sample),
        missing=len(missing),
        damaged=len(damaged),
        method=method,
        missing_examples=", ".join(missing[:10]),
        damaged_examples=", ".join(str(p) for p in damaged[:10]),
    )


@dg.asset_check(asset="catalog", blocking=True, description="Every cube md5 is in the base.")
def cube_keys_in_base(library: LibraryResource) -> dg.AssetCheckResult:
    with connect(library.layout()) as connection:
        orphans, examples = connection.execute(
            """
            WITH orphans AS (
              SELECT DISTINCT md5 FROM attributes a
              WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.md5 = a.md5))
            SELECT count(*), (SELECT string_agg(md5, ', ') FROM (FROM orphans LIMIT 10))
            FROM orphans
            """
        ).fetchone()
    return _result(
        orphans == 0,
        "every cube md5 is in the base table" if not orphans else f"{orphans} orphan cube keys",
        orphan_keys=orphans,
        examples=examples or "",
    )
