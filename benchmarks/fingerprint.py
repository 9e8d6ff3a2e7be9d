"""Fingerprinting speed: ours against ImageHash and the seed article's OpenCV reference.

Run by hand from the project root (never in CI; about 3-4 minutes on 2 cores)::

    uv run python benchmarks/fingerprint.py [--corpus ../shared/corpus] [--rounds 3] [--no-pool]

Per core, on the SAME files in the SAME run, every file's bytes preloaded into memory (disk is
out of it), everything in this one process and thread (OpenCV set to one thread):

* ``ours fast`` -- ``asset_library.ingest.fingerprint.fingerprint(data)`` (the default, fast mode);
  ``ours exact`` -- the same with ``mode="exact"`` (for information).
* ``ImageHash`` -- ``hashlib.md5(data)``, ``Image.open(BytesIO(data))``, ``.size``, then
  ``imagehash.phash``, ``average_hash`` and ``dhash`` on that image, each kept as its hex string.
* ``seed OpenCV`` -- the seed article's reference: md5, a full ``cv2.imdecode(...,
  IMREAD_GRAYSCALE)``, pHash = ``cv2.dct`` (float32) of a 32x32 ``INTER_AREA`` resize, top-left
  8x8 against its median; aHash = 8x8 resize against its mean; dHash = 9x8 resize, adjacent pixels.

Only files that every method accepts are timed (Pillow-undecodable, > 179 MP, or anything OpenCV
or our code rejects is left out of every method alike). Two sets: the whole decodable corpus, and
JPEG photos of >= 8 megapixels. Each measurement is repeated ``--rounds`` times, methods
interleaved, and the best is kept. Rates are images per CPU second of this process
(``time.process_time``: all its threads), i.e. per core, which other load on a shared machine
disturbs far less than wall time; best wall time and the median CPU time are shown beside it to
judge the noise. The ratio column is ``ours fast`` img/s divided by that row's img/s.

Then ``FingerprintPool(1)`` against ``FingerprintPool(2)`` (spawned worker processes, file paths
as items: each worker reads its files, from the page cache). The corpus is repeated so that one
process needs ~``--pool-seconds``; each pool is warmed up (interpreters started, modules
imported) before the clock starts; pools run 1, 2, 2, 1, ... and the best wall time of each is
kept. This one is wall time by nature, so it needs a quiet machine: the workers' scheduler
statistics (Linux /proc/<pid>/schedstat) split their time into running, waiting for a CPU held
by other load, and idle (starved by the pool), which tells a slow pool from a busy machine.

The premature-end check of JPEG decodes: the decode ``fingerprint`` makes of each JPEG (a strict
libjpeg-turbo decode through simplejpeg, which stops on "premature end of data" warnings) against
the Pillow ``draft("L")`` decode it replaced (which drops them), on the corpus's JPEGs and on the
>= 8 MP photos, both after the same lazy ``Image.open``; printed as a ratio in the same run.

Absolute rates on a shared machine drift by tens of per cent between runs; the ratios measured
within one run are what hold. Targets (fast mode, per core): >= 3x ImageHash over the corpus,
>= 5x ImageHash on >= 8 MP photos; >= 1.8x going from one worker process to two.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import hashlib
import io
import itertools
import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import imagehash
import numpy as np
from PIL import Image

from asset_library.ingest import fingerprint as fingerprint_module
from asset_library.ingest.fingerprint import fingerprint, hamming
from asset_library.ingest.pool import FingerprintPool

ROOT = Path(__file__).resolve().parents[1]
CODE = ("asset_library/ingest/fingerprint.py", "asset_library/ingest/pool.py")
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus"

TARGET_CORPUS = 3.0
TARGET_PHOTOS = 5.0
TARGET_POOL = 1.8
PHOTO_MIN_PIXELS = 8_000_000
#: Pillow's decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS by default): larger
#: headers are left out of every method. Taken from the manifest, because importing
#: asset_library.ingest.fingerprint may lift Pillow's own limit in this process.
MAX_PIXELS = 2 * 89_478_485
HASHES = ("phash", "ahash", "dhash")
#: Pool figures are flagged when the workers spent more than this share of their time waiting
#: for CPUs held by other load.
BUSY_ABOVE = 0.10

Method = Callable[[bytes], Any]


# --- the methods -------------------------------------------------------------------------------


def ours_fast(data: bytes) -> Any:
    return fingerprint(data, mode="fast")


def ours_exact(data: bytes) -> Any:
    return fingerprint(data, mode="exact")


def imagehash_baseline(data: bytes) -> tuple[str, tuple[int, int], str, str, str]:
    """The plain ImageHash way; raises on anything Pillow cannot decode."""
    md5 = hashlib.md5(data).hexdigest()
    image = Image.open(io.BytesIO(data))
    size = image.size
    phash = str(imagehash.phash(image))
    ahash = str(imagehash.average_hash(image))
    dhash = str(imagehash.dhash(image))
    return md5, size, phash, ahash, dhash


def _bits_hex(bits: np.ndarray) -> str:
    return np.packbits(bits.ravel()).tobytes().hex()


def seed_opencv(data: bytes) -> tuple[str, tuple[int, int], str, str, str]:
    """The seed article's OpenCV reference; raises ValueError when OpenCV cannot decode."""
    md5 = hashlib.md5(data).hexdigest()
    grey = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise ValueError("cv2.imdecode returned None")
    height, width = grey.shape[:2]
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8]
    phash = low > np.median(low)
    avg = cv2.resize(grey, (8, 8), interpolation=cv2.INTER_AREA)
    ahash = avg > avg.mean()
    diff = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA)
    dhash = diff[:, 1:] > diff[:, :-1]
    return md5, (width, height), _bits_hex(phash), _bits_hex(ahash), _bits_hex(dhash)


METHODS: dict[str, Method] = {
    "ours fast": ours_fast,
    "ours exact": ours_exact,
    "ImageHash": imagehash_baseline,
    "seed OpenCV": seed_opencv,
}
REFERENCE = "ours fast"


# --- corpus ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    path: Path
    format: str
    pixels: int
    data: bytes


def load_corpus(corpus: Path) -> tuple[list[Entry], int]:
    """Every file Pillow can fully decode and whose header is within the pixel limit."""
    with open(corpus / "DETAILS.tsv", newline="") as handle:
        decodes = {row["path"]: row["decode"] for row in csv.DictReader(handle, delimiter="\t")}
    entries: list[Entry] = []
    listed = 0
    with open(corpus / "MANIFEST.tsv", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            listed += 1
            if decodes.get(row["path"]) != "ok" or not row["width"] or not row["height"]:
                continue
            pixels = int(row["width"]) * int(row["height"])
            if pixels > MAX_PIXELS:
                continue
            path = corpus / row["path"]
            entries.append(Entry(path, row["format"], pixels, path.read_bytes()))
    return entries, listed


@dataclass
class Screening:
    """What one untimed pass of every method over every file found."""

    kept: list[Entry] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    results: dict[str, dict[Path, Any]] = field(default_factory=lambda: defaultdict(dict))
    seconds: dict[str, dict[Path, float]] = field(default_factory=lambda: defaultdict(dict))

    def estimate(self, entries: Sequence[Entry]) -> dict[str, float]:
        """Seconds of one pass of each method over ``entries``, from this first pass."""
        return {name: sum(self.seconds[name][e.path] for e in entries) for name in METHODS}


def screen(entries: Sequence[Entry]) -> Screening:
    """Run every method once on every file (also the warm-up); keep files none rejects."""
    found = Screening()
    for entry in entries:
        refused = []
        for name, method in METHODS.items():
            start = time.perf_counter()
            try:
                result = method(entry.data)
            except Exception:
                refused.append(name)
                continue
            finally:
                found.seconds[name][entry.path] = time.perf_counter() - start
            if name.startswith("ours") and not result.ok:
                refused.append(name)
                continue
            found.results[name][entry.path] = result
        if refused:
            found.dropped[", ".join(refused)].append(f"{entry.path.name} ({entry.format})")
        else:
            found.kept.append(entry)
    return found


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """libjpeg, libpng and libtiff inside OpenCV chatter on fd 2 about odd files; mute them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --- timing ------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Samples of one method over one set of files."""

    method: str
    images: int = 0
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    per_file_best: dict[int, float] = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        return min(self.cpus)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpus)

    @property
    def wall(self) -> float:
        return min(self.walls)

    @property
    def rate(self) -> float:
        """Images per CPU second: per core."""
        return self.images / self.cpu


def one_sample(
    method: Method, blobs: Sequence[bytes], passes: int
) -> tuple[float, float, list[float]]:
    """Wall and CPU seconds of ``passes`` passes over ``blobs``; per-file CPU s of the last."""
    per_file = [0.0] * len(blobs)
    clock = time.process_time
    gc.collect()
    gc.disable()
    try:
        cpu0 = clock()
        wall0 = time.perf_counter()
        for _ in range(passes):
            for index, data in enumerate(blobs):
                start = clock()
                method(data)
                per_file[index] = clock() - start
        wall = time.perf_counter() - wall0
        cpu = clock() - cpu0
    finally:
        gc.enable()
    return wall, cpu, per_file


def measure(
    entries: Sequence[Entry], rounds: int, warm: dict[str, float], min_sample: float
) -> dict[str, Timing]:
    """Best-of-``rounds`` timing of every method, methods interleaved and rotated each round."""
    blobs = [entry.data for entry in entries]
    names = list(METHODS)
    timings = {name: Timing(name) for name in names}
    passes = {name: max(1, math.ceil(min_sample / max(warm[name], 1e-6))) for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu, per_file = one_sample(METHODS[name], blobs, passes[name])
            timing = timings[name]
            timing.images = passes[name] * len(blobs)
            timing.walls.append(wall)
            timing.cpus.append(cpu)
            for index, seconds in enumerate(per_file):
                known = timing.per_file_best.get(index, math.inf)
                timing.per_file_best[index] = min(known, seconds)
    return timings


# --- the JPEG premature-end check ----------------------------------------------------------------


def jpeg_decode_checked(data: bytes) -> Image.Image:
    """The JPEG decode ``fingerprint`` makes in fast mode, premature-end check included."""
    return fingerprint_module._decode(data, Image.open(io.BytesIO(data)), reduce=True)


def jpeg_decode_pillow_draft(data: bytes) -> Image.Image:
    """The decode before the check: Pillow's reduced ``draft("L")`` decode, warnings dropped."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    scale = min(width, height) // fingerprint_module.FAST_MIN_SIDE
    if scale >= 2:
        image.draft("L", (width // scale, height // scale))
    image.load()
    return image


def print_jpeg_check(title: str, entries: Sequence[Entry], rounds: int) -> float:
    """CPU seconds of both JPEG decodes over ``entries``, best of ``rounds``; checked / draft."""
    blobs = [entry.data for entry in entries]
    methods = {"checked": jpeg_decode_checked, "Pillow draft": jpeg_decode_pillow_draft}
    best = {name: math.inf for name in methods}
    passes = max(1, math.ceil(1.0 / max(sum(len(b) for b in blobs) / 100e6, 1e-3)))
    for round_index in range(rounds):
        order = list(methods) if round_index % 2 == 0 else list(methods)[::-1]
        for name in order:
            _, cpu, _ = one_sample(methods[name], blobs, passes)
            best[name] = min(best[name], cpu)
    ratio = best["checked"] / best["Pillow draft"]
    print(
        f"  {title}: {len(blobs)} files x {passes}: checked {best['checked']:.3f} s, "
        f"Pillow draft {best['Pillow draft']:.3f} s CPU; checked / draft = {ratio:.3f}x"
    )
    return ratio


# --- pool --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolRun:
    """One timed pool run; ``ran`` and ``waited`` are worker seconds (nan if unknown)."""

    workers: int
    images: int
    wall: float
    ran: float  # seconds the workers ran on a CPU
    waited: float  # seconds they were runnable but waited for a CPU: other load on the machine

    @property
    def rate(self) -> float:
        return self.images / self.wall

    @property
    def contended(self) -> float:
        """Share of the workers' time lost waiting for a CPU that something else held."""
        return self.waited / (self.workers * self.wall)

    @property
    def idle(self) -> float:
        """Share of the workers' time neither running nor waiting: the pool starved them."""
        return max(0.0, 1.0 - (self.ran + self.waited) / (self.workers * self.wall))

    @property
    def projected_rate(self) -> float:
        """Rate had the waiting been running (a rough figure for a quiet machine)."""
        return self.images / (self.wall * (1.0 - self.contended))


def _scheduler_seconds(pids: Iterable[int]) -> tuple[float, float]:
    """Seconds run and seconds waited runnable, summed over processes (Linux schedstat)."""
    ran = waited = 0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/schedstat").read_text().split()
            ran += int(fields[0])
            waited += int(fields[1])
    except (OSError, ValueError, IndexError):
        return math.nan, math.nan
    return ran / 1e9, waited / 1e9


def pool_run(workers: int, items: Sequence[str], repeats: int, chunksize: int) -> PoolRun:
    """Wall time of ``FingerprintPool(workers)`` over ``items`` x ``repeats``, warmed up first."""
    with FingerprintPool(workers) as pool:
        # Warm-up: spawn every worker and import its modules before the clock starts.
        for _ in pool.map(list(items[: 8 * workers]), chunksize=1):
            pass
        executor = getattr(pool, "_executor", None)
        pids = list(getattr(executor, "_processes", None) or {})
        stream: Iterator[str] = itertools.chain.from_iterable(itertools.repeat(items, repeats))
        count = 0
        ran0, waited0 = _scheduler_seconds(pids)
        start = time.perf_counter()
        for result in pool.map(stream, chunksize=chunksize):
            count += 1
            if not result.ok:
                raise RuntimeError(f"the pool rejected a file every method accepted: {result}")
        wall = time.perf_counter() - start
        ran1, waited1 = _scheduler_seconds(pids)
    return PoolRun(workers, count, wall, ran1 - ran0, waited1 - waited0)


def code_version() -> str:
    """The commit measured, and whether the fingerprint code differs from it."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", *CODE],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", *CODE],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    changed = [name for name in dirty if name.endswith(".py")]
    return f"code at {commit}" + (f" + uncommitted {', '.join(changed)}" if changed else "")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# --- report ------------------------------------------------------------------------------------


def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "MISS"


def print_table(title: str, entries: Sequence[Entry], timings: dict[str, Timing]) -> None:
    megapixels = sum(entry.pixels for entry in entries) / 1e6
    megabytes = sum(len(entry.data) for entry in entries) / 1e6
    print(f"\n{title}: {len(entries)} files, {megapixels:,.0f} MP, {megabytes:.1f} MB; {load()}")
    print(
        f"  {'method':<12} {'images':>6} {'cpu s':>7} {'(median)':>8} {'wall s':>7} "
        f"{'img/s':>7} {'ratio':>7}"
    )
    reference = timings[REFERENCE].rate
    for name, timing in timings.items():
        print(
            f"  {name:<12} {timing.images:>6} {timing.cpu:>7.3f} {timing.cpu_median:>8.3f} "
            f"{timing.wall:>7.3f} {timing.rate:>7.1f} {reference / timing.rate:>6.2f}x"
        )


def print_by_format(entries: Sequence[Entry], timings: dict[str, Timing]) -> None:
    """Seconds per format (sum of each file's best time): where the time goes."""
    formats = sorted({entry.format for entry in entries})
    names = list(timings)
    print("  by format (sum of per-file best CPU ms; ratio = ImageHash / ours fast):")
    print(f"    {'format':<6} {'files':>5} " + " ".join(f"{n:>11}" for n in names) + "   ratio")
    for fmt in formats:
        indexes = [i for i, entry in enumerate(entries) if entry.format == fmt]
        sums = {n: 1e3 * sum(timings[n].per_file_best[i] for i in indexes) for n in names}
        ratio = sums["ImageHash"] / sums[REFERENCE]
        cells = " ".join(f"{sums[n]:>11.1f}" for n in names)
        print(f"    {fmt:<6} {len(indexes):>5} {cells}   {ratio:>4.2f}x")


def print_checks(entries: Sequence[Entry], results: dict[str, dict[Path, Any]]) -> None:
    """Fast against exact, exact against ImageHash: the fast path does not buy speed wrongly."""
    distances: list[int] = []
    same = upright = 0
    for entry in entries:
        fast, exact = results["ours fast"][entry.path], results["ours exact"][entry.path]
        distances.append(max(hamming(getattr(fast, k), getattr(exact, k)) for k in HASHES))
        if exact.orientation == 1:
            upright += 1
            reference = results["ImageHash"][entry.path][2:]
            same += reference == (exact.phash, exact.ahash, exact.dhash)
    print(
        f"\nchecks: fast vs exact, worst of 3 hashes: mean {statistics.fmean(distances):.2f} "
        f"bits, max {max(distances)} ({entries[distances.index(max(distances))].path.name}); "
        f"exact == ImageHash on {same}/{upright} upright files"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--rounds", type=int, default=3, help="repeats of each measurement")
    parser.add_argument("--min-sample", type=float, default=1.0, help="seconds per sample, min")
    parser.add_argument("--pool-seconds", type=float, default=10.0)
    parser.add_argument("--pool-rounds", type=int, default=2)
    parser.add_argument("--chunksize", type=int, default=4)
    parser.add_argument("--no-pool", action="store_true", help="skip the process-pool part")
    args = parser.parse_args(argv)

    cv2.setNumThreads(1)  # per core: OpenCV's resize/dct would otherwise use both cores
    started = time.perf_counter()
    entries, listed = load_corpus(args.corpus)
    with native_stderr_silenced():
        screening = screen(entries)
    corpus = screening.kept
    photos = [e for e in corpus if e.format == "JPEG" and e.pixels >= PHOTO_MIN_PIXELS]
    print(
        f"fingerprint benchmark: Python {sys.version.split()[0]}, Pillow {Image.__version__}, "
        f"ImageHash {imagehash.__version__}, OpenCV {cv2.__version__} (1 thread), "
        f"numpy {np.__version__}; {code_version()}"
    )
    print(
        f"corpus {args.corpus}: {listed} listed, {len(entries)} Pillow-decodable within "
        f"{MAX_PIXELS:,} px, {len(corpus)} accepted by every method (timed)"
    )
    for refused_by, names in sorted(screening.dropped.items()):
        print(f"  left out, refused by {refused_by}: {len(names)}: {', '.join(sorted(names))}")
    print(
        f"bytes preloaded; best of {args.rounds} rounds; img/s = images per CPU second; "
        f"ratio = ours fast img/s / row img/s"
    )

    timed = {}
    for title, subset in (("corpus", corpus), (">= 8 MP JPEG photos", photos)):
        with native_stderr_silenced():
            timings = measure(subset, args.rounds, screening.estimate(subset), args.min_sample)
        print_table(title, subset, timings)
        if subset is corpus:
            print_by_format(subset, timings)
        timed[title] = timings
    print_checks(corpus, screening.results)
    check_rounds = max(args.rounds, 5)
    print(f"\nJPEG premature-end check (fast mode decode, best of {check_rounds}); {load()}")
    jpegs = [e for e in corpus if e.format == "JPEG"]
    with native_stderr_silenced():
        for title, subset in (("corpus JPEGs", jpegs), (">= 8 MP JPEG photos", photos)):
            print_jpeg_check(title, subset, check_rounds)

    corpus_t, photos_t = timed["corpus"], timed[">= 8 MP JPEG photos"]
    ratio_corpus = corpus_t[REFERENCE].rate / corpus_t["ImageHash"].rate
    ratio_photos = photos_t[REFERENCE].rate / photos_t["ImageHash"].rate
    seed_corpus = corpus_t[REFERENCE].rate / corpus_t["seed OpenCV"].rate
    seed_photos = photos_t[REFERENCE].rate / photos_t["seed OpenCV"].rate

    speedup = math.nan
    busy = ""
    if not args.no_pool:
        paths = [str(entry.path) for entry in corpus]
        # A margin over the in-process rate: one worker runs a little faster than one pass.
        per_pass = len(paths) / corpus_t[REFERENCE].rate
        repeats = max(1, math.ceil(1.25 * args.pool_seconds / per_pass))
        print(
            f"\npool: FingerprintPool(n), fast mode, spawn; items = file paths (read by the "
            f"workers, page cache warm); chunksize {args.chunksize}; corpus x {repeats}; "
            f"best of {args.pool_rounds}; {load()}"
        )
        runs: dict[int, list[PoolRun]] = {1: [], 2: []}
        for round_index in range(args.pool_rounds):
            for workers in (1, 2) if round_index % 2 == 0 else (2, 1):
                runs[workers].append(pool_run(workers, paths, repeats, args.chunksize))
        best = {workers: min(done, key=lambda run: run.wall) for workers, done in runs.items()}
        print(
            f"  {'processes':<10} {'images':>6} {'wall s':>7} {'img/s':>7} {'ran':>5} "
            f"{'waited':>6} {'idle':>5} {'speed-up':>9}"
        )
        for workers, run in best.items():
            print(
                f"  {workers:<10} {run.images:>6} {run.wall:>7.2f} {run.rate:>7.1f} "
                f"{run.ran / run.wall:>5.2f} {run.waited / run.wall:>6.2f} {run.idle:>5.0%} "
                f"{run.rate / best[1].rate:>8.2f}x"
            )
        print(
            "  ran / waited = CPUs' worth the workers ran / waited runnable for a CPU held by "
            "other load;\n  idle = share of worker time doing neither (starved by the pool)"
        )
        speedup = best[2].rate / best[1].rate
        worst = max(run.contended for run in best.values())
        if not worst < BUSY_ABOVE:  # also when unknown (nan)
            projected = best[2].projected_rate / best[1].projected_rate
            busy = (
                f"unreliable: the workers waited {worst:.0%} of their time for CPUs other "
                f"load held; without that wait it projects to ~{projected:.2f}x. Re-run on a "
                "quiet machine (another session's load takes half the CPU under autogroup)"
            )
        print(
            f"  in-process, same files: {corpus_t[REFERENCE].rate:.1f} img/s per CPU s; "
            f"walls 1: {', '.join(f'{r.wall:.1f}' for r in runs[1])}; "
            f"2: {', '.join(f'{r.wall:.1f}' for r in runs[2])}; {load()}"
        )

    print("\ntargets (fast mode, per core)")
    rows = [
        ("corpus: ours / ImageHash", ratio_corpus, TARGET_CORPUS),
        (">= 8 MP photos: ours / ImageHash", ratio_photos, TARGET_PHOTOS),
        ("pool: 2 processes / 1 process", speedup, TARGET_POOL),
    ]
    for label, value, target in rows:
        status = "SKIP" if math.isnan(value) else verdict(value, target)
        print(f"  {label:<34} {value:>6.2f}x   target >= {target:.1f}x   {status}")
        if label.startswith("pool") and busy:
            print(f"    note: {busy}")
    print(f"  {'corpus: ours / seed OpenCV':<34} {seed_corpus:>6.2f}x   (information)")
    print(f"  {'>= 8 MP photos: ours / seed OpenCV':<34} {seed_photos:>6.2f}x   (information)")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
