"""S3 requests per image and per shard: what an S3-backed library asks of its store.

Run by hand from the project root (never in CI; 5-10 minutes on 2 busy cores)::

    uv run python benchmarks/s3_requests.py [--sizes 60,240] [--buckets 16]

It starts SeaweedFS (``weed mini`` on loopback, auth on) with its Prometheus counters on, and
for each size ``n`` ingests, with ``asset-library ingest`` in a fresh process, a batch of ``n``
distinct JPEGs (corpus JPEGs, each copy made distinct by a few bytes after its EOI marker) into
a fresh library whose lake (``ASSET_LIBRARY_LAKE``) and image bytes (``ASSET_LIBRARY_OBJECTS``)
are on S3, as one shard. Then it ingests a second batch of ``n`` new images into the same
library (the steady state: every table exists, the key cache is warm). For each run it prints
the requests the S3 gateway answered, by action (``GET`` counts ``HEAD`` too), from the
server's own counters. The upload check reads back ``VERIFY_SAMPLE`` objects' bytes per run
(``ASSET_LIBRARY_VERIFY_SAMPLE``; 100 by default, a per-shard cost at any real shard size).

Requests split into a part per image (the object's conditional upload, its verification) and a
part per shard (the lake's files: a handful per touched bucket per table, the Delta log, the
checks), so with ``--buckets`` small enough that every batch touches every bucket, two sizes
give both: ``per image = (R(n2) - R(n1)) / (n2 - n1)``, ``per shard = R(n1) - n1 * per image``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asset_library.layout import LibraryLayout  # noqa: E402
from asset_library_tests.support.seaweedfs import SeaweedS3  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus"
BUCKET = "requests-bench"
#: Objects whose bytes the upload check reads back per run: a per-shard cost (default 100),
#: set below the smaller size so it does not pass for a per-image one.
VERIFY_SAMPLE = 10


def distinct_jpegs(corpus: Path, count: int, out: Path, salt: str) -> None:
    """``count`` distinct JPEG files in ``out``: corpus JPEGs with unique bytes appended."""
    sources = sorted(p for p in corpus.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg"})
    sources = [p for p in sources if p.stat().st_size > 4096][:40]
    if not sources:
        raise SystemExit(f"no JPEGs in {corpus}")
    out.mkdir(parents=True)
    for number in range(count):
        data = sources[number % len(sources)].read_bytes()
        (out / f"{salt}-{number:06d}.jpg").write_bytes(data + f"{salt}:{number}".encode())


def ingest(env: dict[str, str], library: Path, batch: Path, shard_size: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "asset_library.cli", "ingest", str(batch),
         "--library", str(library), "--shard-size", str(shard_size), "--parallel", "1",
         "--workers", "2", "--batch", batch.name],
        env=env, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - started


def difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}


def show(label: str, counts: dict[str, int], images: int, seconds: float) -> None:
    total = sum(counts.values())
    parts = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    print(
        f"{label:<28} {images:>6} images {total:>7} requests "
        f"({total / images:5.2f} per image; {parts}) in {seconds:5.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="60,240", help="two batch sizes, comma-separated")
    parser.add_argument("--buckets", type=int, default=16, help="the libraries' bucket count")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) != 2 or sizes[0] >= sizes[1]:
        raise SystemExit("--sizes: two increasing sizes, e.g. 100,400")
    work = Path(tempfile.mkdtemp(prefix="s3-requests-"))
    steady: dict[int, dict[str, int]] = {}
    try:
        with SeaweedS3(metrics=True) as seaweed:
            seaweed.make_bucket(BUCKET)
            for n in sizes:
                library = work / f"library-{n}"
                LibraryLayout.open(library, n_buckets=args.buckets)
                env = {
                    **os.environ,
                    **seaweed.env(),
                    "ASSET_LIBRARY_LAKE": f"s3://{BUCKET}/lake-{n}",
                    "ASSET_LIBRARY_OBJECTS": f"s3://{BUCKET}/objects-{n}",
                    "ASSET_LIBRARY_VERIFY_SAMPLE": str(VERIFY_SAMPLE),
                }
                for run in ("first", "second"):
                    batch = work / f"batch_{n}_{run}"
                    distinct_jpegs(args.corpus, n, batch, salt=f"{n}{run}")
                    before = seaweed.request_counts()
                    seconds = ingest(env, library, batch, n)
                    counts = difference(seaweed.request_counts(), before)
                    show(f"batch of {n}, {run} in library", counts, n, seconds)
                    if run == "second":
                        steady[n] = counts
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, large = sizes
    print(f"\nsteady state (a second batch), one shard each, {args.buckets} buckets:")
    for action in sorted(set(steady[small]) | set(steady[large])):
        a, b = steady[small].get(action, 0), steady[large].get(action, 0)
        per_image = (b - a) / (large - small)
        per_shard = a - small * per_image
        print(f"  {action:<7} {per_image:6.2f} per image  {per_shard:8.0f} per shard")
    a, b = sum(steady[small].values()), sum(steady[large].values())
    per_image = (b - a) / (large - small)
    per_shard = a - small * per_image
    print(
        f"  {'all':<7} {per_image:6.2f} per image  {per_shard:8.0f} per shard "
        f"({per_shard / args.buckets:.1f} per bucket)"
    )


if __name__ == "__main__":
    main()
