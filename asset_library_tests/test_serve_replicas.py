"""Two ``serve`` replicas of one library, each on a "machine" of its own, answer alike and see
a refresh's new images without a restart."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import dagster as dg
from pydantic_core import to_jsonable_python

from asset_library.library import Library
from asset_library.runs.orchestrate import ingest_batch
from asset_library_tests.support.corpus import corpus_jpegs
from asset_library_tests.support.serve_process import ServeReplica

#: How long a replica may take to answer for an image a refresh just added.
SEEN_WITHIN_S = 30.0


def _new_images(folder: Path, pictures: list[tuple[Path, str]]) -> dict[str, Path]:
    """Copies of these JPEGs made new to the library by a few bytes after their end, by md5."""
    folder.mkdir(parents=True)
    made = {}
    for number, (path, _) in enumerate(pictures):
        data = path.read_bytes() + f"replica test {number}".encode()
        made[hashlib.md5(data).hexdigest()] = folder / f"new-{number}.jpg"
        made[hashlib.md5(data).hexdigest()].write_bytes(data)
    return made


def _ingest(source: str, library: Path) -> None:
    with dg.instance_for_test() as instance:
        ingest_batch(
            source, library=library, workers=0, environ={}, instance=instance,
            progress=lambda _: None,
        )  # fmt: skip


def _comparable(record: dict) -> dict:
    """A lookup as JSON gives it, less what differs between readers by design (which store
    answered)."""
    return {k: v for k, v in to_jsonable_python(record).items() if k != "answered_by"}


def test_two_replicas_answer_alike_and_see_new_images_without_a_restart(
    tmp_path: Path, corpus_dir: Path, corpus_library: tuple[Path, object]
) -> None:
    first = corpus_jpegs(corpus_dir, 5)
    library = tmp_path / "library"
    shutil.copytree(corpus_library[0], library)  # a library folder is relocatable
    made = _new_images(tmp_path / "later", corpus_jpegs(corpus_dir, 3))
    later = [(path, md5) for md5, path in made.items()]
    reference = Library(library)
    replicas = [ServeReplica(str(library), tmp_path / f"machine-{n}") for n in (1, 2)]
    try:
        for replica in replicas:
            replica.start()
        for _, md5 in first:
            expected = _comparable(reference.lookup(md5))
            for replica in replicas:
                status, body = replica.get(f"/images/{md5}")
                assert status == 200, (md5, body)
                assert body["answered_by"] == "store", body
                assert _comparable(body) == expected
        for replica in replicas:
            assert replica.get(f"/images/{later[0][1]}")[0] == 404

        _ingest(str(tmp_path / "later"), library)
        refreshed = time.monotonic()
        seen: dict[int, float] = {}
        while len(seen) < len(replicas) and time.monotonic() - refreshed < SEEN_WITHIN_S:
            for number, replica in enumerate(replicas):
                if number not in seen and all(
                    replica.get(f"/images/{md5}")[0] == 200 for _, md5 in later
                ):
                    seen[number] = time.monotonic() - refreshed
            time.sleep(0.1)
        assert len(seen) == len(replicas), f"not every replica saw the new images: {seen}"
        print(f"new images seen by each replica after the refresh: {seen}")
        fresh = Library(library)
        for _, md5 in later:
            expected = _comparable(fresh.lookup(md5))
            for replica in replicas:
                status, body = replica.get(f"/images/{md5}")
                assert status == 200 and body["answered_by"] == "store", body
                assert _comparable(body) == expected
    finally:
        for replica in replicas:
            replica.stop()
    for replica in replicas:  # nothing written outside the library but caches
        assert not any(replica.work.iterdir()), list(replica.work.iterdir())
