"""The hash codec: numpy, Python and DuckDB read the same hex as the same 64-bit integer."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from asset_library.search.codec import (
    as_uint64,
    hash_int,
    hex_to_int,
    hex_to_uint64,
    int_to_hex,
    sql_hex_to_ubigint,
    uint64_to_hex,
)

EDGES = [0, 1, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1]


def test_round_trip_random_and_edge_values():
    rng = np.random.default_rng(10)
    values = np.concatenate(
        [np.array(EDGES, dtype=np.uint64), rng.integers(0, 2**64, 1_000, dtype=np.uint64)]
    )
    text = uint64_to_hex(values)
    assert text[:2].tolist() == ["0000000000000000", "0000000000000001"]
    assert text[5] == "ffffffffffffffff" and text[3] == "8000000000000000"
    assert [f"{int(v):016x}" for v in values] == text.tolist()
    assert np.array_equal(hex_to_uint64(text), values)
    assert np.array_equal(hex_to_uint64([s.upper() for s in text.tolist()]), values)
    assert np.array_equal(hex_to_uint64(np.array(text.tolist(), dtype=object)), values)
    assert np.array_equal(hex_to_uint64(text.astype("S16")), values)
    assert np.array_equal(hex_to_uint64(pa.array(text.tolist())), values)
    assert np.array_equal(hex_to_uint64(text.reshape(2, -1)), values.reshape(2, -1))
    assert hex_to_uint64([]).size == 0
    for value in EDGES:
        assert hex_to_int(int_to_hex(value)) == value
        assert hex_to_int(int_to_hex(value).upper()) == value
    assert int_to_hex(-1) == "ffffffffffffffff"  # int64 -1 has every bit set


def test_int64_and_mixed_inputs_keep_the_bits():
    values = np.array(EDGES, dtype=np.uint64)
    assert np.array_equal(as_uint64(values.view(np.int64)), values)
    assert np.array_equal(as_uint64(uint64_to_hex(values)), values)
    assert np.array_equal(as_uint64(np.array([-1, 0, "8000000000000000"], dtype=object)),
                          np.array([2**64 - 1, 0, 2**63], dtype=np.uint64))  # fmt: skip
    assert hash_int(np.int64(-(2**63))) == 2**63
    assert hash_int("FFFFFFFFFFFFFFFF") == 2**64 - 1
    with pytest.raises(ValueError, match="out of the 64-bit range"):
        hash_int(2**64)
    with pytest.raises(ValueError, match="out of the 64-bit range"):
        hash_int(-(2**63) - 1)


@pytest.mark.parametrize(
    ("values", "named", "reason"),
    [
        (["0123456789abcdef", "abc"], "'abc' (value 1)", "not 16 characters"),
        (["0123456789abcdeg"], "'0123456789abcdeg' (value 0)", "not hex digits"),
        (["0123456789abcdef0"], "(value 0)", "not 16 characters"),
        (["0123456789abcdef", None], "None (value 1)", "not a string"),
        (["0123456789abcdé1"], "(value 0)", "not ASCII"),
        ([b"0123456789abcde "], "(value 0)", "not hex digits"),
    ],
)
def test_bad_hex_is_named_with_its_position(values, named, reason):
    with pytest.raises(ValueError) as caught:
        hex_to_uint64(values)
    assert named in str(caught.value) and reason in str(caught.value)


@pytest.mark.parametrize("bad", ["abc", "0x23456789abcdef", " 123456789abcdef", "é" * 16, 12])
def test_scalar_rejects_what_is_not_16_hex_digits(bad):
    with pytest.raises(ValueError, match="expected 16 hex digits"):
        hex_to_int(bad)


def test_duckdb_sql_reads_real_hashes_as_the_codec_does(corpus_dir: Path):
    """ImageHash's reference hashes of the corpus, read by DuckDB and by numpy."""
    details = str(corpus_dir / "DETAILS.tsv")
    with duckdb.connect() as connection:
        rows = connection.execute(
            f"SELECT phash, {sql_hex_to_ubigint('phash')} AS phash_int, "
            f"{sql_hex_to_ubigint('upper(dhash)')} AS dhash_int, dhash "
            "FROM read_csv(?, delim = '\t', header = true, all_varchar = true) "
            "WHERE phash IS NOT NULL ORDER BY path",
            [details],
        ).fetchnumpy()
        assert rows["phash"].size > 300
        assert np.array_equal(hex_to_uint64(rows["phash"]), rows["phash_int"].astype(np.uint64))
        assert np.array_equal(hex_to_uint64(rows["dhash"]), rows["dhash_int"].astype(np.uint64))
        assert uint64_to_hex(rows["phash_int"]).tolist() == rows["phash"].tolist()
        # DuckDB's bare cast would read these as small numbers; the codec's SQL refuses them.
        for bad in ("abc", "0123456789abcdef0"):
            with pytest.raises(duckdb.InvalidInputException, match=f"hash {bad}: expected 16"):
                connection.execute(f"SELECT {sql_hex_to_ubigint('$1')}", [bad]).fetchall()
        assert connection.execute(f"SELECT {sql_hex_to_ubigint('NULL')}").fetchall() == [(None,)]


def test_package_exports_the_codec():
    import asset_library.search as search
    from asset_library.search import codec

    assert search.hex_to_uint64 is codec.hex_to_uint64
    assert search.uint64_to_hex is codec.uint64_to_hex
    assert set(search.__all__) == {
        "HammingIndex",
        "connected_groups",
        "hex_to_uint64",
        "uint64_to_hex",
    }
