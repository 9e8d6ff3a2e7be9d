"""End-to-end shard ingestion: speed against fingerprinting alone, and memory as a shard grows.

Run by hand from the project root (never in CI; 2-6 minutes, ``--quick`` 1-2, depending on load)::

    uv run python benchmarks/ingest.py [--quick] [--corpus ../shared/corpus]

The images: every JPEG, PNG and WebP of the corpus MANIFEST whose shorter side is at least
``MIN_SIDE`` pixels and that ``fingerprint()`` accepts. Shard images must be distinct, so each is
a corpus image with a few unique bytes appended after the image data (after the JPEG EOI marker,
the PNG IEND chunk, the WebP RIFF chunk: decoders ignore them). One such variant of every base
image is fingerprinted first and the base is dropped unless it is still ``ok`` with the same
pHash. The variants are written to a temporary folder (so reads come from the page cache), base
images shuffled with a fixed seed, the first N kept (all of them when N is larger) and cycled; a
shard of ``n`` images is the first ``n`` files, so N and 10 N images hold the same base images.

What it measures, all in ONE run, on the SAME ``--images`` (N) files, with ONE
``FingerprintPool(workers=2)`` started and warmed up before any clock starts:

1. ``fingerprint only``: ``list(pool.map(paths))`` -- the workers read the files themselves; this
   is the ceiling the shard runs are compared with. For diagnosis only, ``fingerprint, bytes 1 by
   1`` submits preloaded bytes one item per chunk, 32 in flight, as ``ingest_shard`` does.
2. ``ingest_shard`` end to end (thread reads, fingerprints, store writes, keys Parquet file),
   ``io_threads=16``, into a ``LocalObjectStore`` in a fresh temporary folder, and into SeaweedFS
   (``weed mini`` on loopback, auth on) through ``S3ObjectStore`` with
   ``seaweed.client(max_pool_connections=32)``, a fresh key prefix every round, so every image is
   really uploaded. Each is printed as a share of the fingerprint-only rate.
   The steps run in rounds, in a rotating order, at least 4 rounds (quick: 2) and then more
   while the timed runs have taken less than 180 s (quick: 40 s), at most 12 (6). Other jobs on
   the shared machine come and go, so ``share`` (what the target uses) is the median over
   rounds of the step's rate over the faster fingerprint-only rate of the SAME round (runs
   seconds apart); ``bests`` = the step's best rate / the best fingerprint-only rate, as a
   check. ``best/s`` and ``median`` are the step's rates over the rounds. CPU columns: median
   ms of CPU per image used by the worker processes, the main process (reader/uploader threads,
   pickling, hashing, Parquet) and the S3 server process. ``cpu share`` is fingerprint-only CPU
   per image over the step's total CPU per image: the share to expect when everything is
   CPU-bound on an otherwise idle machine, which stays meaningful when other jobs share the
   cores and the wall-clock ``share`` gets noisy.
3. Peak RSS of the process tree (main process + pool workers) for a local-store shard of N and
   of 10 N images, each size in a fresh subprocess so peaks do not carry over. The child reads
   each process's exact peak (``VmHWM``) just before its pool shuts down. A worker's peak is set
   by the most demanding image it happened to decode, so the plain sum of peaks grows with the
   shard only because, in a longer shard, every worker eventually meets that image. The target
   therefore uses ``tree bound`` = main peak + workers x the largest worker peak: the tree's
   peak once that has happened, for the same base images at both sizes. ``simultaneous`` is the
   largest sum of ``/proc/<pid>/statm`` RSS over the child's whole tree (multiprocessing's
   helper process included), sampled by the parent every 10 ms: the peak actually reached, lower
   and noisier because it depends on which images the workers decode at the same moment.

Targets: ingest on the local store >= 70% of the fingerprint-only rate; peak RSS of the tree at
10 N within 20% of that at N. Absolute rates drift by tens of per cent on a shared machine;
ratios within one run are what hold.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Only what the pool's worker processes need anyway is imported at module level: the workers
# are spawned and re-import this file as their main module, so heavier imports (pyarrow, boto3)
# are done inside the functions that use them, keeping worker memory as in production.
from asset_library.ingest.fingerprint import Fingerprint
from asset_library.ingest.pool import FingerprintPool

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus"

FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
MIN_SIDE = 128
WORKERS = 2
IO_THREADS = 16
SCALE = 10
TARGET_LOCAL_SHARE = 0.70
TARGET_RSS_GROWTH = 1.20
SAMPLE_EVERY_S = 0.010
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


# --- test images --------------------------------------------------------------------------------


def suffix(index: int) -> bytes:
    """The unique trailing bytes of variant ``index``."""
    return b"\x00ALBENCH" + index.to_bytes(4, "big")


@dataclass(frozen=True)
class Base:
    path: Path
    ext: str
    data: bytes


def load_bases(corpus: Path, pool: FingerprintPool) -> tuple[list[Base], int]:
    """Decodable JPEG/PNG/WebP corpus images whose variants still fingerprint the same."""
    candidates: list[Base] = []
    with (corpus / "MANIFEST.tsv").open(newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            ext = FORMATS.get(row["format"])
            if ext is None or min(int(row["width"] or 0), int(row["height"] or 0)) < MIN_SIDE:
                continue
            path = corpus / row["path"]
            candidates.append(Base(path, ext, path.read_bytes()))
    originals = list(pool.map([base.data for base in candidates]))
    variants = list(pool.map([base.data + suffix(0) for base in candidates]))
    kept = [
        base
        for base, original, variant in zip(candidates, originals, variants, strict=True)
        if original.ok and variant.ok and variant.phash == original.phash
    ]
    random.Random(0).shuffle(kept)
    return kept, len(candidates) - len(kept)


def write_variants(bases: Sequence[Base], count: int, folder: Path) -> list[Path]:
    """``count`` distinct images (base ``i % len(bases)`` plus ``suffix(i)``) as files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        base = bases[index % len(bases)]
        path = folder / f"{index:06d}{base.ext}"
        path.write_bytes(base.data + suffix(index))
        paths.append(path)
    return paths


# --- /proc helpers ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def hwm_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (a scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def worker_pids(pool: FingerprintPool) -> list[int]:
    executor = getattr(pool, "_executor", None)
    return list(getattr(executor, "_processes", None) or {})


# --- speed --------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    rates: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    worker_cpu: list[float] = field(default_factory=list)  # ms per image
    main_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)


@dataclass
class Timed:
    seconds: float
    worker_cpu: float
    main_cpu: float
    server_cpu: float


def timed(run: Callable[[], None], pool: FingerprintPool, server_pid: int | None = None) -> Timed:
    workers = worker_pids(pool)
    before_w = sum(cpu_seconds(pid) for pid in workers)
    before_s = cpu_seconds(server_pid) if server_pid else 0.0
    before_m = time.process_time()
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    return Timed(
        seconds,
        sum(cpu_seconds(pid) for pid in workers) - before_w,
        time.process_time() - before_m,
        (cpu_seconds(server_pid) - before_s) if server_pid else 0.0,
    )


def fingerprint_paths(pool: FingerprintPool, paths: Sequence[Path]) -> None:
    results = list(pool.map([str(path) for path in paths]))
    check_all_ok(results, "fingerprint only")


def fingerprint_bytes_one_by_one(pool: FingerprintPool, blobs: Sequence[bytes]) -> None:
    window = 2 * IO_THREADS
    pending: deque[Future[list[Fingerprint]]] = deque()
    results: list[Fingerprint] = []
    for data in blobs:
        pending.append(pool.submit_chunk([data]))
        while len(pending) >= window:
            results.extend(pending.popleft().result())
    while pending:
        results.extend(pending.popleft().result())
    check_all_ok(results, "fingerprint bytes")


def check_all_ok(results: Sequence[Fingerprint], what: str) -> None:
    bad = [fp for fp in results if not fp.ok]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} images rejected, e.g. {bad[0]}")


def run_shard(paths: Sequence[Path], store: Any, pool: FingerprintPool, keys: Path) -> Any:
    from asset_library.ingest.access import ReadPolicy, resolved
    from asset_library.ingest.shard import ingest_shard
    from asset_library.ingest.sources import SourceItem, read_uri

    files = [resolved(path) for path in paths]
    policy = ReadPolicy((os.path.commonpath(files),))  # the benchmark's own folder
    items = ((ordinal, SourceItem(path)) for ordinal, path in enumerate(files))
    stats = ingest_shard(
        items,
        keys_path=keys,
        store=store,
        read=functools.partial(read_uri, policy=policy),
        pool=pool,
        batch="bench",
        shard="bench-s00000",
        n_buckets=64,
        io_threads=IO_THREADS,
    )
    if stats.ok != len(paths) or stats.uploaded != len(paths):
        raise RuntimeError(
            f"ingest_shard: {len(paths)} images but ok={stats.ok} uploaded={stats.uploaded} "
            f"rejects={dict(stats.rejects_by_reason)}"
        )
    return stats


@dataclass(frozen=True)
class Rounds:
    least: int
    most: int
    budget_s: float  # no new round starts once the timed runs have taken this long


def measure_speed(
    paths: Sequence[Path], pool: FingerprintPool, rounds: Rounds, work: Path
) -> list[Step]:
    from asset_library.storage import LocalObjectStore, S3ObjectStore
    from asset_library_tests.support.seaweedfs import SeaweedS3

    blobs = [path.read_bytes() for path in paths]
    seaweed = SeaweedS3(work / "seaweed")
    seaweed.start()
    try:
        client = seaweed.client(max_pool_connections=32)
        bucket = seaweed.make_bucket("bench")
        assert seaweed.process is not None
        server_pid = seaweed.process.pid
        counter = iter(range(1_000_000))
        garbage: list[Path] = []  # stores of finished runs, removed outside the clock

        def local(subset: Sequence[Path]) -> None:
            number = next(counter)
            garbage.append(work / f"local-{number}")
            run_shard(subset, LocalObjectStore(garbage[-1]), pool, work / f"k{number}.parquet")

        def s3(subset: Sequence[Path]) -> None:
            number = next(counter)
            store = S3ObjectStore(client, bucket, prefix=f"run{number}")
            run_shard(subset, store, pool, work / f"k{number}.parquet")

        steps = {
            "fp": Step("fingerprint only (paths)"),
            "fpb": Step("fingerprint, bytes 1 by 1"),
            "local": Step("ingest_shard, local store"),
            "s3": Step("ingest_shard, SeaweedFS S3"),
        }
        runs: dict[str, Callable[[], None]] = {
            "fp": lambda: fingerprint_paths(pool, paths),
            "fpb": lambda: fingerprint_bytes_one_by_one(pool, blobs),
            "local": lambda: local(paths),
            "s3": lambda: s3(paths),
        }
        # Warm-up, untimed: worker imports, page cache, S3 connections and the bucket.
        warm = paths[: min(len(paths), 48)]
        fingerprint_paths(pool, warm)
        local(warm)
        s3(warm)
        while garbage:
            shutil.rmtree(garbage.pop())

        order = list(runs)
        spent = 0.0
        for number in range(rounds.most):
            if number >= rounds.least and spent >= rounds.budget_s:
                break
            rotated = order[number % len(order) :] + order[: number % len(order)]
            seconds: dict[str, float] = {}
            for key in rotated:
                result = timed(runs[key], pool, server_pid if key == "s3" else None)
                while garbage:
                    shutil.rmtree(garbage.pop())
                step = steps[key]
                seconds[key] = result.seconds
                spent += result.seconds
                step.rates.append(len(paths) / result.seconds)
                step.worker_cpu.append(1000 * result.worker_cpu / len(paths))
                step.main_cpu.append(1000 * result.main_cpu / len(paths))
                step.server_cpu.append(1000 * result.server_cpu / len(paths))
            reference = min(seconds["fp"], seconds["fpb"])  # the faster fingerprint-only way
            for key, step in steps.items():
                step.shares.append(reference / seconds[key])
            print(
                f"  round {number + 1}: "
                + "  ".join(f"{key} {len(paths) / seconds[key]:.1f}/s" for key in order),
                flush=True,
            )
        return list(steps.values())
    finally:
        seaweed.close()


# --- memory -------------------------------------------------------------------------------------


@dataclass
class Peak:
    images: int
    tree_peak: int  # sampled: the largest simultaneous sum over the tree
    main_hwm: int
    workers_hwm: list[int]
    seconds: float
    processes: int

    @property
    def worker_hwm(self) -> int:
        return max(self.workers_hwm)

    @property
    def bound(self) -> int:
        """The tree's peak once every worker has met the shard's most demanding image."""
        return self.main_hwm + len(self.workers_hwm) * self.worker_hwm


def rss_child(files: Path, count: int) -> None:
    """In a fresh process: one local-store shard of the first ``count`` files; print peaks."""
    from asset_library.storage import LocalObjectStore

    paths = sorted(files.iterdir())[:count]
    if len(paths) != count:
        raise SystemExit(f"only {len(paths)} files in {files}, wanted {count}")
    with tempfile.TemporaryDirectory(prefix="ingest-rss-", dir=files.parent) as tmp:
        with FingerprintPool(WORKERS) as pool:
            list(pool.map(paths[:4], chunksize=1))  # spawn the workers before the clock starts
            started = time.perf_counter()
            run_shard(paths, LocalObjectStore(Path(tmp) / "store"), pool, Path(tmp) / "k.parquet")
            seconds = time.perf_counter() - started
            workers = [hwm_bytes(pid) for pid in worker_pids(pool)]
        print(
            json.dumps(
                {"seconds": seconds, "main_hwm": hwm_bytes(os.getpid()), "workers_hwm": workers}
            )
        )


def measure_peak(files: Path, count: int) -> Peak:
    """Run ``rss_child`` in a new interpreter and sample its process tree's RSS meanwhile."""
    command = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(files)]
    child = subprocess.Popen([*command, "--images", str(count)], stdout=subprocess.PIPE, text=True)
    peak, seen = 0, {child.pid}
    tree = [child.pid]
    last_scan = 0.0
    while child.poll() is None:
        now = time.monotonic()
        if now - last_scan > 0.25:
            tree, last_scan = process_tree(child.pid), now
            seen.update(tree)
        peak = max(peak, sum(rss_bytes(pid) for pid in tree))
        time.sleep(SAMPLE_EVERY_S)
    out, _ = child.communicate()
    if child.returncode:
        raise RuntimeError(f"RSS child for {count} images failed with {child.returncode}")
    report = json.loads(out.strip().splitlines()[-1])
    return Peak(
        count, peak, report["main_hwm"], report["workers_hwm"], report["seconds"], len(seen)
    )


# --- report -------------------------------------------------------------------------------------


def spread(values: Sequence[float], fmt: str) -> str:
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


def print_report(steps: Sequence[Step], peaks: Sequence[Peak], header: str, elapsed: float) -> None:
    def med(values: Sequence[float]) -> float:
        return statistics.median(values)

    def cpu(step: Step) -> float:
        return med(step.worker_cpu) + med(step.main_cpu) + med(step.server_cpu)

    reference_cpu = cpu(steps[0])
    reference_rate = max(max(step.rates) for step in steps if step.name.startswith("fingerprint"))
    print()
    print(header)
    print(
        f"{'step':<28}{'best/s':>7}{'median':>7}{'share':>7}{'bests':>7}{'cpu share':>10}"
        f"  {'cpu ms/img: workers':>19}{'main':>6}{'server':>7}"
    )
    for step in steps:
        server = f"{med(step.server_cpu):7.1f}" if any(step.server_cpu) else ""
        print(
            f"{step.name:<28}{max(step.rates):7.1f}{med(step.rates):7.1f}"
            f"{med(step.shares):7.0%}{max(step.rates) / reference_rate:7.0%}"
            f"{reference_cpu / cpu(step):10.0%}"
            f"  {med(step.worker_cpu):19.1f}{med(step.main_cpu):6.1f}{server}"
        )
    print()
    print("peak RSS (MiB), local-store shard, fresh subprocess per size")
    print(
        f"{'images':>8}{'tree bound':>12}{'main':>8}{'max worker':>12}{'workers':>15}"
        f"{'simultaneous':>14}{'img/s':>7}{'procs':>7}"
    )
    for peak in peaks:
        each = "+".join(f"{hwm / MIB:.0f}" for hwm in peak.workers_hwm)
        print(
            f"{peak.images:8d}{peak.bound / MIB:12.1f}{peak.main_hwm / MIB:8.1f}"
            f"{peak.worker_hwm / MIB:12.1f}{each:>15}{peak.tree_peak / MIB:14.1f}"
            f"{peak.images / peak.seconds:7.1f}{peak.processes:7d}"
        )
    small, large = peaks[0], peaks[-1]
    growth = large.bound / small.bound
    print(
        f"{'ratio':>8}{growth:12.2f}{large.main_hwm / small.main_hwm:8.2f}"
        f"{large.worker_hwm / small.worker_hwm:12.2f}{'':>15}"
        f"{large.tree_peak / small.tree_peak:14.2f}"
    )
    local = next(step for step in steps if "local" in step.name)
    s3 = next(step for step in steps if "S3" in step.name)
    share = med(local.shares)
    print()
    print("targets")
    print(
        f"  local-store ingest >= {TARGET_LOCAL_SHARE:.0%} of fingerprint-only rate: "
        f"{share:.0%}  {'PASS' if share >= TARGET_LOCAL_SHARE else 'MISS'}"
    )
    print(
        f"  peak RSS of the tree (bound) at {large.images} images within "
        f"{TARGET_RSS_GROWTH - 1:.0%} of {small.images}: x{growth:.2f}  "
        f"{'PASS' if growth <= TARGET_RSS_GROWTH else 'MISS'}"
    )
    print(
        f"  (info) SeaweedFS ingest share: {med(s3.shares):.0%} "
        f"(of bests {max(s3.rates) / reference_rate:.0%}, cpu share {reference_cpu / cpu(s3):.0%})"
    )
    print(
        f"  (info) main process peak x{large.main_hwm / small.main_hwm:.2f}, sampled "
        f"simultaneous tree peak x{large.tree_peak / small.tree_peak:.2f}"
    )
    print(f"total {elapsed:.0f} s; load average at end {os.getloadavg()[0]:.1f} (1 min)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shard, fewer rounds")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--images", type=int, help="N (default 350, quick 120)")
    parser.add_argument(
        "--rounds", type=int, help="exactly this many speed rounds (default: as many as fit)"
    )
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child is not None:
        rss_child(args.rss_child, args.images)
        return
    images = args.images or (120 if args.quick else 350)
    if args.rounds:
        rounds = Rounds(args.rounds, args.rounds, 0.0)
    else:
        rounds = Rounds(2, 6, 40.0) if args.quick else Rounds(4, 12, 180.0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        work = Path(tmp)
        with FingerprintPool(WORKERS) as pool:
            bases, dropped = load_bases(args.corpus, pool)
            # Both shard sizes cycle over the same base images, so their largest images (which
            # set the workers' peak memory) are the same: only the number of images differs.
            bases = bases[:images]
            paths = write_variants(bases, images * SCALE, work / "images")
            shard = paths[:images]
            megabytes = sum(path.stat().st_size for path in shard) / 1e6
            header = (
                f"ingest benchmark: N={images} images ({megabytes:.0f} MB; {len(bases)} corpus "
                f"JPEG/PNG/WebP >= {MIN_SIDE} px ({dropped} dropped) + unique trailing bytes), "
                f"{WORKERS} workers, io_threads {IO_THREADS}; "
                f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
            )
            print(header, flush=True)
            steps = measure_speed(shard, pool, rounds, work)
            header += (
                f"; {len(steps[0].rates)} rounds; share = median over rounds of rate / that "
                "round's faster fingerprint-only rate; bests = best rate / best fingerprint-only "
                "rate; cpu share = fingerprint-only cpu per image / the step's"
            )
        peaks = []
        for count in (images, images * SCALE):
            peaks.append(measure_peak(work / "images", count))
            print(f"  peak RSS at {count}: {peaks[-1].tree_peak / MIB:.0f} MiB", flush=True)
    print_report(steps, peaks, header, time.perf_counter() - started)


if __name__ == "__main__":
    main()
