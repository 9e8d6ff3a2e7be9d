"""What one shard costs the serving store: its changes folded into copies of the same store,
against a rebuild of the store from the lake, alternately.

    uv run python benchmarks/store_sync.py --library /tmp/scale/library [--shard-size 200000]

On a library built by ``benchmarks/scale.py --keep`` (its store level with its lake): the store
is copied, one more synthetic shard is written and merged into the lake (the library grows by
it), then ``--rounds`` times each: a copy of the store as it was brought level by ``sync`` (a
new run, merged with others if its tier fills), and a rebuild of it from the lake; the
seconds of each, the ratio, and whether the synced store passes the ``serving_store_level``
check.

    uv run python benchmarks/store_sync.py --library /tmp/scale/library --postgres

With ``--postgres``: the same shard folded into the SQLite store (with its index) and into a
PostgreSQL 15 store (a local server started for the run, as the tests start it; each round
from a copy of the store as it was: ``CREATE DATABASE … TEMPLATE``), alternately; the seconds
of each, the ratio, the rebuild of each from the lake, and what each weighs per image
(``pg_total_relation_size`` of the tables with their indexes; the SQLite file).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asset_library.lake import Lake, merge_images, write_shard  # noqa: E402
from asset_library.layout import LibraryLayout  # noqa: E402
from asset_library.library import Library  # noqa: E402
from asset_library.serving import PostgresBackend, check_store, sync  # noqa: E402
from asset_library.serving.backend import PASSWORD_SETTING  # noqa: E402
from asset_library.serving.check import count_images, stored_runs  # noqa: E402
from asset_library_tests.support.synthetic import random_md5s, write_keys  # noqa: E402


def _copy_store(source: Path, to: Path) -> None:
    for suffix in ("", "-wal"):
        if Path(f"{source}{suffix}").exists():
            shutil.copy(f"{source}{suffix}", f"{to}{suffix}")


def _add_shard(layout: LibraryLayout, lake: Lake, size: int) -> None:
    """One more synthetic shard written and merged: the library grows by it."""
    number = len(list(layout.keys_path("a-s00000").parent.glob("*.parquet")))
    batch = f"sync{number:03d}"
    shard = f"{batch}-s00000"
    md5s = random_md5s(np.random.default_rng(1000 + number), size)
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


def _images(store: Path) -> int:
    with contextlib.closing(sqlite3.connect(store)) as connection:
        cursor = connection.cursor()
        return count_images(cursor, stored_runs(cursor))


def against_postgres(args: argparse.Namespace) -> int:
    """One shard's sync into SQLite and into PostgreSQL, from the same stores, alternately."""
    from asset_library_tests.support.postgres import PostgresServer

    layout = LibraryLayout.existing(args.library)
    lake = Lake.of(layout, {})
    server = PostgresServer().start()
    os.environ[PASSWORD_SETTING] = server.password  # as a deployment gives it
    try:
        with tempfile.TemporaryDirectory() as scratch:
            base_sqlite = Path(scratch) / "base.sqlite"
            rebuilt = {"sqlite": sync(lake, base_sqlite, rebuild=True).seconds}
            base_pg = PostgresBackend(server.new_database("base"))
            rebuilt["postgresql"] = sync(lake, base_pg, rebuild=True).seconds
            images = _images(base_sqlite)
            print(f"rebuilt from the lake ({images:,} images): {rebuilt}")
            _add_shard(layout, lake, args.shard_size)
            seconds: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
            weight: dict[str, float] = {}
            for number in range(args.rounds):
                target = Path(scratch) / "store.sqlite"
                _copy_store(base_sqlite, target)
                result = sync(lake, target)
                assert not result.rebuilt, result.reason
                seconds["sqlite"].append(result.seconds)
                weight["sqlite"] = target.stat().st_size / _images(target)
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{target}{suffix}").unlink(missing_ok=True)
                copy = server.new_database(f"round{number}")
                with contextlib.closing(server.connect("postgres")) as connection:
                    connection.autocommit = True
                    name = copy.rsplit("/", 1)[1]
                    connection.cursor().execute(f"DROP DATABASE {name}")
                    connection.cursor().execute(f"CREATE DATABASE {name} TEMPLATE base")
                backend = PostgresBackend(copy)
                result = sync(lake, backend)
                assert not result.rebuilt, result.reason
                seconds["postgresql"].append(result.seconds)
                after = _pg_images(server, name)
                weight["postgresql"] = backend.size_bytes() / after
                print(f"  round {number}: sqlite {seconds['sqlite'][-1]:.1f} s, postgresql "
                      f"{seconds['postgresql'][-1]:.1f} s ({after:,} images after)")  # fmt: skip
        median = {k: statistics.median(v) for k, v in seconds.items()}
        ratio = median["postgresql"] / median["sqlite"]
        print(f"one shard's sync: PostgreSQL {ratio:.2f}x SQLite's seconds (median)")
        figures = {
            "sync_s": {k: round(v, 2) for k, v in median.items()},
            "ratio": round(ratio, 2),
            "rebuild_s": {k: round(v, 1) for k, v in rebuilt.items()},
            "bytes_per_image": {k: round(v) for k, v in weight.items()},
        }
        print(json.dumps(figures))
    finally:
        server.stop()
    return 0


def _pg_images(server: Any, database: str) -> int:
    with contextlib.closing(server.connect(database)) as connection:
        cursor = connection.cursor()
        return count_images(cursor, stored_runs(cursor))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--library", required=True)
    parser.add_argument("--shard-size", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--postgres", action="store_true", help="SQLite against PostgreSQL")
    args = parser.parse_args()
    if args.postgres:
        return against_postgres(args)
    layout = LibraryLayout.existing(args.library)
    lake = Lake.of(layout, {})
    store = layout.serving_store_path
    first = sync(lake, store)
    print(f"store level with the lake ({first.seconds:.1f} s, rebuilt: {first.rebuilt})")
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "base.sqlite"
        _copy_store(store, base)
        _add_shard(layout, lake, args.shard_size)
        seconds: dict[str, list[float]] = {"a shard's sync": [], "a rebuild": []}
        for _ in range(args.rounds):
            for variant in seconds:
                target = Path(scratch) / "store.sqlite"
                _copy_store(base, target)
                started = time.perf_counter()
                result = sync(lake, target, rebuild=variant == "a rebuild")
                seconds[variant].append(time.perf_counter() - started)
                print(f"  {variant:<15} {seconds[variant][-1]:6.1f} s "
                      f"({result.run_rows:,} rows written, {result.merged_rows:,} merged, "
                      f"{result.runs} runs)")  # fmt: skip
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{target}{suffix}").unlink(missing_ok=True)
        median = {k: statistics.median(v) for k, v in seconds.items()}
        ratio = median["a shard's sync"] / median["a rebuild"]
        print(f"one shard's sync: {ratio:.2f}x the seconds of a rebuild (median of {args.rounds})")
    synced = sync(lake, store)
    checked = check_store(Library(layout.root), sample=100, seed=1)
    print(f"the library's own store synced in {synced.seconds:.1f} s; check: {checked.reason}")
    print(json.dumps({**{k: round(v, 2) for k, v in median.items()}, "ratio": round(ratio, 2),
                      "check_passed": checked.passed}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
