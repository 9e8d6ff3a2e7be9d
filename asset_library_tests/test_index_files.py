"""The similarity index's files as ``segments.json`` names them (:mod:`asset_library.index_files`),
and an index saved before its files had names of their own: read as it is, and moved to the new
layout by its next sync, in a folder library and at an ``s3://`` home."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from asset_library.index_files import (
    BACKOFF_S,
    backoff,
    drop_local,
    files_under,
    is_named,
    keys_name,
    manifest_names,
    named_files,
    read_saved,
    relative_name,
)
from asset_library.lake import Lake, merge_images
from asset_library.lake.scan import lake_dataset
from asset_library.layout import LibraryLayout
from asset_library.search import HammingIndex
from asset_library.similarity import HASH_KINDS, SimilarityIndex
from asset_library.storage.remote import walk
from asset_library_tests.support.synthetic import land_shard, random_md5s


def test_relative_name_keeps_a_name_inside_the_index_folder():
    assert relative_name("phash/manifest-1.json") == "phash/manifest-1.json"
    assert relative_name("keys/v0000000003-ab.npy") == "keys/v0000000003-ab.npy"
    for bad in ("", "/etc/passwd", "../x", "keys/../../x", "keys//x", "./x", "a/.hidden", "a\\b"):
        with pytest.raises(ValueError, match="is not a path inside the index folder"):
            relative_name(bad)


def test_manifest_and_keys_names_read_either_layout():
    assert manifest_names({"segments": {}}, ("phash", "dhash")) == {
        "phash": "phash/manifest.json",
        "dhash": "dhash/manifest.json",
    }
    named = {"phash": "phash/manifest-a.json", "dhash": "dhash/manifest-b.json"}
    assert manifest_names({"manifests": named}, ("phash", "dhash")) == named
    with pytest.raises(ValueError, match="not one per hash kind"):
        manifest_names({"manifests": {"phash": "phash/m.json"}}, ("phash", "dhash"))
    with pytest.raises(ValueError, match="inside the index folder"):
        manifest_names({"manifests": {"phash": "../m.json"}}, ("phash",))
    assert keys_name("v1", {"rows": 3}) == "keys/v1.npy"
    assert keys_name("v1", {"keys": "keys/v1-x.npy"}) == "keys/v1-x.npy"


def test_named_files_are_what_segments_json_and_its_manifests_name(tmp_path: Path):
    rng = np.random.default_rng(2)
    index = HammingIndex(np.arange(50, dtype=np.int64), rng.integers(0, 2**63, 50, np.uint64))
    index.save(tmp_path / "phash", manifest="manifest-x.json")
    (segment,) = (p.name for p in (tmp_path / "phash").iterdir() if p.is_dir())
    saved = {
        "segments": {"v1": {"number": 0, "rows": 50, "keys": "keys/v1-y.npy"}},
        "manifests": {"phash": "phash/manifest-x.json"},
    }
    assert named_files(tmp_path, saved, ("phash",)) == {
        "keys/v1-y.npy",
        "phash/manifest-x.json",
        f"phash/{segment}",
    }
    # As much as can be read: a bad name or an unreadable manifest is left out.
    saved["segments"]["v2"] = {"keys": "../outside.npy"}
    (tmp_path / "phash" / "manifest-x.json").write_text("{")
    assert named_files(tmp_path, saved, ("phash",)) == {"keys/v1-y.npy", "phash/manifest-x.json"}
    assert named_files(tmp_path, {}, ("phash",)) == set()


def test_read_saved_is_empty_for_a_missing_or_unreadable_segments_json(tmp_path: Path):
    path = tmp_path / "segments.json"
    assert read_saved(path) == {}
    path.write_text('{"segments": ')
    assert read_saved(path) == {}
    path.write_text("[1, 2]")
    assert read_saved(path) == {}
    path.write_text('{"segments": {}}')
    assert read_saved(path) == {"segments": {}}


def test_is_named_covers_the_files_inside_a_named_folder():
    named = {"phash/seg-a", "keys/v1.npy"}
    assert is_named("phash/seg-a/hashes.npy", named)
    assert is_named("keys/v1.npy", named)
    assert not is_named("phash/seg-ab/hashes.npy", named)
    assert not is_named("phash/manifest-z.json", named)


def test_files_under_and_drop_local_take_files_and_folders(tmp_path: Path):
    (tmp_path / "phash" / "seg-a").mkdir(parents=True)
    for name in ("phash/seg-a/ids.npy", "phash/seg-a/.tmp-x", "keys/v1.npy"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = files_under(tmp_path, {"phash/seg-a", "keys/v1.npy", "keys/missing.npy"})
    assert found == [tmp_path / "keys/v1.npy", tmp_path / "phash/seg-a/ids.npy"]
    drop_local(tmp_path, {"phash/seg-a", "keys/v1.npy", "keys/missing.npy"})
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keys", "phash"]


def test_backoff_doubles_and_jitters():
    for attempt in range(4):
        waits = {backoff(attempt) for _ in range(50)}
        low, high = BACKOFF_S * 2**attempt * 0.5, BACKOFF_S * 2**attempt
        assert all(low <= wait <= high for wait in waits) and len(waits) > 1


def _to_old_layout(directory: Path) -> set[str]:
    """Rewrite a saved index as it was saved before its files had names of their own: each
    kind's ``manifest.json``, ``keys/<segment>.npy``, and a ``segments.json`` naming neither.
    The old names are returned."""
    path = directory / "segments.json"
    saved = json.loads(path.read_text())
    for kind, manifest in saved.pop("manifests").items():
        (directory / manifest).rename(directory / kind / "manifest.json")
    for segment, meta in saved["segments"].items():
        (directory / meta.pop("keys")).rename(directory / "keys" / f"{segment}.npy")
    path.write_text(json.dumps(saved))
    return {f"{kind}/manifest.json" for kind in HASH_KINDS} | {
        f"keys/{segment}.npy" for segment in saved["segments"]
    }


@pytest.mark.parametrize("home", ["folder", "s3"])
def test_an_index_of_the_old_layout_is_read_then_moved_to_the_new_one(
    home: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
):
    if home == "s3":
        request.getfixturevalue("s3_env")
        bucket = request.getfixturevalue("s3_bucket")
        monkeypatch.setenv("ASSET_LIBRARY_CACHE", str(tmp_path / "first"))
        layout = LibraryLayout.open(f"s3://{bucket}/library", 16)
    else:
        layout = LibraryLayout.open(tmp_path / "library", 16)
    lake = Lake.of(layout)
    rng = np.random.default_rng(4)
    first, second = random_md5s(rng, 20), random_md5s(rng, 20)
    land_shard(layout, lake, "s-s00000", first)
    merge_images(lake)
    SimilarityIndex(layout).sync(lake)
    old = _to_old_layout(layout.index_dir)
    if layout.remote is not None:  # the home holds the old layout, and nothing else
        remote = layout.remote
        remote.delete(list(remote.listing(layout.index_dir)))
        for path in walk(layout.index_dir):
            remote.publish(path)
        monkeypatch.setenv("ASSET_LIBRARY_CACHE", str(tmp_path / "second"))
        layout = LibraryLayout.at(layout.home)  # a machine that holds nothing yet
        lake = Lake.of(layout)

    index = SimilarityIndex(layout)
    assert index.damage is None and len(index) == 20
    images = lake.open("images")
    assert images is not None
    rows = lake_dataset(images, lake).to_table(columns=["md5", "phash"]).to_pylist()
    phash = {r["md5"]: r["phash"] for r in rows}
    assert index.query(int(phash[first[0]], 16), 0) == [(first[0], 0)]

    land_shard(layout, lake, "s-s00001", second)
    merge_images(lake)
    index.sync(lake)
    saved = json.loads(layout.segments_manifest_path.read_text())
    assert set(saved["manifests"]) == set(HASH_KINDS)
    kept = {meta["keys"] for meta in saved["segments"].values()}
    assert {name for name in old if name.startswith("keys/")} <= kept  # the old keys files
    here = {p.relative_to(layout.index_dir).as_posix() for p in walk(layout.index_dir)}
    assert not {f"{kind}/manifest.json" for kind in HASH_KINDS} & here
    if layout.remote is not None:
        listed = layout.remote.listing(layout.index_dir)
        at_home = {p.relative_to(layout.index_dir).as_posix() for p in listed}
        assert not {f"{kind}/manifest.json" for kind in HASH_KINDS} & at_home
    fresh = SimilarityIndex(layout)
    assert fresh.damage is None and len(fresh) == 40
