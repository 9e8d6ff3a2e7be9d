"""The merge's key cache: the md5s ``images`` holds, as sorted digests on local disk."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from asset_library import Library
from asset_library.lake import compact, merge_images
from asset_library.lake.keyset import MANIFEST, ImageKeys, digests, md5_text
from asset_library_tests.support.synthetic import land_shard, random_md5s
from asset_library_tests.test_lake import _counts_are_true, _library


def test_digests_order_as_the_text_and_name_a_bad_key():
    md5s = sorted(random_md5s(np.random.default_rng(3), 2000) + ["0" * 32, "f" * 32])
    found = digests(pa.chunked_array([md5s[:700], md5s[700:]]))
    pairs = list(zip(found[0].tolist(), found[1].tolist(), strict=True))
    assert pairs == sorted(pairs)
    assert [f"{high:016x}{low:016x}" for high, low in pairs] == md5s
    assert digests(pa.array(md5s[5:9]).cast(pa.string_view())).shape == (2, 4)
    assert digests(pa.array([], pa.string())).shape == (2, 0)
    with pytest.raises(ValueError, match="'abc': not 32 hexadecimal digits"):
        digests(pa.array([md5s[0], "abc"]))
    with pytest.raises(ValueError, match=f"'{'g' * 32}'"):
        digests(pa.array([md5s[0], "g" * 32]))
    with pytest.raises(ValueError, match="' a"):  # bytes.fromhex would skip the space
        digests(pa.array([md5s[0], " " + "a" * 31, md5s[1]]))


def _level(cached: int, merge: str) -> bool:
    return True


def _cached(keys: ImageKeys, version: int, rows: int):
    found = keys.level_with("table", version, _level, rows)
    assert found is not None
    return found


def test_runs_merge_like_a_binary_counter_and_answer_exactly(tmp_path):
    keys = ImageKeys(tmp_path / "keys")
    rng = np.random.default_rng(4)
    # md5s that share their high half (what a search by it alone would confuse)
    twins = ["a" * 16 + f"{i:016x}" for i in (9, 3, 7)]
    added = [twins[:2] + random_md5s(rng, 298), *(random_md5s(rng, 100) for _ in range(4))]
    outside = [twins[2], *random_md5s(rng, 500)]
    keys.rebuild(digests(pa.array(added[0])), "table", 0, "m0")
    sizes = []
    for version, md5s in enumerate(added[1:], start=1):
        keys.add(digests(pa.array(md5s)), "table", version, f"m{version}")
        sizes.append([run.rows for run in _cached(keys, version, 300 + 100 * version).runs])
    # runs of equal size merge: 100 + 100 -> 200, then 200 + 100 + 100 -> 400 -> 700
    assert sizes == [[300, 100], [300, 200], [300, 200, 100], [700]]
    on_disk = {p.name for p in (tmp_path / "keys").iterdir()} - {MANIFEST}
    assert on_disk == {run.file for run in _cached(keys, 4, 700).runs}  # merged runs are removed
    held = _cached(keys, 4, 700).held(pa.array([m for batch in added for m in batch] + outside))
    assert held.tolist() == [True] * 700 + [False] * len(outside)
    keys.clear()
    assert keys.level_with("table", 4, _level, 700) is None
    assert not list((tmp_path / "keys").iterdir())


def test_the_cache_is_trusted_only_level_with_its_table(tmp_path):
    keys = ImageKeys(tmp_path)
    keys.rebuild(digests(pa.array(random_md5s(np.random.default_rng(5), 10))), "table", 3, "m3")
    asked = []

    def check(cached: int, merge: str) -> bool:
        asked.append((cached, merge))
        return True

    assert keys.level_with("table", 3, check, 10) is not None
    assert keys.level_with("table", 5, check, 10) is not None  # later commits: as check says
    assert asked == [(3, "m3"), (3, "m3")]
    assert keys.level_with("table", 5, lambda cached, merge: False, 10) is None
    assert keys.level_with("another table", 3, check, 10) is None
    assert keys.level_with("table", 2, check, 10) is None  # older than the cache
    (tmp_path / MANIFEST).write_text("{not json")
    assert keys.level_with("table", 3, check, 10) is None


def test_a_rebuild_or_a_clear_leaves_no_file_the_cache_does_not_name(tmp_path):
    """What a merge killed while keeping the cache leaves behind (a run, a half-written file)."""
    keys = ImageKeys(tmp_path)
    rng = np.random.default_rng(8)
    keys.rebuild(digests(pa.array(random_md5s(rng, 10))), "table", 1, "m1")
    (tmp_path / "run-left-by-a-killed-merge.npy").write_bytes(b"x")
    (tmp_path / ".run-half-written.npy.0123abcd.tmp").write_bytes(b"x")
    keys.rebuild(digests(pa.array(random_md5s(rng, 10))), "table", 2, "m2")
    assert len(list(tmp_path.iterdir())) == 2  # the manifest and its one run
    (tmp_path / "run-left-by-a-killed-merge.npy").write_bytes(b"x")
    keys.clear()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("manifest", ["[1, 2]", '{"runs": [{"file": 1}]}', '{"runs": 5}'])
def test_a_clear_of_a_damaged_manifest_leaves_nothing(tmp_path, manifest: str):
    keys = ImageKeys(tmp_path)
    keys.rebuild(digests(pa.array(random_md5s(np.random.default_rng(9), 5))), "t", 1, "m")
    (tmp_path / MANIFEST).write_text(manifest)
    keys.clear()
    assert not list(tmp_path.iterdir())


def test_keys_are_read_chunk_by_chunk_past_two_gigabytes_of_text():
    """65 chunks of 1M md5s: 2.08 GB of text, which one Arrow string array cannot hold."""
    chunk = pa.array(random_md5s(np.random.default_rng(9), 1 << 20))
    text = md5_text(pa.chunked_array([chunk] * 65))
    assert len(text) == 65 << 20 and text[-1].decode() == chunk[-1].as_py()
    found = digests(pa.chunked_array([chunk[:10], chunk[10:20]]))
    assert np.array_equal(found, digests(chunk[:20]))


def _manifest(lake) -> dict:
    return json.loads((lake.image_keys / MANIFEST).read_text())


def test_merges_with_the_cache_agree_with_the_table_and_never_trust_a_stale_one(tmp_path):
    layout, lake = _library(tmp_path / "library")
    uncached = dataclasses.replace(lake, image_keys=None)
    rng = np.random.default_rng(6)
    first = random_md5s(rng, 300)
    land_shard(layout, lake, "k-s00000", first)
    assert merge_images(lake).inserted == 300
    assert _manifest(lake)["version"] == lake.open("images").version()
    # a merge that does not keep the cache moves images past it
    second = first[:40] + random_md5s(rng, 200)
    land_shard(layout, lake, "k-s00001", second)
    assert merge_images(uncached).inserted == 200
    # so the next merge reads the table: second's new md5s are known, not appended again
    third = second[50:90] + first[100:110] + random_md5s(rng, 60)
    land_shard(layout, lake, "k-s00002", third)
    merged = merge_images(lake)
    assert (merged.inserted, merged.updated, merged.duplicated_md5s) == (60, 50, 0)
    (rebuilt,) = _manifest(lake)["runs"]
    assert rebuilt["rows"] == 560
    _counts_are_true(Library(layout.root))
    # a compaction rewrites rows as they were and its vacuum removes the files it replaced:
    # neither changes a row, so the cache stays level and answers alone
    compact(lake, fan_in=1, retention_hours=0)
    operations = {h["operation"] for h in lake.open("images").history(3)}
    assert operations == {"WRITE", "VACUUM START", "VACUUM END"}
    fourth = third[:20] + random_md5s(rng, 30)
    land_shard(layout, lake, "k-s00003", fourth)
    merged = merge_images(lake)
    assert (merged.inserted, merged.updated, merged.duplicated_md5s) == (30, 20, 0)
    assert [run["rows"] for run in _manifest(lake)["runs"]] == [560, 30]
    assert _manifest(lake)["runs"][0] == rebuilt  # added to, not rebuilt
    library = Library(layout.root)
    _counts_are_true(library)
    assert library.query("SELECT count(*) AS n FROM images")[0]["n"] == 590
    # md5s that leave images (a shard replaced) clear it; the merge after rebuilds it
    land_shard(layout, lake, "k-s00003", fourth[:20])
    assert merge_images(lake).deleted == 30
    assert not (lake.image_keys / MANIFEST).exists()
    land_shard(layout, lake, "k-s00004", fourth[20:25] + first[:5] + random_md5s(rng, 7))
    merged = merge_images(lake)
    assert (merged.inserted, merged.updated) == (5 + 7, 5)
    assert [run["rows"] for run in _manifest(lake)["runs"]] == [560 + 12]
    _counts_are_true(Library(layout.root))


def test_a_cache_of_another_lake_is_not_trusted(tmp_path):
    """Two libraries' lakes at the same versions: the cache names the table it describes."""
    layout, lake = _library(tmp_path / "one")
    other_layout, other = _library(tmp_path / "two")
    rng = np.random.default_rng(7)
    shared = random_md5s(rng, 50)
    land_shard(layout, lake, "t-s00000", shared + random_md5s(rng, 50))
    merge_images(lake)
    land_shard(other_layout, other, "t-s00000", random_md5s(rng, 100))
    merge_images(dataclasses.replace(other, image_keys=lake.image_keys))  # a wrong folder
    land_shard(layout, lake, "t-s00001", shared)
    merged = merge_images(lake)
    assert (merged.inserted, merged.updated, merged.duplicated_md5s) == (0, 50, 0)


def test_a_lake_restored_from_a_copy_is_not_trusted(tmp_path):
    """The same table at the cache's version again, but not the commit the cache followed: a
    copy restored, then compacted (a rewrite) back up to that version."""
    layout, lake = _library(tmp_path / "library")
    rng = np.random.default_rng(10)
    a, b = random_md5s(rng, 100), random_md5s(rng, 100)
    land_shard(layout, lake, "r-s00000", a)
    merge_images(lake)
    shutil.copytree(lake.location, tmp_path / "backup")
    land_shard(layout, lake, "r-s00001", b)
    merge_images(lake)
    cached = _manifest(lake)["version"]
    shutil.rmtree(lake.location)
    shutil.copytree(tmp_path / "backup", lake.location)
    compact(lake, fan_in=1)
    assert lake.open("images").version() == cached
    land_shard(layout, lake, "r-s00001", b)
    merged = merge_images(lake)
    assert (merged.inserted, merged.updated) == (100, 0)
    assert Library(layout.root).query("SELECT count(*) AS n FROM images")[0]["n"] == 200
