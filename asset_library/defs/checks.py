"""Checks that guard the library, at the cost of a shard, not of the library.

In a shard's run (blocking there: judged before the next write, so a bad shard never reaches
the lake, or fails at its tables): ``hash_coverage`` and ``uploads_present`` from the shard's
keys file, and ``attribute_keys_in_occurrences`` from the rows the shard's commits wrote. They
read through the ``duckdb`` resource (dagster-duckdb; in memory). md5 uniqueness holds
by construction of ``images`` and is checked after each merge in the buckets it touched, from
the table's own md5 column (``images_md5_unique``): never from the merge's key cache, whose
word it checks. The library-wide versions run only in the explicit ``audit_library`` job,
with one more: every occurrence ``images`` has merged counted once (``occurrences_counted``).
"""

from __future__ import annotations

import random
from collections.abc import Collection
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pyarrow.compute as pc
from dagster_duckdb import DuckDBResource

from asset_library.lake import Catalog, Lake, read_changes
from asset_library.lake.recount import check_counts
from asset_library.lake.scan import lake_dataset
from asset_library.storage import ObjectStore, verify_objects

#: Up to this many images, every object is checked; above it, a uniform random sample.
UPLOAD_CHECK_EXHAUSTIVE_LIMIT = 100_000
UPLOAD_CHECK_SAMPLE = 10_000


def _result(
    check: str,
    asset: str,
    passed: bool,
    description: str,
    shard: str | None = None,
    **metadata: Any,
) -> dg.AssetCheckResult:
    """A blocking result; a shard's result names its shard first (description and metadata),
    since the UI records it without a partition."""
    if shard is not None:
        description = f"shard {shard}: {description}"
        metadata = {"shard": shard, **metadata}
    return dg.AssetCheckResult(
        check_name=check,
        asset_key=asset,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata=metadata,
    )


def _coverage(connection: duckdb.DuckDBPyConnection, source: str) -> tuple[int, int]:
    images, covered = connection.execute(
        f"""
        SELECT count(*), count(*) FILTER (WHERE
          length(phash) = 16 AND length(ahash) = 16 AND length(dhash) = 16)
        FROM {source}
        """
    ).fetchall()[0]
    return int(images), int(covered)


def hash_coverage(
    keys_path: Path, db: DuckDBResource, *, shard: str, asset: str = "shard_keys"
) -> dg.AssetCheckResult:
    """Every accepted image of the shard has its three hashes."""
    with db.get_connection() as connection:
        literal = str(keys_path).replace("'", "''")
        images, covered = _coverage(
            connection, f"(SELECT * FROM read_parquet('{literal}') WHERE status = 'ok')"
        )
    coverage = covered / images if images else 1.0
    return _result(
        "hash_coverage",
        asset,
        covered == images,
        f"{coverage:.4%} of the shard's images have pHash, aHash and dHash",
        shard,
        images=images,
        missing_hashes=images - covered,
        coverage=coverage,
    )


def _check_uploads(
    store: ObjectStore,
    rows: list[tuple[str, int]],
    total: int,
    method: str,
    asset: str,
    content_sample: int,
    suspects: Collection[str] = frozenset(),
    shard: str | None = None,
) -> dg.AssetCheckResult:
    """Each checked object's size must be the image's; the bytes of ``content_sample`` of them
    (and of any whose ETag disagrees, or that a reader found damaged: ``suspects``) are read
    and hashed, to catch same-size damage."""
    problems = verify_objects(store, rows, content_sample, suspects=suspects)
    missing = [p.md5 for p in problems if p.kind == "missing"]
    damaged = [p for p in problems if p.kind != "missing"]
    return _result(
        "uploads_present",
        asset,
        not problems,
        f"{len(rows) - len(problems):,} of {len(rows):,} checked objects intact ({method})"
        + "".join(f"; {p}" for p in problems[:10]),
        shard,
        images=total,
        checked=len(rows),
        content_checked=min(len(rows), content_sample),
        missing=len(missing),
        damaged=len(damaged),
        method=method,
        missing_examples=", ".join(missing[:10]),
        damaged_examples=", ".join(str(p) for p in damaged[:10]),
    )


def uploads_present(
    keys_path: Path,
    store: ObjectStore,
    db: DuckDBResource,
    *,
    shard: str,
    content_sample: int,
    asset: str = "shard_uploads",
    suspects: Collection[str] = frozenset(),
) -> dg.AssetCheckResult:
    """Every accepted image of the shard is in the store under its md5, with its size.
    Exhaustive up to 100k distinct images; above, a random sample of 10k HEADs. The bytes of
    every md5 in ``suspects`` that the shard holds are read whatever the sample."""
    with db.get_connection() as connection:
        rows = connection.execute(
            "SELECT DISTINCT md5, size_bytes FROM read_parquet(?) WHERE status = 'ok'",
            [str(keys_path)],
        ).fetchall()
    total = len(rows)
    method = "exhaustive"
    if total > UPLOAD_CHECK_EXHAUSTIVE_LIMIT:
        sampled = random.sample(rows, UPLOAD_CHECK_SAMPLE)
        rows = sampled + [r for r in rows if r[0] in suspects and r not in sampled]
        method = "random sample"
    return _check_uploads(store, rows, total, method, asset, content_sample, suspects, shard)


def attribute_keys_in_occurrences(
    lake: Lake,
    shard: str,
    occurrences_version: int,
    attributes_version: int,
    db: DuckDBResource,
) -> dg.AssetCheckResult:
    """The md5s of the attribute rows a shard's commit wrote are among the occurrence rows its
    commit wrote: read from the two commits' change feeds, so it costs the shard's rows."""
    occurrences = read_changes(
        lake, lake.table("occurrences"), occurrences_version, occurrences_version, ["md5", "shard"]
    )
    attributes = read_changes(
        lake, lake.table("attributes"), attributes_version, attributes_version, ["md5", "shard"]
    )
    with db.get_connection() as connection:
        connection.register("o", occurrences)
        connection.register("a", attributes)
        orphans, examples = connection.execute(
            """
            WITH orphans AS (
              SELECT DISTINCT md5 FROM a WHERE _change_type = 'insert' AND shard = $shard
                AND md5 NOT IN (SELECT md5 FROM o WHERE _change_type = 'insert'
                                AND shard = $shard))
            SELECT count(*), (SELECT string_agg(md5, ', ') FROM (FROM orphans LIMIT 10))
            FROM orphans
            """,
            {"shard": shard},
        ).fetchall()[0]
    return _result(
        "attribute_keys_in_occurrences",
        "attributes",
        orphans == 0,
        "every attribute md5 is among the shard's occurrences"
        if not orphans
        else f"{orphans} attribute keys without an occurrence",
        shard,
        orphan_keys=orphans,
        examples=examples or "",
    )


def images_md5_unique(lake: Lake, buckets: list[int]) -> dg.AssetCheckResult:
    """No md5 has two ``images`` rows in these buckets (those a merge touched), counted from
    the md5 column of their files as the table's latest commit lists them."""
    images = lake.table("images")
    md5s = lake_dataset(images, lake).scanner(
        columns=["md5"], filter=pc.field("bucket").isin(buckets or [-1])
    )
    with duckdb.connect() as connection:
        connection.register("md5s", md5s.to_reader())
        connection.execute(  # the reader is read once
            "CREATE TEMP TABLE copies AS SELECT md5, count(*) AS n FROM md5s GROUP BY md5"
        )
        rows, duplicated, examples = connection.execute(
            """
            SELECT coalesce(sum(n), 0), count(*) FILTER (WHERE n > 1),
                   (SELECT string_agg(md5, ', ') FROM (
                      SELECT md5 FROM copies WHERE n > 1 ORDER BY md5 LIMIT 10))
            FROM copies
            """
        ).fetchall()[0]
    return _result(
        "images_md5_unique",
        "images",
        duplicated == 0,
        f"{duplicated} md5s with more than one row among {rows:,} rows of the "
        f"{len(buckets)} merged buckets",
        duplicated_md5s=int(duplicated),
        buckets=len(buckets),
        rows=int(rows),
        examples=examples or "",
    )


# --------------------------------------------------------------------------------------------
# The full audit: library-wide, only when asked for (the audit_library job)


def audit(
    catalog: Catalog,
    store: ObjectStore,
    *,
    content_sample: int,
    suspects: Collection[str] = frozenset(),
) -> list[dg.AssetCheckResult]:
    """Library-wide versions of every check, on ``library_audit``; the objects of every md5
    in ``suspects`` (a reader found them damaged) are read whatever the sample."""
    results = []
    images, distinct, conflicting = catalog.execute(
        """
        SELECT (SELECT count(*) FROM images), (SELECT count(DISTINCT md5) FROM images),
               (SELECT count(*) FROM (SELECT md5 FROM occurrences GROUP BY md5
                  HAVING count(DISTINCT size_bytes) > 1 OR count(DISTINCT phash) > 1))
        """
    ).fetchall()[0]
    results.append(
        _result(
            "md5_unique",
            "library_audit",
            images == distinct and conflicting == 0,
            "md5 keys are unique" if images == distinct else "duplicated md5 rows in images",
            images=images,
            duplicated=images - distinct,
            conflicting_md5s=conflicting,
        )
    )
    total, covered = _coverage(catalog.connection, "images")
    results.append(
        _result(
            "hash_coverage",
            "library_audit",
            total == covered,
            f"{covered:,} of {total:,} images have pHash, aHash and dHash",
            images=total,
            missing_hashes=total - covered,
        )
    )
    if images <= UPLOAD_CHECK_EXHAUSTIVE_LIMIT:
        rows = catalog.execute("SELECT md5, size_bytes FROM images").fetchall()
        method = "exhaustive"
    else:
        fraction = min(100.0, 200.0 * UPLOAD_CHECK_SAMPLE / images)
        rows = catalog.execute(
            f"SELECT md5, size_bytes FROM images USING SAMPLE {fraction:.6f}% (bernoulli)"
        ).fetchall()[:UPLOAD_CHECK_SAMPLE]
        method = "random sample"
        rows += catalog.execute(
            "SELECT md5, size_bytes FROM images WHERE md5 IN (SELECT unnest(?))",
            [sorted(set(suspects) - {r[0] for r in rows})],
        ).fetchall()
    check = _check_uploads(store, rows, images, method, "library_audit", content_sample, suspects)
    results.append(check)
    orphans = catalog.execute(
        "SELECT count(DISTINCT md5) FROM attribute_occurrences a "
        "WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.bucket = a.bucket AND i.md5 = a.md5)"
    ).fetchall()[0][0]
    results.append(
        _result(
            "attribute_keys_in_images",
            "library_audit",
            orphans == 0,
            "every attribute md5 is an image" if not orphans else f"{orphans} orphan keys",
            orphan_keys=orphans,
        )
    )
    results.append(occurrences_counted(catalog.lake))
    return results


def occurrences_counted(lake: Lake) -> dg.AssetCheckResult:
    """``images`` counts each occurrence it has merged once: the sum of its counts equals the
    occurrences as of the version it merged, and so does each md5's (bucket by bucket)."""
    found = check_counts(lake)
    return _result(
        "occurrences_counted",
        "library_audit",
        found.passed,
        found.describe(),
        occurrences=found.occurrences,
        counted=found.counted,
        occurrences_version=found.version,
        wrong_md5s=found.wrong,
        missing_md5s=found.missing,
        orphaned_md5s=found.orphaned,
        unfinished_merge=found.unfinished,
        examples=", ".join(found.examples),
    )
