"""Asset checks that guard the library. They run with the catalog, over the whole lake.

All are blocking: a failure fails the catalog run and stops what is built from the catalog.
"""

import random
from concurrent.futures import ThreadPoolExecutor

import dagster as dg

from asset_library.catalog import connect
from asset_library.defs.resources import LibraryResource, ObjectStoreResource
from asset_library.storage import object_key

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


@dg.asset_check(asset="catalog", blocking=True, description="Every image's bytes are stored.")
def uploads_present(
    library: LibraryResource, object_store: ObjectStoreResource
) -> dg.AssetCheckResult:
    """Exhaustive up to 100k images; above, a random sample of 10k HEADs. At a billion images
    a full LIST is ~1M requests and hours; 10k HEADs take seconds and find a 0.05% loss rate
    with 99% probability. A full audit belongs to S3 Inventory, not to every refresh."""
    with connect(library.layout()) as connection:
        total = connection.execute("SELECT count(*) FROM images").fetchone()[0]
        if total <= UPLOAD_CHECK_EXHAUSTIVE_LIMIT:
            md5s = [row[0] for row in connection.execute("SELECT md5 FROM images").fetchall()]
            method = "exhaustive"
        else:
            fraction = min(1.0, 2 * UPLOAD_CHECK_SAMPLE / total)
            md5s = [
                row[0]
                for row in connection.execute(
                    f"SELECT md5 FROM images USING SAMPLE {fraction * 100:.6f}% (bernoulli)"
                ).fetchall()
            ]
            md5s = random.sample(md5s, min(len(md5s), UPLOAD_CHECK_SAMPLE))
            method = "random sample"
    store = object_store.open()
    with ThreadPoolExecutor(16) as pool:
        present = list(pool.map(lambda md5: store.exists(object_key(md5)), md5s))
    missing = [md5 for md5, ok in zip(md5s, present, strict=True) if not ok]
    return _result(
        not missing,
        f"{len(md5s) - len(missing):,} of {len(md5s):,} checked objects present ({method})",
        images=total,
        checked=len(md5s),
        missing=len(missing),
        method=method,
        missing_examples=", ".join(missing[:10]),
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
