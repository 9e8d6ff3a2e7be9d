"""Manifest values are kept exactly as written, whatever the format, size or encoding."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asset_library.ingest.sources import ManifestError, iter_manifest
from asset_library.lake import value_type_of
from asset_library.library import Library

FOREST = "github_jenssegers_imagehash/forest"


def test_csv_cells_reach_the_library_as_written(run_cli, tmp_path, corpus_dir):
    batch = tmp_path / "batch"
    shutil.copytree(corpus_dir / FOREST, batch)
    big = "x" * (1024 * 1024 + 10)  # one cell over 1 MB
    header = b"uri,zip,ratio,big_number,missing,nothing,score,count,flag,city,empty,note\n"
    rows = [
        b"forest-low.jpg,02134,1.10,1e5,NA,null,3.5,42,true,caf\xe9,,small\n",
        b'forest-high.jpg,10001,0.5,-7,n/a,NULL,2.25,0,false,Z\xc3\xbcrich,"",'
        + big.encode()
        + b"\n",
    ]
    (batch / "manifest.csv").write_bytes(header + b"".join(rows))

    code, out, err = run_cli("ingest", str(batch / "manifest.csv"))
    assert code == 0, err
    library = Library(tmp_path / "library")
    found = library.query("SELECT source_uri FROM images_with_attribute('zip', '02134')")
    assert [Path(r["source_uri"]).name for r in found] == ["forest-low.jpg"]

    rows = library.query(
        "SELECT o.source_uri, a.attribute, a.value, a.value_type "
        "FROM attributes a JOIN occurrences o USING (md5) WHERE a.origin = 'manifest'"
    )
    low = {
        r["attribute"]: (r["value"], r["value_type"])
        for r in rows
        if r["source_uri"].endswith("forest-low.jpg")
    }
    assert low == {
        "zip": ("02134", "string"),
        "ratio": ("1.10", "string"),
        "big_number": ("1e5", "string"),
        "missing": ("NA", "string"),
        "nothing": ("null", "string"),
        "score": ("3.5", "double"),
        "count": ("42", "integer"),
        "flag": ("true", "boolean"),
        "city": ("caf\ufffd", "string"),  # a latin-1 byte, replaced, never b'caf\xe9'
        "note": ("small", "string"),
    }  # the empty cell is no value
    high = {r["attribute"]: r["value"] for r in rows if r["source_uri"].endswith("high.jpg")}
    assert high["note"] == big and high["city"] == "Z\u00fcrich" and high["nothing"] == "NULL"
    assert "empty" not in high


def test_a_csv_column_turning_to_text_late_is_still_read(tmp_path):
    manifest = tmp_path / "late.csv"
    lines = ["uri,code"] + [f"s3://bkt/{n}.jpg,{n}" for n in range(150_000)] + ["s3://bkt/x.jpg,X1"]
    manifest.write_text("\n".join(lines) + "\n")  # ~3.5 MB: the text comes blocks later
    items = list(iter_manifest(str(manifest)))
    assert len(items) == 150_001
    assert items[7].extras == {"code": "7"} and items[-1].extras == {"code": "X1"}


def test_jsonl_keys_are_the_union_and_values_keep_their_text(tmp_path):
    manifest = tmp_path / "batch.jsonl"
    lines = [
        b'{"uri": "s3://bkt/1.jpg", "label": "cat", "score": 1}',
        b'{"uri": "s3://bkt/2.jpg", "label": "dog", "score": "high", "late": "only here"}',
        b'{"uri": "s3://bkt/3.jpg", "score": {"a": [1, 2.5]}, "flag": true, "none": null}',
        b'{"uri": "s3://bkt/4.jpg", "label": "caf\xe9", "zip": "02134"}',
    ]
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    extras = [item.extras for item in iter_manifest(str(manifest))]
    assert extras == [
        {"label": "cat", "score": "1"},
        {"label": "dog", "score": "high", "late": "only here"},
        {"score": '{"a": [1, 2.5]}', "flag": "true"},
        {"label": "caf\ufffd", "zip": "02134"},
    ]


def test_parquet_values_are_rendered_as_text(tmp_path):
    manifest = tmp_path / "batch.parquet"
    table = pa.table(
        {
            "uri": ["s3://bkt/1.jpg", "s3://bkt/2.jpg"],
            "count": pa.array([7, None], pa.int64()),
            "ratio": [1.5, 0.1],
            "ok": [True, False],
            "at": pa.array([datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), None]),
            "zip": ["02134", ""],
            "price": pa.array([Decimal("1.10"), None], pa.decimal128(5, 2)),
        }
    )
    pq.write_table(table, manifest)
    extras = [item.extras for item in iter_manifest(str(manifest))]
    assert extras == [
        {
            "count": "7",
            "ratio": "1.5",
            "ok": "true",
            "at": "2026-01-02 03:04:05+00:00",
            "zip": "02134",
            "price": "1.10",
        },
        {"ratio": "0.1", "ok": "false"},
    ]


def _write_parquet_with_repeated_tag(path: Path) -> None:
    names = ["uri", "tag", "tag"]
    columns = [pa.array(["s3://bkt/1.jpg"]), pa.array(["red"]), pa.array(["blue"])]
    pq.write_table(pa.Table.from_arrays(columns, names=names), path)


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("tags.csv", "uri,tag,tag\ns3://bkt/1.jpg,red,blue\n", "the header (line 1)"),
        (
            "tags.jsonl",
            '{"uri": "s3://bkt/1.jpg", "tag": "red"}\n'
            '{"uri": "s3://bkt/2.jpg", "tag": "red", "tag": "blue"}\n',
            "line 2",
        ),
        (
            "nested.jsonl",
            '{"uri": "s3://bkt/1.jpg", "meta": {"tag": "red", "tag": "blue"}}\n',
            "line 1",
        ),
        ("tags.parquet", None, "its columns"),
    ],
)
def test_a_name_given_twice_is_refused_naming_file_row_and_name(tmp_path, name, content, where):
    manifest = tmp_path / name
    if content is None:
        _write_parquet_with_repeated_tag(manifest)
    else:
        manifest.write_text(content)
    with pytest.raises(ManifestError) as raised:
        list(iter_manifest(str(manifest)))
    assert str(raised.value).startswith(f"manifest {manifest}, {where}: the name 'tag' is repeated")


def test_a_manifest_keeps_relative_uris_resolved_in_its_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "sub" / "m.jsonl"
    manifest.write_text(json.dumps({"uri": "./a/../b.jpg"}) + "\n")
    [item] = iter_manifest(str(manifest))
    assert item.uri == str((tmp_path / "sub" / "b.jpg").resolve())


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("0", "integer"),
        ("-42", "integer"),
        ("02134", "string"),
        ("3.5", "double"),
        ("-0.25", "double"),
        ("1.10", "string"),
        ("1.0", "string"),
        ("1e5", "string"),
        (".5", "string"),
        ("true", "boolean"),
        ("True", "string"),
        ("2026-11-30", "timestamp"),
        ("2026-11-30 12:01:02", "timestamp"),
        ("2026-13-30", "string"),
        ("NA", "string"),
        ("", "string"),
    ],
)
def test_value_type_annotates_text_without_changing_it(text, kind):
    assert value_type_of(text) == kind
