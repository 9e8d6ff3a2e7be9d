"""Two machines syncing the similarity index of one ``s3://`` library at once (SeaweedFS, auth
on): the one that publishes second finds the home moved, deletes what it uploaded, syncs again
from the winner's index and publishes that; the home's ``segments.json`` names every file of
the index there, and a fresh machine loads it whole."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from deltalake import DeltaTable

from asset_library import similarity
from asset_library.index_files import is_named
from asset_library.lake import Lake, merge_images
from asset_library.layout import LibraryLayout
from asset_library.library import Library
from asset_library.similarity import IndexPublishError, SimilarityIndex
from asset_library.storage.remote import ConflictError, walk
from asset_library_tests.support.seaweedfs import SeaweedS3
from asset_library_tests.support.synthetic import land_shard, random_md5s

BUCKETS = 16
SHARD = 30


class Machine:
    """One machine of the library: its own cache folder, its layout and lake handles."""

    def __init__(self, root: Path, home: str) -> None:
        self.root = root
        self.layout = LibraryLayout(root / "library", home)
        self.layout.root.mkdir(parents=True)
        self.lake = Lake.of(self.layout)

    def land(self, shard: str, md5s: list[str]) -> None:
        """A shard written and merged into ``images`` from this machine."""
        land_shard(self.layout, self.lake, shard, md5s)
        merge_images(self.lake)


@dataclasses.dataclass(frozen=True)
class LakeAsOf(Lake):
    """A lake whose ``images`` is read as of an earlier version: a refresh that read the
    table before another machine's shard was merged."""

    images_version: int = 0

    @classmethod
    def now(cls, lake: Lake) -> LakeAsOf:
        images = lake.open("images")
        assert images is not None
        fields = {f.name: getattr(lake, f.name) for f in dataclasses.fields(Lake)}
        return cls(**fields, images_version=images.version())

    def open(self, table: str) -> DeltaTable | None:
        if table != "images":
            return super().open(table)
        options = dict(self.storage_options)
        return DeltaTable(self.uri(table), version=self.images_version, storage_options=options)


@pytest.fixture
def machines(
    tmp_path: Path, s3_env: dict[str, str], s3_bucket: str, monkeypatch: pytest.MonkeyPatch
):
    """A new library at an ``s3://`` home, and a maker of machines (each its own cache)."""
    home = f"s3://{s3_bucket}/library"
    monkeypatch.setenv("ASSET_LIBRARY_CACHE", str(tmp_path / "creator"))
    LibraryLayout.open(home, BUCKETS)
    return lambda name: Machine(tmp_path / name, home)


def _index_at_home(seaweed: SeaweedS3, bucket: str) -> tuple[dict, set[str], set[str]]:
    """The home's ``segments.json``, the index's files there (relative to ``index/``), and
    the files it names, read from the home alone (its manifests name the segment folders)."""
    client = seaweed.client()

    def read(relative: str) -> dict:
        body = client.get_object(Bucket=bucket, Key=f"library/index/{relative}")["Body"]
        return json.loads(body.read())

    listed = client.list_objects_v2(Bucket=bucket, Prefix="library/index/").get("Contents", [])
    files = {o["Key"].removeprefix("library/index/") for o in listed}
    saved = read("segments.json")
    named = {meta["keys"] for meta in saved["segments"].values()}
    for manifest in saved["manifests"].values():
        named.add(manifest)
        folder = PurePosixPath(manifest).parent
        named.update(f"{folder}/{entry['dir']}" for entry in read(manifest)["segments"])
    return saved, files, named


def _assert_whole(seaweed: SeaweedS3, bucket: str) -> dict:
    """Every file of the index at the home is one its ``segments.json`` names, and every
    named file is there; segment numbers are distinct. The ``segments.json`` returned."""
    saved, files, named = _index_at_home(seaweed, bucket)
    unnamed = {
        f
        for f in files - {"segments.json"}
        if f not in named and not any(p.as_posix() in named for p in PurePosixPath(f).parents)
    }
    assert not unnamed, f"files at the home no segments.json names: {sorted(unnamed)}"
    for name in named:
        assert name in files or any(f.startswith(name + "/") for f in files), name
    numbers = [meta["number"] for meta in saved["segments"].values()]
    assert len(numbers) == len(set(numbers)), saved["segments"]
    return saved


def _assert_fresh_machine_finds(
    machine: Machine, shards: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine with an empty cache loads the home's index undamaged, holding exactly the
    shards' images; a search of each image's pHash finds the image itself, and so does
    ``similar`` (the user's call) of one image of each shard."""
    index = SimilarityIndex(machine.layout)
    assert index.damage is None
    md5s = [md5 for shard in shards for md5 in shard]
    assert len(index) == len(md5s)
    monkeypatch.setenv("ASSET_LIBRARY_CACHE", str(machine.root / "cache"))
    library = Library(machine.layout.home)
    hashes = {r["md5"]: r["phash"] for r in library.query("SELECT md5, phash FROM images")}
    assert sorted(hashes) == sorted(md5s)
    for md5 in md5s:
        assert md5 in {found for found, _ in index.query(int(hashes[md5], 16), 0)}, md5
    for md5 in (shard[0] for shard in shards):
        found = library.similar(md5, max_distance=0, min_quality=None, confirm=None, limit=None)
        assert md5 in {hit["md5"] for hit in found}, md5


def test_a_machine_whose_publish_loses_syncs_again_from_the_winners_index(
    machines, seaweed: SeaweedS3, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = machines("a"), machines("b")
    rng = np.random.default_rng(11)
    first, second, third = (random_md5s(rng, SHARD) for _ in range(3))
    a.land("s-s00000", first)
    index_a = SimilarityIndex(a.layout)
    index_a.update(a.lake)  # A reads images with the first shard ...
    assert len(index_a) == SHARD
    b.land("s-s00001", second)
    assert SimilarityIndex(b.layout).sync(b.lake).images == 2 * SHARD  # ... B publishes first
    winner = _assert_whole(seaweed, s3_bucket)
    a.land("s-s00002", third)

    with pytest.raises(ConflictError):
        index_a.publish()  # A's index would drop B's shard: the home refuses it
    assert _assert_whole(seaweed, s3_bucket) == winner  # A's uploads were deleted there
    assert len(index_a) == 2 * SHARD  # A now holds B's index, and none of its own files
    _, _, named = _index_at_home(seaweed, s3_bucket)
    here = {p.relative_to(a.layout.index_dir).as_posix() for p in walk(a.layout.index_dir)}
    assert {f for f in here if not is_named(f, named)} == {"segments.json"}

    synced = index_a.sync(a.lake)  # ... and syncs the third shard onto it
    assert len(synced.added) == 1 and synced.images == 3 * SHARD
    saved = _assert_whole(seaweed, s3_bucket)
    assert sorted(meta["number"] for meta in saved["segments"].values()) == [0, 1]
    assert set(winner["manifests"].values()).isdisjoint(saved["manifests"].values())
    _assert_fresh_machine_finds(machines("fresh"), [first, second, third], monkeypatch)


def test_a_refresh_that_read_images_before_the_winners_publish_takes_nothing_away(
    machines, seaweed: SeaweedS3, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = machines("a"), machines("b")
    rng = np.random.default_rng(14)
    first, second = (random_md5s(rng, SHARD) for _ in range(2))
    a.land("s-s00000", first)
    index_a = SimilarityIndex(a.layout)
    read_then = LakeAsOf.now(a.lake)  # A reads images with the first shard ...
    b.land("s-s00001", second)
    SimilarityIndex(b.layout).sync(b.lake)  # ... B syncs both and publishes first ...
    synced = index_a.sync(read_then)  # ... A's publish loses; from B's index it has nothing
    assert synced.added == [] and synced.images == 2 * SHARD
    _assert_whole(seaweed, s3_bucket)
    _assert_fresh_machine_finds(machines("fresh"), [first, second], monkeypatch)


def test_two_machines_that_loaded_one_index_both_publish_their_segments(
    machines, seaweed: SeaweedS3, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = machines("a"), machines("b")
    rng = np.random.default_rng(12)
    first, second, third = (random_md5s(rng, SHARD) for _ in range(3))
    a.land("s-s00000", first)
    SimilarityIndex(a.layout).sync(a.lake)
    index_a = SimilarityIndex(a.layout)  # both machines load the same index ...
    index_b = SimilarityIndex(b.layout)
    b.land("s-s00001", second)
    index_b.sync(b.lake)  # ... B syncs and publishes ...
    a.land("s-s00002", third)
    client = seaweed.client()  # a third machine's segment, uploaded, not yet named
    in_flight = "library/index/phash/seg-v0000000009-of-a-third-machine/hashes.npy"
    client.put_object(Bucket=s3_bucket, Key=in_flight, Body=b"on its way")
    synced = index_a.sync(a.lake)  # ... then A: its first publish loses, its second holds
    assert len(synced.added) == 1 and synced.images == 3 * SHARD
    assert client.get_object(Bucket=s3_bucket, Key=in_flight)["Body"].read() == b"on its way"
    client.delete_object(Bucket=s3_bucket, Key=in_flight)
    saved = _assert_whole(seaweed, s3_bucket)
    assert sorted(meta["number"] for meta in saved["segments"].values()) == [0, 1, 2]
    _assert_fresh_machine_finds(machines("fresh"), [first, second, third], monkeypatch)


def test_a_sync_that_loses_every_attempt_says_so_and_leaves_the_home_whole(
    machines, seaweed: SeaweedS3, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(similarity, "PUBLISH_ATTEMPTS", 1)
    a, b = machines("a"), machines("b")
    md5s = random_md5s(np.random.default_rng(13), SHARD)
    index_a = SimilarityIndex(a.layout)  # the home has no index yet
    b.land("s-s00000", md5s)
    SimilarityIndex(b.layout).sync(b.lake)
    with pytest.raises(IndexPublishError, match=rf"s3://{s3_bucket}/library/index/segments.json"):
        index_a.sync(a.lake)
    _assert_whole(seaweed, s3_bucket)
    _assert_fresh_machine_finds(machines("fresh"), [md5s], monkeypatch)


def test_publish_replacing_puts_only_over_the_version_read(
    tmp_path: Path, s3_env: dict[str, str], s3_bucket: str
) -> None:
    home = f"s3://{s3_bucket}/library"
    a, b = LibraryLayout(tmp_path / "a", home), LibraryLayout(tmp_path / "b", home)
    here, there = (layout.root / "index" / "state.json" for layout in (a, b))
    assert a.read_version(here) is None
    a.publish_replacing(here, "1", read=None)  # the home had none
    first = a.read_version(here)
    assert first and here.read_text() == "1"
    with pytest.raises(ConflictError, match=f"s3://{s3_bucket}/library/index/state.json"):
        b.publish_replacing(there, "2", read=None)  # it has one now
    assert not there.exists()  # the local file is left as it was
    assert b.fetch(there) and b.read_version(there) == first
    b.publish_replacing(there, "2", read=first)
    with pytest.raises(ConflictError):
        a.publish_replacing(here, "3", read=first)  # B replaced the version A read
    assert here.read_text() == "1"
    b.remove(there)
    with pytest.raises(ConflictError):
        a.publish_replacing(here, "3", read=first)  # deleted since A read it
    folder = LibraryLayout(tmp_path / "folder")
    folder.publish_replacing(folder.root / "state.json", "1", read=None)
    assert folder.read_version(folder.root / "state.json") is None
    assert (folder.root / "state.json").read_text() == "1"
