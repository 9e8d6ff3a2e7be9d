"""Exact recall of the Hamming index against brute force, for every layout and path.

The index is only useful if it never misses a near-duplicate, so every answer is compared with
a full scan: probed bands at d <= 8 (and above), the scan fallback at large d, structured
pHash-like hashes whose bands are skewed, segments added, replaced, removed, saved, loaded and
compacted, and the all-pairs self-join.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from asset_library.search import HammingIndex, connected_groups
from asset_library.search.index import new_manifest_name, saved_dirs

N = 200_000
N_QUERIES = 12
PLANTED = range(0, 13)
DISTANCES = [*range(0, 9), 10, 12, 16, 24]


def phash_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """Top bit 1 and exactly 32 ones, uniformly otherwise (ImageHash pHash's structure)."""
    h = np.full(n, np.uint64(1) << np.uint64(63))
    need = np.full(n, 31)
    for left, bit in zip(range(63, 0, -1), range(62, -1, -1), strict=True):
        take = rng.random(n) * left < need
        need -= take
        h |= take.astype(np.uint64) << np.uint64(bit)
    return h


def flip(rng: np.random.Generator, q: int, dist: int, structured: bool) -> int:
    """A neighbour at exactly ``dist`` bits (structured: swap ones and zeros, keep 32 ones)."""
    if not structured:
        return q ^ sum(1 << int(b) for b in rng.choice(64, dist, replace=False))
    ones = [b for b in range(63) if q >> b & 1]
    zeros = [b for b in range(63) if not q >> b & 1]
    k = dist // 2
    bits = [*rng.choice(ones, k, replace=False), *rng.choice(zeros, k, replace=False)]
    return q ^ sum(1 << int(b) for b in bits)


def planted(seed: int, n: int, structured: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, hashes, queries): two neighbours at every distance 0..12 of each query."""
    rng = np.random.default_rng(seed)
    hashes = phash_like(rng, n) if structured else rng.integers(0, 2**64, n, dtype=np.uint64)
    queries = (
        phash_like(rng, N_QUERIES)
        if structured
        else rng.integers(0, 2**64, N_QUERIES, dtype=np.uint64)
    )
    rows = rng.choice(n, N_QUERIES * len(PLANTED) * 2, replace=False)
    k = 0
    for q in queries.tolist():
        for dist in PLANTED:
            for _ in range(2):
                hashes[rows[k]] = flip(rng, q, dist, structured)
                k += 1
    ids = rng.permutation(n).astype(np.int64) * 3 + 1_000  # not row numbers, not sorted
    return ids, hashes, queries


def brute(ids: np.ndarray, hashes: np.ndarray, q: int, d: int) -> list[tuple[int, int]]:
    dist = np.bitwise_count(hashes ^ np.uint64(q))
    hit = np.flatnonzero(dist <= d)
    return sorted(zip(ids[hit].tolist(), dist[hit].tolist(), strict=True), key=lambda t: t[::-1])


def brute_pairs(ids: np.ndarray, hashes: np.ndarray, d: int) -> np.ndarray:
    out = []
    for i in range(0, hashes.size, 1024):
        dist = np.bitwise_count(hashes[i : i + 1024, None] ^ hashes[None, :])
        a, b = np.nonzero(dist <= d)
        a = a + i
        keep = ids[a] < ids[b]
        out.append(np.stack([ids[a][keep], ids[b][keep], dist[a[keep] - i, b[keep]]], axis=1))
    pairs = np.concatenate(out).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def assert_exact(index: HammingIndex, ids, hashes, queries, distances=DISTANCES) -> None:
    """Columnar answers for every query; the list API where answers are small."""
    for d in distances:
        qi, got_ids, got_dist = index.query_arrays(queries, d)
        for i, q in enumerate(queries.tolist()):
            dist = np.bitwise_count(hashes ^ np.uint64(q))
            hit = np.flatnonzero(dist <= d)
            order = np.lexsort((ids[hit], dist[hit]))
            sel = qi == i
            assert np.array_equal(got_ids[sel], ids[hit][order]), f"ids d={d} query {i}"
            assert np.array_equal(got_dist[sel], dist[hit][order]), f"distances d={d} query {i}"
        if d <= 12:
            expected = [brute(ids, hashes, q, d) for q in queries.tolist()]
            assert index.query_many(queries, d) == expected, f"query_many d={d}"
            for q, exp in zip(queries[:4].tolist(), expected, strict=False):
                assert index.query(q, d) == exp, f"query d={d}"


@pytest.fixture(scope="module")
def random_data():
    return planted(1, N, structured=False)


@pytest.fixture(scope="module")
def phash_data():
    return planted(2, N, structured=True)


@pytest.mark.parametrize("bands", [None, 3, 4, 5])
def test_query_exact_on_random_hashes(random_data, bands):
    ids, hashes, queries = random_data
    index = HammingIndex(ids, hashes, bands=bands)
    info = index.describe()["main"]
    if bands is not None:
        assert len(info["widths"]) == bands and sum(info["widths"]) == 64
    for d in range(0, 9):  # d <= 8 is answered by band probes, not by a scan
        assert index.describe(d)["main"]["radii"] is not None
    assert index.describe(40)["main"]["radii"] is None  # the exact scan fallback
    assert_exact(index, ids, hashes, queries)
    if bands is None:
        assert_exact(index, ids, hashes, queries[:2], [32, 40, 64])


@pytest.mark.parametrize("bands", [None, 3, 4])
def test_query_exact_on_structured_phash(phash_data, bands):
    ids, hashes, queries = phash_data
    index = HammingIndex(ids, hashes, bands=bands)
    info = index.describe()["main"]
    assert info["constant_bits"] == 1 and sum(info["widths"]) == 63
    assert_exact(index, ids, hashes, queries, [*range(0, 13), 20])
    # Queries that break the structure differ from the constant bit too.
    rng = np.random.default_rng(3)
    odd = np.concatenate(
        [queries ^ (np.uint64(1) << np.uint64(63)), rng.integers(0, 2**63, 4, dtype=np.uint64)]
    )
    assert_exact(index, ids, hashes, odd, [0, 1, 3, 5, 8, 11, 13])


def test_heavy_buckets_and_degenerate_segments():
    rng = np.random.default_rng(4)
    distinct = rng.integers(0, 2**64, 500, dtype=np.uint64)
    hashes = distinct[rng.integers(0, 500, 50_000)]  # every hash ~100 times: huge buckets
    ids = np.arange(hashes.size, dtype=np.int64)
    queries = np.concatenate([distinct[:5], distinct[:5] ^ np.uint64(0b1011)])
    for bands in (None, 3, 5):
        assert_exact(HammingIndex(ids, hashes, bands=bands), ids, hashes, queries, [0, 3, 8, 20])
    same = np.full(1_000, 0xDEADBEEF, dtype=np.uint64)  # no free bit at all
    index = HammingIndex(np.arange(1_000), same)
    assert index.describe()["main"]["constant_bits"] == 64
    assert_exact(index, np.arange(1_000), same, queries[:3] ^ np.uint64(0xDEADBEEF), [0, 4, 64])
    assert index.query(0xDEADBEEF, 0, limit=3) == [(0, 0), (1, 0), (2, 0)]
    empty = HammingIndex()
    assert empty.query(0, 64) == [] and empty.query_many([1, 2], 3) == [[], []]
    assert len(empty.pairs_within(3)) == 0
    empty.add_segment("nothing", np.zeros(0, np.int64), np.zeros(0, np.uint64))
    assert empty.query(5, 10) == [] and len(empty) == 0


def test_query_inputs():
    hashes = np.array([0, 1, 2**64 - 1, 2**63], dtype=np.uint64)
    index = HammingIndex(np.arange(4), hashes)
    assert index.query(-1, 0) == [(2, 0)]  # int64 -1 is the all-ones hash
    assert index.query("ffffffffffffffff", 0) == [(2, 0)]
    assert index.query(0, 1) == [(0, 0), (1, 1), (3, 1)]
    assert index.query(0, 1, limit=2) == [(0, 0), (1, 1)]
    assert index.query_many(hashes.view(np.int64), 0) == [[(0, 0)], [(1, 0)], [(2, 0)], [(3, 0)]]
    assert len(index.query(12345, 64)) == 4 and len(index.query(12345, 1000)) == 4
    with pytest.raises(ValueError):
        index.query(0, -1)
    with pytest.raises(ValueError):
        index.query(2**64, 3)
    with pytest.raises(ValueError):
        HammingIndex(np.arange(3), hashes)


def test_segments_add_replace_remove_save_load_compact(random_data, tmp_path: Path):
    ids, hashes, queries = random_data
    cuts = [0, 150_000, 180_000, 195_000, 199_000, 199_000, N]  # unequal: several layouts
    names = [f"shard-{k}" for k in range(len(cuts) - 1)]
    index = HammingIndex()
    for name, a, b in zip(names, cuts, cuts[1:], strict=False):
        index.add_segment(name, ids[a:b], hashes[a:b])
    layouts = {tuple(info["widths"]) for info in index.describe().values()}
    assert len(layouts) >= 3  # big shards probe wide bands, small ones narrower, tiny ones scan
    distances = [0, 2, 4, 6, 8, 12, 30]
    assert_exact(index, ids, hashes, queries, distances)

    # A re-ingested shard replaces its segment; removing one drops exactly its rows.
    rng = np.random.default_rng(5)
    new_hashes = hashes.copy()
    new_hashes[150_000:180_000] = rng.integers(0, 2**64, 30_000, dtype=np.uint64)
    new_hashes[150_000:150_010] = queries[:10] ^ np.uint64(0b111)
    index.add_segment("shard-1", ids[150_000:180_000], new_hashes[150_000:180_000])
    assert_exact(index, ids, new_hashes, queries, distances)
    index.remove_segment("shard-3")
    keep = np.r_[0:195_000, 199_000:N]
    assert_exact(index, ids[keep], new_hashes[keep], queries, distances)
    with pytest.raises(KeyError):
        index.remove_segment("shard-3")

    # Save, load memory-mapped: same answers.
    index.save(tmp_path)
    dirs = {
        e["name"]: e["dir"]
        for e in json.loads((tmp_path / "manifest.json").read_text())["segments"]
    }
    assert sorted(dirs) == sorted(index.segments())
    loaded = HammingIndex.load(tmp_path)
    assert isinstance(loaded._segments["shard-0"].hashes, np.memmap)
    assert_exact(loaded, ids[keep], new_hashes[keep], queries, distances)

    # Saving after adding one segment writes only that segment; removed segments' files go.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / dirs["shard-0"]).iterdir()}
    loaded.add_segment("shard-3", ids[195_000:199_000], new_hashes[195_000:199_000])
    loaded.remove_segment("shard-4")
    loaded.save(tmp_path)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / dirs["shard-0"]).iterdir()}
    assert before == after
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    new_dirs = {e["name"]: e["dir"] for e in manifest["segments"]}
    assert new_dirs["shard-0"] == dirs["shard-0"] and "shard-4" not in new_dirs
    assert not (tmp_path / dirs["shard-4"]).exists()
    on_disk = {p.name for p in tmp_path.iterdir() if p.is_dir()}
    assert on_disk == set(new_dirs.values())
    reloaded = HammingIndex.load(tmp_path, mmap=False)
    assert_exact(reloaded, ids, new_hashes, queries, distances)

    reloaded.compact()
    assert list(reloaded.segments()) == ["main"] and len(reloaded) == N
    assert_exact(reloaded, ids, new_hashes, queries, distances)


def test_an_index_saved_under_manifests_of_their_own_writes_each_file_once(tmp_path: Path):
    rng = np.random.default_rng(8)
    hashes = rng.integers(0, 2**64, 300, dtype=np.uint64)
    index = HammingIndex()
    index.add_segment("a", np.arange(200, dtype=np.int64), hashes[:200])
    first = new_manifest_name()
    assert first.startswith("manifest-") and first.endswith(".json")
    assert first != new_manifest_name()
    index.save(tmp_path, manifest=first)
    (only,) = saved_dirs(tmp_path, first)
    written = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    # The next save writes the new segment and a new manifest; nothing written is touched.
    index.add_segment("b", np.arange(200, 300, dtype=np.int64), hashes[200:])
    second = new_manifest_name()
    index.save(tmp_path, manifest=second)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name in written} == (
        written
    )
    dirs = saved_dirs(tmp_path, second)
    assert only in dirs and len(dirs) == 2 and saved_dirs(tmp_path, first) == [only]
    loaded = HammingIndex.load(tmp_path, manifest=second)
    assert loaded.segments() == {"a": 200, "b": 100}
    assert HammingIndex.load(tmp_path, manifest=first).segments() == {"a": 200}
    assert saved_dirs(tmp_path, "manifest-none.json") == []

    # A manifest names folders of its own directory only.
    saved = json.loads((tmp_path / second).read_text())
    saved["segments"][0]["dir"] = "../elsewhere"
    (tmp_path / second).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="'../elsewhere' is not a file name"):
        saved_dirs(tmp_path, second)
    with pytest.raises(ValueError, match="'../elsewhere' is not a file name"):
        HammingIndex.load(tmp_path, manifest=second)
    with pytest.raises(ValueError, match="is not a file name"):
        index.save(tmp_path, manifest="../manifest.json")


def planted_pairs(seed: int, n: int, structured: bool) -> tuple[np.ndarray, np.ndarray]:
    """Random hashes plus clusters of near-duplicates at distances 0..12 (and chains)."""
    rng = np.random.default_rng(seed)
    hashes = phash_like(rng, n) if structured else rng.integers(0, 2**64, n, dtype=np.uint64)
    for start in range(0, n // 3, 13):
        for k in range(1, 13):  # a star: row start + k at distance k from row start
            hashes[start + k] = flip(rng, int(hashes[start]), k, structured)
    return rng.permutation(n).astype(np.int64), hashes


@pytest.mark.parametrize("structured", [False, True])
def test_pairs_within_equals_brute_force(structured):
    ids, hashes = planted_pairs(6 + structured, 3_000, structured)
    expected_all = brute_pairs(ids, hashes, 12)
    index = HammingIndex(ids, hashes)
    forced = {bands: HammingIndex(ids, hashes, bands=bands) for bands in (3, 4, 5, 7)}
    segmented = HammingIndex()
    for k, part in enumerate(np.array_split(np.arange(ids.size), 4)):
        segmented.add_segment(str(k), ids[part], hashes[part])
    for d in range(0, 13):
        expected = expected_all[expected_all[:, 2] <= d]
        assert np.array_equal(index.pairs_within(d), expected), d
        assert np.array_equal(segmented.pairs_within(d), expected), d
        for bands, forced_index in forced.items():  # the band self-join, whatever the model says
            assert np.array_equal(forced_index.pairs_within(d, bands=bands), expected), (d, bands)


def test_pairs_within_with_full_buckets():
    # 12k structured hashes in 4-6 narrow bands: buckets hold many rows each.
    ids, hashes = planted_pairs(8, 12_000, structured=True)
    expected_all = brute_pairs(ids, hashes, 8)
    forced = {bands: HammingIndex(ids, hashes, bands=bands) for bands in (4, 6)}
    for d in (0, 2, 4, 6, 8):
        expected = expected_all[expected_all[:, 2] <= d]
        for bands, index in forced.items():
            assert np.array_equal(index.pairs_within(d, bands=bands), expected), (d, bands)
        assert np.array_equal(forced[4].pairs_within(d), expected), d


def test_groups_from_pairs_within(random_data):
    ids, hashes, queries = random_data
    index = HammingIndex(ids, hashes)
    groups = connected_groups(index.pairs_within(4), ids)
    # Each query's planted neighbours within 2 bits of the query are within 4 of each other.
    for q in queries.tolist():
        near = {i for i, _ in index.query(q, 2)}
        assert any(near <= set(g.tolist()) for g in groups)


def test_hashes_of_reads_each_ids_hash_across_segments(tmp_path: Path):
    rng = np.random.default_rng(7)
    hashes = rng.integers(0, 2**64, 500, dtype=np.uint64)
    ids = rng.permutation(10_000)[:500].astype(np.int64)  # unique, unordered, gaps between
    index = HammingIndex()
    index.add_segment("a", ids[:300], hashes[:300])
    index.add_segment("b", ids[300:], hashes[300:])
    wanted = rng.permutation(500)[:80]
    assert np.array_equal(index.hashes_of(ids[wanted]), hashes[wanted])
    index.save(tmp_path / "index")
    loaded = HammingIndex.load(tmp_path / "index")
    assert np.array_equal(loaded.hashes_of(ids[wanted]), hashes[wanted])
    absent = int(np.setdiff1d(np.arange(10_001), ids)[0])
    with pytest.raises(KeyError, match=f"id {absent} is not in the index"):
        index.hashes_of(np.array([ids[0], absent]))
    assert index.hashes_of(np.array([], dtype=np.int64)).size == 0
