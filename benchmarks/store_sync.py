"""What the serving store's index by attribute value costs a sync: one shard's changes folded
into copies of the same store, with the index and without it, alternately.

    uv run python benchmarks/store_sync.py --library /tmp/scale/library [--shard-size 200000]

On a library built by ``benchmarks/scale.py --keep`` (its store level with its lake): the store
is copied, one more synthetic shard is written and merged into the lake (the library grows by
it), then ``--rounds`` times each: a copy of the store as it was, with the index (as ``sync``
keeps it) and with the index dropped, brought level by ``sync``; the seconds of each, the
ratio, and whether the synced store passes the ``serving_store_level`` check.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asset_library.lake import Lake, merge_images, write_shard  # noqa: E402
from asset_library.layout import LibraryLayout  # noqa: E402
from asset_library.library import Library  # noqa: E402
from asset_library.serving import check_store, sync  # noqa: E402
from asset_library.serving.schema import ATTRIBUTE_INDEX  # noqa: E402
from asset_library_tests.support.synthetic import random_md5s, write_keys  # noqa: E402


def _copy_store(source: Path, to: Path) -> None:
    for suffix in ("", "-wal"):
        if Path(f"{source}{suffix}").exists():
            shutil.copy(f"{source}{suffix}", f"{to}{suffix}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--library", required=True)
    parser.add_argument("--shard-size", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    layout = LibraryLayout.existing(args.library)
    lake = Lake.of(layout, {})
    store = layout.serving_store_path
    first = sync(lake, store)
    print(f"store level with the lake ({first.seconds:.1f} s, rebuilt: {first.rebuilt})")
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "base.sqlite"
        _copy_store(store, base)
        number = len(list(layout.keys_path("a-s00000").parent.glob("*.parquet")))
        batch = f"sync{number:03d}"
        shard = f"{batch}-s00000"
        md5s = random_md5s(np.random.default_rng(1000 + number), args.shard_size)
        keys = write_keys(
            layout.keys_path(shard),
            batch=batch,
            shard=shard,
            n_buckets=layout.n_buckets,
            md5s=md5s,
            seed=number,
        )
        write_shard(lake, shard, keys)
        merge_images(lake)
        seconds: dict[str, list[float]] = {"with the index": [], "without": []}
        for _ in range(args.rounds):
            for variant in seconds:
                target = Path(scratch) / "store.sqlite"
                _copy_store(base, target)
                if variant == "without":
                    with sqlite3.connect(target) as connection:
                        connection.execute(f"DROP INDEX {ATTRIBUTE_INDEX}")
                started = time.perf_counter()
                result = sync(lake, target)
                seconds[variant].append(time.perf_counter() - started)
                assert not result.rebuilt, result.reason
                print(f"  {variant:<15} {seconds[variant][-1]:6.1f} s "
                      f"({result.attributes_changed:,} attribute rows changed)")  # fmt: skip
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{target}{suffix}").unlink(missing_ok=True)
        median = {k: statistics.median(v) for k, v in seconds.items()}
        ratio = median["with the index"] / median["without"]
        print(
            f"one shard's sync: {ratio:.2f}x the seconds with the index (median of {args.rounds})"
        )
    synced = sync(lake, store)
    checked = check_store(Library(layout.root), sample=100, seed=1)
    print(f"the library's own store synced in {synced.seconds:.1f} s; check: {checked.reason}")
    print(json.dumps({**{k: round(v, 2) for k, v in median.items()}, "ratio": round(ratio, 2),
                      "check_passed": checked.passed}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
