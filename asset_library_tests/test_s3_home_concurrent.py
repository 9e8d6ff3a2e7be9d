"""Two machines at once on one ``s3://`` library: two ingests started together land both
batches whole (each image once, each occurrence counted once), and two ``serve`` replicas of
the library answer as :class:`Library` does and see a later batch without a restart."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest
from pydantic_core import to_jsonable_python

from asset_library.layout import LibraryLayout
from asset_library.library import Library
from asset_library.runs.orchestrate import ingest_batch
from asset_library_tests.support.corpus import corpus_jpegs
from asset_library_tests.support.seaweedfs import SeaweedS3
from asset_library_tests.support.serve_process import ServeReplica

#: Each batch: one corpus folder of its own (near-duplicates inside it) and the common images.
FOLDERS = {"ba": "github_recurser_exif-orientation-examples", "bb": "github_jenssegers_imagehash"}
COMMON = 2
SHARD_SIZE = "6"
#: How long a replica may take to answer for a later batch's images (a bound, not a target).
SEEN_WITHIN_S = 60.0


class Machine:
    """A fresh machine: its own empty cache, home and working folders, no Dagster home, and
    nothing of the library's but its URL and the S3 settings."""

    def __init__(self, root: Path, seaweed: SeaweedS3, home: str) -> None:
        self.root = root
        for folder in ("cache", "home", "work"):
            (root / folder).mkdir(parents=True)
        inherited = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ASSET_LIBRARY_", "DAGSTER_", "AWS_"))
            and k not in ("XDG_CACHE_HOME",)
        }
        self.env = {
            **inherited,
            **seaweed.env(),
            "ASSET_LIBRARY_HOME": home,
            "ASSET_LIBRARY_CACHE": str(root / "cache"),
            "ASSET_LIBRARY_WORKERS": "0",
            "HOME": str(root / "home"),
        }

    def start(self, *args: str) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "asset_library.cli", *args]
        return subprocess.Popen(
            command,
            cwd=self.root / "work",
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, *args: str) -> tuple[int, str]:
        process = self.start(*args)
        out, _ = process.communicate(timeout=600)
        return process.returncode, out

    def become(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make this test's process this machine (for :class:`Library` calls)."""
        for name in [n for n in os.environ if n.startswith(("ASSET_LIBRARY_", "DAGSTER_"))]:
            monkeypatch.delenv(name)
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(self.root / "work")


def _batches(corpus_dir: Path, folder: Path) -> dict[str, Path]:
    """Each batch's source folder: its own corpus folder's images plus the common ones."""
    common = corpus_jpegs(corpus_dir, COMMON)
    made = {}
    for batch, name in FOLDERS.items():
        made[batch] = shutil.copytree(corpus_dir / name, folder / batch)
        for number, (path, _) in enumerate(common):
            shutil.copyfile(path, made[batch] / f"common-{number}.jpg")
    return made


def _comparable(record: dict) -> dict:
    """A lookup as JSON gives it, less which store answered (differs by design)."""
    return {k: v for k, v in to_jsonable_python(record).items() if k != "answered_by"}


def _md5s(library: Library) -> list[str]:
    return [r["md5"] for r in library.query("SELECT md5 FROM images ORDER BY md5")]


def test_two_machines_ingest_into_one_s3_library_at_once_and_replicas_serve_it(
    tmp_path: Path,
    corpus_dir: Path,
    seaweed: SeaweedS3,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.monotonic()
    home = f"s3://{s3_bucket}/library"
    sources = _batches(corpus_dir, tmp_path / "sources")
    files = {
        batch: [p for p in folder.rglob("*") if p.is_file()] for batch, folder in sources.items()
    }
    creator = Machine(tmp_path / "creator", seaweed, home)
    creator.become(monkeypatch)
    LibraryLayout.open(home)  # the library exists, empty, before both machines start

    machines = {batch: Machine(tmp_path / f"machine-{batch}", seaweed, home) for batch in sources}
    ingests = {
        batch: machines[batch].start(
            "ingest", str(sources[batch]), "--batch", batch, "--shard-size", SHARD_SIZE
        )
        for batch in sources
    }
    for batch, process in ingests.items():
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{batch}:\n{out}"
    print(f"two ingests at once: {time.monotonic() - started:.1f} s")
    for batch, machine in machines.items():  # each machine's own instance ran its shards
        code, out = machine.run("status")
        shard_lines = [line for line in out.splitlines() if line.startswith(f"  {batch}-")]
        assert code == 0 and shard_lines, out
        assert all(line.endswith("materialized") for line in shard_lines), out

    third = Machine(tmp_path / "third", seaweed, home)
    third.become(monkeypatch)
    library = Library(home)
    per_md5 = Counter(_md5(p) for paths in files.values() for p in paths)
    expected = sorted(per_md5)
    assert _md5s(library) == expected  # every image of both batches, once
    [counts] = library.query(
        "SELECT (SELECT count(*) FROM occurrences) AS occurrences, "
        "(SELECT sum(occurrences) FROM images) AS counted, "
        "(SELECT count(*) FROM rejects) AS rejects"
    )
    sources_total = sum(len(paths) for paths in files.values())
    assert counts == {"occurrences": sources_total, "counted": sources_total, "rejects": 0}
    counted = library.query("SELECT md5, occurrences FROM images")
    assert {r["md5"]: r["occurrences"] for r in counted} == per_md5
    assert [per_md5[md5] for _, md5 in corpus_jpegs(corpus_dir, COMMON)] == [2] * COMMON
    keys = {o["Key"] for o in seaweed.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    for batch in sources:
        assert (
            f"library/plans/{batch}/plan.json" in keys and f"library/triggers/{batch}.json" in keys
        )
    for md5 in expected:  # the similarity index holds every image of both
        found = library.similar(md5, max_distance=0, min_quality=None, confirm=None, limit=None)
        assert md5 in {hit["md5"] for hit in found}, md5
    code, out = third.run("status")
    assert code == 0 and "pending   none" in out, out
    for batch, paths in files.items():
        assert f"{batch}  {len(paths)} images" in out, out

    with dg.instance_for_test() as instance:  # the same batches, one after the other
        folder_library = tmp_path / "folder-library"
        for batch, folder in sources.items():
            ingest_batch(
                str(folder), library=folder_library, batch=batch, workers=0, environ={},
                instance=instance, progress=lambda _: None, max_images_per_shard=int(SHARD_SIZE),
            )  # fmt: skip
    groups = library.near_duplicate_groups()
    assert groups and groups == Library(folder_library).near_duplicate_groups()

    # Two serve replicas, each on a fresh machine, answer as Library does ...
    later = tmp_path / "sources" / "bc"
    later.mkdir()
    for number, (path, _) in enumerate(corpus_jpegs(corpus_dir, COMMON + 3)[COMMON:]):
        shutil.copyfile(path, later / f"later-{number}{path.suffix}")
    new = sorted({_md5(p) for p in later.iterdir()} - set(expected))
    assert new
    env = {**seaweed.env(), "ASSET_LIBRARY_WORKERS": "0"}
    replicas = [ServeReplica(home, tmp_path / f"replica-{n}", env=env) for n in (1, 2)]
    try:
        for replica in replicas:
            replica.start()
        for md5 in expected:
            wanted = _comparable(library.lookup(md5))
            for replica in replicas:
                status, body = replica.get(f"/images/{md5}")
                assert status == 200 and _comparable(body) == wanted, (md5, body)
        for replica in replicas:
            assert replica.get(f"/images/{new[0]}")[0] == 404

        # ... and answer for a later batch another machine ingests, without a restart.
        fourth = Machine(tmp_path / "fourth", seaweed, home)
        code, out = fourth.run("ingest", str(later), "--batch", "bc")
        assert code == 0, out
        ingested = time.monotonic()
        seen: dict[int, float] = {}
        while len(seen) < len(replicas) and time.monotonic() - ingested < SEEN_WITHIN_S:
            for number, replica in enumerate(replicas):
                if number not in seen and all(
                    replica.get(f"/images/{md5}")[0] == 200 for md5 in new
                ):
                    seen[number] = round(time.monotonic() - ingested, 2)
            time.sleep(0.2)
        assert len(seen) == len(replicas), f"not every replica saw the later batch: {seen}"
        print(f"later batch's images answered by each replica after its ingest (s): {seen}")
        fresh = Library(home)
        for md5 in new:
            wanted = _comparable(fresh.lookup(md5))
            for replica in replicas:
                status, body = replica.get(f"/images/{md5}")
                assert status == 200 and _comparable(body) == wanted, (md5, body)
    finally:
        for replica in replicas:
            replica.stop()
    for replica in replicas:
        assert not any(replica.work.iterdir()), list(replica.work.iterdir())
    print(f"test wall time: {time.monotonic() - started:.1f} s")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()
