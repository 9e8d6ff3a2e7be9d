"""How the lake behaves as the library grows: synthetic shards through the project's own writers.

    uv run python benchmarks/scale.py --shards 3 --shard-size 1000000 [--buckets 256]
    uv run python benchmarks/scale.py --shards 8 --shard-size 100000 --compaction both \
        --fan-in 2 --no-store

Each shard: random md5s (10% repeat an earlier shard's), hashes and three manifest attributes per
image, written as a keys file, then ``write_shard`` (occurrences, rejects, attributes commits),
``merge_images``, the similarity index sync and compaction; then reads through ``Library``.
After each shard one line of figures; at the end one JSON line with the first and last shard's,
and per compaction policy the compaction and read figures of each shard as ratios against shard
2's (the baseline of the same run).

``--compaction``: ``tiered`` (the library's, ``--fan-in`` and ``--tier-rows`` as given),
``whole`` (the policy before tiers: every file of a bucket in one tier, so a bucket of
``--fan-in`` files is rewritten whole), ``capped`` (tiered, each run reading at most
``--max-megabytes`` per table: a carry spread over the runs after it), ``both`` (two libraries
built alike, tiered and whole) or ``all`` (three, one per policy).
``--no-store``: no serving store, so lookups read the lake's files (what compaction shapes).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asset_library.defs.checks import attribute_keys_in_occurrences, hash_coverage  # noqa: E402
from asset_library.defs.resources import IN_MEMORY_DUCKDB  # noqa: E402
from asset_library.ids import bucket_of  # noqa: E402
from asset_library.lake import Lake, compact, lake_files, merge_images, write_shard  # noqa: E402
from asset_library.lake.tiers import FAN_IN, TIER_ROWS  # noqa: E402
from asset_library.layout import LibraryLayout  # noqa: E402
from asset_library.library import Library  # noqa: E402
from asset_library.serving import sync  # noqa: E402
from asset_library.similarity import SimilarityIndex  # noqa: E402
from asset_library_tests.support.synthetic import random_md5s, write_keys  # noqa: E402


def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered) * 1000, 2),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
    }


#: The compaction policies compared: ``whole`` puts every file in tier 0.
POLICIES = ("tiered", "whole", "capped")
#: Figures reported per shard as ratios against shard 2's.
RATIOS = (
    "compact_s",
    "compact_bytes_rewritten",
    "lake_lookup_ms",
    "lookup_warm_ms",
    "count_s",
    "attribute_query_s",
    "attribute_rows_s",
)


def _shard(
    layout: LibraryLayout,
    lake: Lake,
    root: Path,
    number: int,
    md5s: list[str],
    keys: int,
    policy: dict[str, int | None],
    store: bool = True,
) -> dict:
    batch = f"scale{number:03d}"
    shard = f"{batch}-s00000"
    keys_path = write_keys(
        layout.keys_path(shard),
        batch=batch,
        shard=shard,
        n_buckets=layout.n_buckets,
        md5s=md5s,
        seed=number,
        rejects=10,
    )
    written, write_s = _timed(lambda: write_shard(lake, shard, keys_path))
    merged, merge_s = _timed(lambda: merge_images(lake))
    synced, index_s = _timed(lambda: SimilarityIndex(layout).sync(lake))
    compacted, compact_s = _timed(
        lambda: compact(lake, **policy)  # type: ignore[arg-type]
    )
    stored, store_s = (
        _timed(lambda: sync(lake, layout.serving_store_path)) if store else (None, 0.0)
    )
    _, checks_s = _timed(
        lambda: (
            hash_coverage(keys_path, IN_MEMORY_DUCKDB, shard=shard),
            attribute_keys_in_occurrences(
                lake,
                shard,
                written["occurrences"]["version"],
                written["attributes"]["version"],
                IN_MEMORY_DUCKDB,
            ),
        )
    )
    sample = random.Random(number).sample(md5s, keys)
    cold_times = [_timed(lambda m=m: Library(root).lookup(m))[1] for m in sample[:20]]
    warm = Library(root)
    warm.lookup(sample[0])
    warm_times = [_timed(lambda m=m: warm.lookup(m))[1] for m in sample]
    similar_times = [_timed(lambda m=m: warm.similar(m, limit=20))[1] for m in sample[:50]]
    by_key = "SELECT * FROM occurrences WHERE bucket = ? AND md5 = ?"  # the lake's files
    lake_times = [
        _timed(lambda m=m: warm.query(by_key, [bucket_of(m, layout.n_buckets), m]))[1]
        for m in sample[:50]
    ]
    count, count_s = _timed(lambda: warm.query("SELECT count(*) AS n FROM images")[0]["n"])
    _, attr_s = _timed(
        lambda: warm.query(
            "SELECT count(*) AS n FROM images_with_attribute(?, ?)", ["label", "cat"]
        )
    )
    _, indexed_s = _timed(
        lambda: warm.query("SELECT count(*) AS n FROM md5s_with_attribute(?, ?)", ["label", "cat"])
    )
    _, rare_s = _timed(
        lambda: warm.query("SELECT * FROM images_with_attribute(?, ?)", ["score", "7"])
    )
    _, rows_s = _timed(  # 20% of the library's images, whole, into pandas
        lambda: warm.frame("SELECT * FROM images_with_attribute(?, ?)", ["label", "cat"])
    )
    _, joined_s = _timed(  # the same rows as the rare value's, the way before the index covered
        lambda: warm.query(  # the image: a join on the md5 of every image
            "SELECT * FROM images WHERE md5 IN (SELECT md5 FROM md5s_with_attribute(?, ?))",
            ["score", "7"],
        )
    )
    _, least_s = _timed(
        lambda: warm.query("SELECT count(*) AS n FROM images_at_least(?, ?)", [5000, 3500])
    )
    files = lake_files(lake)
    return {
        "shard": number + 1,
        "images": count,
        "write_s": round(write_s, 2),
        "merge_s": round(merge_s, 2),
        "index_s": round(index_s, 2),
        "compact_s": round(compact_s, 2),
        "compact_bytes_rewritten": sum(m["bytes_rewritten"] for m in compacted.values()),
        "compact_buckets_waiting": sum(m["buckets_waiting"] for m in compacted.values()),
        "compact_bytes_written": sum(m["bytes_written"] for m in compacted.values()),
        "compact_files_rewritten": sum(m["files_removed"] for m in compacted.values()),
        "max_files_in_a_bucket": max(m["max_files_in_a_bucket"] for m in compacted.values()),
        "occurrences_files_per_tier": compacted["occurrences"]["files_per_tier"],
        "store_sync_s": round(store_s, 2),
        "store_rebuilt": None if stored is None else stored.rebuilt,
        "store_run_rows": None if stored is None else stored.run_rows,
        "store_merged_rows": None if stored is None else stored.merged_rows,
        "store_runs": None if stored is None else stored.runs,
        "store_bytes": layout.serving_store_path.stat().st_size if stored else None,
        "checks_s": round(checks_s, 2),
        "lookup_cold_ms": _percentiles(cold_times),
        "lookup_warm_ms": _percentiles(warm_times),
        "similar_ms": _percentiles(similar_times),
        "lake_lookup_ms": _percentiles(lake_times),
        "count_s": round(count_s, 3),
        "attribute_query_s": round(attr_s, 3),
        "attribute_md5s_s": round(indexed_s, 3),
        "attribute_rare_rows_s": round(rare_s, 3),
        "attribute_rows_s": round(rows_s, 3),
        "attribute_rare_joined_s": round(joined_s, 3),
        "images_at_least_s": round(least_s, 3),
        "merged": {"inserted": merged.inserted, "updated": merged.updated},
        "index_images": synced.images,
        "lake_files": sum(f["files"] for f in files.values()),
        "lake_bytes": sum(f["bytes"] for f in files.values()),
        "rows": {name: f["rows"] for name, f in files.items()},
    }


def run(
    shards: int,
    shard_size: int,
    buckets: int,
    root: Path,
    keys: int = 100,
    policy: dict[str, int | None] | None = None,
    store: bool = True,
) -> list[dict]:
    """Each shard: 90% new md5s, 10% repeats of earlier shards' (the first shard: all new)."""
    policy = policy or _policy("tiered", FAN_IN, TIER_ROWS, None)
    layout = LibraryLayout.open(root, buckets)
    lake = Lake.of(layout, {})
    rng = np.random.default_rng(7)
    seen: list[str] = []
    figures = []
    for number in range(shards):
        fresh = random_md5s(rng, shard_size - shard_size // 10 if seen else shard_size)
        repeats = random.Random(number).sample(seen, shard_size // 10) if seen else []
        seen.extend(fresh[:200_000])
        figures.append(
            _shard(
                layout, lake, root, number, fresh + repeats, min(keys, shard_size), policy, store
            )
        )
        print(json.dumps(figures[-1]), flush=True)
    return figures


def _policy(
    name: str, fan_in: int, tier_rows: int, max_megabytes: int | None
) -> dict[str, int | None]:
    """``compact``'s keywords for a policy of :data:`POLICIES`."""
    return {
        "fan_in": fan_in,
        "tier_rows": 1 << 62 if name == "whole" else tier_rows,
        "max_bytes": max_megabytes * 1_000_000 if name == "capped" and max_megabytes else None,
    }


def _figure(found: dict, name: str) -> float:
    value = found[name]
    return float(value["p50"] if isinstance(value, dict) else value)


def ratios(figures: list[dict]) -> list[dict]:
    """Each shard's :data:`RATIOS` figures over shard 2's (``None`` where shard 2's is 0),
    with the bytes compaction rewrote in that shard and in all so far."""
    if len(figures) < 2:
        return []
    base = figures[1]
    rows = []
    total = 0
    for found in figures:
        total += found["compact_bytes_rewritten"]
        row: dict = {"shard": found["shard"], "images": found["images"]}
        row["compact_mb_rewritten"] = round(found["compact_bytes_rewritten"] / 1e6, 2)
        row["compact_mb_rewritten_so_far"] = round(total / 1e6, 2)
        row["max_files_in_a_bucket"] = found["max_files_in_a_bucket"]
        row["buckets_waiting"] = found["compact_buckets_waiting"]
        for name in RATIOS:
            baseline = _figure(base, name)
            row[name] = round(_figure(found, name) / baseline, 2) if baseline else None
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=100_000)
    parser.add_argument("--buckets", type=int, default=256)
    parser.add_argument("--keep", help="build the library here and keep it")
    parser.add_argument("--compaction", choices=[*POLICIES, "both", "all"], default="tiered")
    parser.add_argument("--max-megabytes", type=int, default=100, help="the capped policy's")
    parser.add_argument("--fan-in", type=int, default=FAN_IN)
    parser.add_argument("--tier-rows", type=int, default=TIER_ROWS)
    parser.add_argument("--no-store", action="store_true", help="lookups read the lake")
    args = parser.parse_args()
    names = {"both": POLICIES[:2], "all": POLICIES}.get(args.compaction, (args.compaction,))
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="scale-"))
    summary = {}
    try:
        for name in names:
            root = base / name if args.keep or len(names) > 1 else base / "library"
            print(f"# compaction: {name}", flush=True)
            figures = run(
                args.shards,
                args.shard_size,
                args.buckets,
                root,
                policy=_policy(name, args.fan_in, args.tier_rows, args.max_megabytes),
                store=not args.no_store,
            )
            store_sync = {f["shard"]: f["store_sync_s"] for f in figures}  # flat from shard 2 on
            print(
                json.dumps({"first": figures[0], "last": figures[-1], "store_sync_s": store_sync})
            )
            if len(figures) > 1 and figures[1]["store_sync_s"]:
                second = figures[1]["store_sync_s"]
                print(
                    "store sync per shard against shard 2's: "
                    + ", ".join(f"{f['shard']}: {f['store_sync_s'] / second:.2f}x" for f in figures)
                    + f"; mean of shards 2-{figures[-1]['shard']}: "
                    + f"{statistics.mean(f['store_sync_s'] for f in figures[1:]) / second:.2f}x"
                )
            summary[name] = ratios(figures)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    for name, rows in summary.items():
        print(f"# compaction {name}: per shard, ratios against shard 2")
        for row in rows:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
