"""Near-duplicate search benchmark: HammingIndex against brute-force numpy and DuckDB.

Run by hand, never in CI (minutes, GBs):

    uv run python benchmarks/search.py                       # 1M and 10M
    uv run python benchmarks/search.py --sizes 1000000 --layouts 3 4

For each size and each kind of hashes (uniform random, and pHash-like: first bit 1, exactly 32
ones) with neighbours planted at distances 0..12 around the queries, it prints:

* per band layout (the automatic one and forced ones): build time, bytes per image, query
  latency p50/p99 for d in {2, 4, 6, 8}, and the ratio of the p50 to brute force's p50;
* the same query against brute-force numpy (``np.bitwise_count(db ^ q) <= d``) and DuckDB
  (``bit_count(xor(h, $q)) <= $d`` over a UBIGINT column in an in-memory table loaded from Arrow),
  measured in the same run, since only ratios hold on a shared machine;
* the index saved, memory-mapped back (load time, and the share of it spent checking the
  arrays' CRC-32) and queried, and the same rows split into 10 segments;
* every index answer checked against brute force (exact recall, or the run fails);
* at the pairs size (1M): all pairs within r via ``pairs_within`` against a DuckDB band
  equi-join (r + 1 bands, so a pair within r shares at least one band exactly), same answer.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
import zlib
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asset_library.search import HammingIndex  # noqa: E402

DISTANCES = (2, 4, 6, 8)
PLANT_DISTANCES = range(0, 13)


# ----------------------------------------------------------------------------- data


def random_hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**64, n, dtype=np.uint64)


def phash_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform over 64-bit words with the top bit set and exactly 32 ones (ImageHash pHash's
    structure): 31 ones among the 63 other bits, by sequential hypergeometric sampling."""
    out = np.empty(n, dtype=np.uint64)
    chunk = 1 << 20
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        h = np.full(m, np.uint64(1) << np.uint64(63))
        need = np.full(m, 31, dtype=np.int64)
        for left, bit in zip(range(63, 0, -1), range(62, -1, -1), strict=True):
            take = rng.random(m) * left < need
            need -= take
            h |= take.astype(np.uint64) << np.uint64(bit)
        out[s : s + m] = h
    return out


def neighbour(rng: np.random.Generator, q: int, dist: int, structured: bool) -> int:
    """A hash ``dist`` bits from q; structured hashes swap ones and zeros to keep 32 ones."""
    if not structured:
        bits = rng.choice(64, dist, replace=False)
        return q ^ sum(1 << int(b) for b in bits)
    ones = [b for b in range(63) if q >> b & 1]
    zeros = [b for b in range(63) if not q >> b & 1]
    k = dist // 2
    flip = list(rng.choice(ones, k, replace=False)) + list(rng.choice(zeros, k, replace=False))
    return q ^ sum(1 << int(b) for b in flip)


def make_dataset(kind: str, n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes with neighbours planted at every distance 0..12 (even only for pHash-like)."""
    rng = np.random.default_rng(seed)
    structured = kind == "phash"
    db = phash_like(rng, n) if structured else random_hashes(rng, n)
    qs = phash_like(rng, n_queries) if structured else random_hashes(rng, n_queries)
    rows = rng.choice(n, n_queries * len(PLANT_DISTANCES) * 2, replace=False)
    k = 0
    for q in qs.tolist():
        for dist in PLANT_DISTANCES:
            for _ in range(2):
                db[rows[k]] = neighbour(rng, q, dist, structured)
                k += 1
    return db, qs


# ----------------------------------------------------------------------------- measuring


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(times: list[float]) -> tuple[float, float]:
    arr = np.array(times) * 1e3
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def brute_reference(db: np.ndarray, qs: np.ndarray, dmax: int) -> list[tuple[np.ndarray, ...]]:
    """Ids and distances within dmax of each query, by full scan (the recall oracle)."""
    out = []
    for q in qs:
        dist = np.bitwise_count(db ^ q)
        hit = np.flatnonzero(dist <= dmax)
        out.append((hit, dist[hit]))
    return out


def check(index: HammingIndex, qs: np.ndarray, ref: list, d: int, label: str) -> None:
    """Fail loudly unless every answer equals the brute-force set."""
    got = index.query_many(qs, d)
    for i, answer in enumerate(got):
        hit, dist = ref[i]
        keep = dist <= d
        expected = sorted(
            zip(hit[keep].tolist(), dist[keep].tolist(), strict=True), key=lambda t: (t[1], t[0])
        )
        if answer != expected:
            raise SystemExit(
                f"RECALL FAILURE: {label} d={d} query {i}: "
                f"{len(answer)} results, expected {len(expected)}"
            )


def time_index(index: HammingIndex, qs: np.ndarray) -> dict[int, tuple[float, float]]:
    out = {}
    for d in DISTANCES:
        for q in qs[:5].tolist():  # warm plans and caches
            index.query(q, d)
        times = []
        for q in qs.tolist():
            t = time.perf_counter()
            index.query(q, d)
            times.append(time.perf_counter() - t)
        out[d] = pct(times)
    return out


def time_brute(db: np.ndarray, qs: np.ndarray, n_q: int) -> dict[int, tuple[float, float]]:
    out = {}
    for d in DISTANCES:
        times = []
        for q in qs[:n_q]:
            t = time.perf_counter()
            dist = np.bitwise_count(db ^ q)
            hit = np.flatnonzero(dist <= d)
            _ = dist[hit]
            times.append(time.perf_counter() - t)
        out[d] = pct(times)
    return out


def crc_seconds(directory: Path) -> float:
    """What checking the saved arrays' CRC-32 costs a load (files in the page cache)."""
    t = time.perf_counter()
    for path in sorted(directory.rglob("*.npy")):
        zlib.crc32(np.ascontiguousarray(np.load(path, mmap_mode="r")).view(np.uint8))
    return time.perf_counter() - t


def duckdb_table(db: np.ndarray) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    arrow = pa.table({"id": np.arange(db.size, dtype=np.int64), "h": pa.array(db, pa.uint64())})
    con.register("arrow_hashes", arrow)
    con.execute("CREATE TABLE hashes AS SELECT * FROM arrow_hashes")
    con.unregister("arrow_hashes")
    return con


def time_duckdb(
    con: duckdb.DuckDBPyConnection, qs: np.ndarray, ref: list, n_q: int
) -> dict[int, tuple[float, float]]:
    sql = (
        "SELECT id, bit_count(xor(h, $q::UBIGINT)) AS d FROM hashes "
        "WHERE bit_count(xor(h, $q::UBIGINT)) <= $d"
    )
    out = {}
    for d in DISTANCES:
        times = []
        for i, q in enumerate(qs[:n_q].tolist()):
            t = time.perf_counter()
            rows = con.execute(sql, {"q": q, "d": d}).fetchnumpy()
            times.append(time.perf_counter() - t)
            hit, dist = ref[i]
            if set(rows["id"].tolist()) != set(hit[dist <= d].tolist()):
                raise SystemExit(f"DuckDB answer differs from brute force at d={d}")
        out[d] = pct(times)
    return out


# ----------------------------------------------------------------------------- printing


def header() -> None:
    cols = "".join(f" | d<={d} p50/p99 ms (x brute)" for d in DISTANCES)
    print(f"{'method':<30} | {'build s':>7} | {'B/img':>6}{cols}")
    print("-" * (50 + 31 * len(DISTANCES)))


def row(name: str, build: float | None, bpi: float | None, lat: dict, brute: dict) -> None:
    b = f"{build:7.2f}" if build is not None else " " * 7
    m = f"{bpi:6.1f}" if bpi is not None else " " * 6
    cells = "".join(
        f" | {lat[d][0]:8.3f} / {lat[d][1]:8.3f} ({lat[d][0] / brute[d][0]:6.3f})"
        for d in DISTANCES
    )
    print(f"{name:<30} | {b} | {m}{cells}", flush=True)


# ----------------------------------------------------------------------------- scenarios


def bench_size(kind: str, n: int, args: argparse.Namespace) -> None:
    print(
        f"\n=== {kind} hashes, N = {n:,}, {args.queries} queries "
        f"(brute/DuckDB: {args.scan_queries}) ===",
        flush=True,
    )
    t = time.perf_counter()
    db, qs = make_dataset(kind, n, args.queries, seed=n + (kind == "phash"))
    ids = np.arange(n, dtype=np.int64)
    print(f"data {time.perf_counter() - t:.1f} s, rss {rss_mb():.0f} MB", flush=True)
    ref = brute_reference(db, qs, max(DISTANCES))
    brute = time_brute(db, qs, args.scan_queries)
    header()
    row("brute force numpy", None, 8.0, brute, brute)
    if not args.skip_duckdb:
        t = time.perf_counter()
        con = duckdb_table(db)
        load = time.perf_counter() - t
        row(
            "DuckDB bit_count(xor) scan",
            load,
            None,
            time_duckdb(con, qs, ref, args.scan_queries),
            brute,
        )
        con.close()
        del con
        gc.collect()

    layouts: list[int | None] = [None, *args.layouts]
    for bands in layouts:
        t = time.perf_counter()
        index = HammingIndex(ids, db, bands=bands)
        build = time.perf_counter() - t
        info = index.describe(8)["main"]
        for d in DISTANCES:
            check(index, qs, ref, d, f"bands={bands}")
        label = f"{'auto' if bands is None else 'forced'} {len(info['widths'])}x" + "/".join(
            map(str, info["widths"])
        )
        row(label, build, index.nbytes() / n, time_index(index, qs), brute)
        if bands is None:
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                t = time.perf_counter()
                index.save(tmp)
                save = time.perf_counter() - t
                del index
                gc.collect()
                t = time.perf_counter()
                loaded = HammingIndex.load(tmp)
                load = time.perf_counter() - t
                crc = crc_seconds(Path(tmp))
                for d in DISTANCES:
                    check(loaded, qs, ref, d, "loaded")
                row(
                    f"  loaded, mmap (save {save:.1f} s, load {load:.3f} s of which CRC-32 "
                    f"{crc:.3f} s)",
                    None,
                    loaded.nbytes() / n,
                    time_index(loaded, qs),
                    brute,
                )
                del loaded
                gc.collect()
        else:
            del index
            gc.collect()
    print(f"peak rss so far {peak_rss_mb():.0f} MB", flush=True)

    if args.segments > 1:
        t = time.perf_counter()
        seg_index = HammingIndex()
        for k, part in enumerate(np.array_split(np.arange(n), args.segments)):
            seg_index.add_segment(f"shard-{k}", ids[part], db[part])
        build = time.perf_counter() - t
        for d in DISTANCES:
            check(seg_index, qs, ref, d, "segments")
        widths = next(iter(seg_index.describe().values()))["widths"]
        layout = f"{len(widths)}x{widths[0]}b" if widths else "scans"  # small segments scan
        row(
            f"{args.segments} segments of {layout}",
            build,
            seg_index.nbytes() / n,
            time_index(seg_index, qs),
            brute,
        )
        del seg_index
        gc.collect()
    del db, ref
    gc.collect()


def duckdb_band_join(db: np.ndarray, r: int) -> tuple[np.ndarray, float]:
    """All pairs within r by a band equi-join: r + 1 bands, a pair within r matches one band."""
    n_bands = r + 1
    widths = [64 // n_bands + (1 if b < 64 % n_bands else 0) for b in range(n_bands)]
    cols = {"id": np.arange(db.size, dtype=np.int64), "h": pa.array(db, pa.uint64())}
    shift = 64
    for b, w in enumerate(widths):
        shift -= w
        cols[f"b{b}"] = ((db >> np.uint64(shift)) & np.uint64((1 << w) - 1)).astype(np.int32)
    con = duckdb.connect()
    con.register("arrow_bands", pa.table(cols))
    con.execute("CREATE TABLE bands AS SELECT * FROM arrow_bands")
    con.unregister("arrow_bands")
    union = " UNION ".join(
        f"SELECT x.id AS a, y.id AS b, bit_count(xor(x.h, y.h)) AS d FROM bands x "
        f"JOIN bands y ON x.b{b} = y.b{b} AND x.id < y.id WHERE bit_count(xor(x.h, y.h)) <= {r}"
        for b in range(n_bands)
    )
    t = time.perf_counter()
    out = con.execute(f"SELECT a, b, d FROM ({union}) ORDER BY a, b").fetchnumpy()
    elapsed = time.perf_counter() - t
    con.close()
    return np.stack([out["a"], out["b"], out["d"]], axis=1).astype(np.int64), elapsed


def bench_pairs(kind: str, n: int, args: argparse.Namespace) -> None:
    print(f"\n=== all pairs within r, {kind} hashes, N = {n:,} ===", flush=True)
    db, _ = make_dataset(kind, n, max(1, n // 2000), seed=n + 7 + (kind == "phash"))
    ids = np.arange(n, dtype=np.int64)
    index = HammingIndex(ids, db)
    print(f"{'r':>3} | {'pairs':>8} | {'pairs_within s':>14} | {'DuckDB band join s':>18} | ratio")
    for r in args.pair_radii:
        t = time.perf_counter()
        pairs = index.pairs_within(r)
        ours = time.perf_counter() - t
        line = f"{r:>3} | {len(pairs):>8} | {ours:>14.2f}"
        if not args.skip_duckdb and r <= args.duckdb_max_pair_radius:
            theirs, elapsed = duckdb_band_join(db, r)
            if not np.array_equal(pairs, theirs):
                raise SystemExit(f"pairs_within({r}) differs from the DuckDB band join")
            line += f" | {elapsed:>18.2f} | {ours / elapsed:.2f}"
        print(line, flush=True)
    t = time.perf_counter()
    seg_index = HammingIndex()
    for k, part in enumerate(np.array_split(np.arange(n), 10)):
        seg_index.add_segment(f"shard-{k}", ids[part], db[part])
    r = args.pair_radii[0]
    t = time.perf_counter()
    seg_pairs = seg_index.pairs_within(r)
    print(
        f"10 segments, r={r}: {time.perf_counter() - t:.2f} s "
        f"({'same pairs' if np.array_equal(seg_pairs, index.pairs_within(r)) else 'DIFFERENT'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument(
        "--kinds", nargs="+", default=["random", "phash"], choices=["random", "phash"]
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--scan-queries",
        type=int,
        default=20,
        help="queries timed for brute force and DuckDB (they are slow)",
    )
    parser.add_argument(
        "--layouts",
        type=int,
        nargs="*",
        default=[3, 4, 5],
        help="band counts to force besides the automatic choice",
    )
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--pairs-size", type=int, default=1_000_000)
    parser.add_argument("--pair-radii", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument(
        "--duckdb-max-pair-radius",
        type=int,
        default=4,
        help="the band join needs r + 1 bands: r = 6 takes minutes at 1M",
    )
    parser.add_argument("--skip-duckdb", action="store_true")
    parser.add_argument("--tmp", default=None, help="directory for the save/load round trip")
    args = parser.parse_args()
    print(
        f"numpy {np.__version__}, duckdb {duckdb.__version__}, {os.cpu_count()} cores; "
        "numpy single-threaded, DuckDB on all cores",
        flush=True,
    )
    t0 = time.perf_counter()
    for n in args.sizes:
        for kind in args.kinds:
            bench_size(kind, n, args)
    if args.pairs_size:
        for kind in args.kinds:
            bench_pairs(kind, args.pairs_size, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, peak rss {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
