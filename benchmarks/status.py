"""``asset-library status`` on a library of many shards: the shard states before and after.

Run by hand from the project root (never in CI; about 5 minutes to build, seconds to measure)::

    uv run python benchmarks/status.py [--shards 4000] [--batches 400] [--at /dev/shm/status-lib]

It builds a Dagster instance (SQLite, in a temporary folder on /dev/shm where there is one)
holding ``--shards`` shard partitions in ``--batches`` batches, each shard's five outputs
materialized (recorded without a run by ``report_runless_asset_event``, one SQLite write each,
about 15 ms here), and the batches' trigger files. Then, in the SAME process and on the SAME
instance, alternating, best of ``--rounds``:

- ``old``: what ``status`` did before, one ``get_status_by_partition`` of ``shard_keys`` per batch;
- ``new``: :func:`asset_library.defs.shard_status.shard_states`, one query per output asset for all
  shards (it judges a shard by all five outputs, the old one by ``shard_keys`` only);

and last the whole ``asset-library status`` command in a fresh process (imports included).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from asset_library.defs.partitions import SHARD_OUTPUTS, shards_partitions
from asset_library.defs.shard_status import shard_states
from asset_library.ingest.triggers import TriggerRecord, write_trigger
from asset_library.layout import LibraryLayout


def build(root: Path, shards: int, batches: int) -> tuple[dg.DagsterInstance, list[list[str]]]:
    layout = LibraryLayout.open(root)
    home = layout.dagster_home
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    instance = dg.DagsterInstance.from_config(str(home))
    per_batch = shards // batches
    keys = [[f"b{b:03d}-s{s:05d}" for s in range(per_batch)] for b in range(batches)]
    started = time.perf_counter()
    for number, batch in enumerate(keys):
        instance.add_dynamic_partitions(shards_partitions.name, batch)
        write_trigger(
            layout,
            TriggerRecord(
                trigger=f"bench-{number}",
                kind="bench",
                batch=f"b{number:03d}",
                source="/bench",
                triggered_at=datetime.now(UTC).isoformat(timespec="seconds"),
                images=len(batch) * 1000,
                shards=batch,
            ),
        )
        for shard in batch:
            for asset in SHARD_OUTPUTS:
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(asset, partition=shard, metadata={"images": 1000})
                )
    print(
        f"built {shards:,} shards x {len(SHARD_OUTPUTS)} outputs in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return instance, keys


def old_states(instance: dg.DagsterInstance, keys: list[list[str]]) -> dict[str, str]:
    states = {}
    for batch in keys:
        statuses = (
            instance.get_status_by_partition(dg.AssetKey("shard_keys"), batch, shards_partitions)
            or {}
        )
        for shard in batch:
            state = statuses.get(shard)
            states[shard] = state.value.lower() if state else "missing"
    return states


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=4000)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--at", type=Path, help="build the library here and keep it; reuse it if it is there"
    )
    args = parser.parse_args()
    # In memory where there is a tmpfs: the build is SQLite writes, one per event.
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=shm) as folder:
        root = args.at or Path(folder) / "library"
        home = LibraryLayout(root).dagster_home
        if home.is_dir():
            instance = dg.DagsterInstance.from_config(str(home))
            per_batch = args.shards // args.batches
            keys = [[f"b{b:03d}-s{s:05d}" for s in range(per_batch)] for b in range(args.batches)]
        else:
            instance, keys = build(root, args.shards, args.batches)
        measure(instance, keys, args.rounds)
        command(root)
        instance.dispose()


def measure(instance: dg.DagsterInstance, keys: list[list[str]], rounds: int) -> None:
    every = [shard for batch in keys for shard in batch]
    best = {"old": float("inf"), "new": float("inf")}
    for _ in range(rounds):
        for name, states in (("old", old_states), ("new", shard_states)):
            started = time.perf_counter()
            found = states(instance, keys if name == "old" else every)
            best[name] = min(best[name], time.perf_counter() - started)
            assert set(found.values()) == {"materialized"}, (name, set(found.values()))
    print(f"{len(every):,} shards in {len(keys):,} batches, best of {rounds}:")
    print(f"old: per batch, shard_keys only   {best['old']:6.2f} s")
    print(f"new: per asset, all five outputs  {best['new']:6.2f} s")
    print(f"ratio old/new                     {best['old'] / best['new']:6.1f}x")


def command(root: Path) -> None:
    """The whole command in a fresh process: wall time, and CPU time (on a shared machine the
    wall time mostly measures the other jobs)."""
    env = {**os.environ, "DAGSTER_HOME": str(LibraryLayout(root).dagster_home)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "asset_library.cli", "status", "--library", str(root)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    shards = done.stdout.count("materialized")
    print(
        f"asset-library status, whole command with its imports: {wall:.2f} s wall, "
        f"{cpu:.2f} s CPU, {shards:,} shards"
    )


if __name__ == "__main__":
    main()
