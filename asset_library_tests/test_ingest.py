"""The ingestion graph end to end on a real Dagster instance, real DuckDB files and the corpus."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from asset_library.library import Library
from asset_library.runs.orchestrate import PlanningFailed, ingest_batch
from asset_library.storage import LocalObjectStore, object_key


def _manifest_rows(corpus_dir: Path) -> list[dict[str, str]]:
    with (corpus_dir / "MANIFEST.tsv").open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _decode_ok(corpus_dir: Path) -> set[str]:
    with (corpus_dir / "DETAILS.tsv").open(newline="") as handle:
        found = {r["path"] for r in csv.DictReader(handle, delimiter="\t") if r["decode"] == "ok"}
    # DETAILS.tsv calls it decodable, but Pillow 13's load() raises on its cut-short last chunk.
    return found - {"github_python-pillow_Pillow/truncated_end_chunk.png"}


def test_a_folder_batch_lands_whole(corpus_library, corpus_dir):
    root, summary = corpus_library
    assert summary.success, summary
    files = _manifest_rows(corpus_dir)
    assert summary.shards == 4 and summary.images == len(files) + 4  # + README and 3 TSVs
    library = Library(root)
    expected_ok = {
        r["md5"]
        for r in files
        if r["path"] in _decode_ok(corpus_dir)
        and int(r["width"] or 0) * int(r["height"] or 0) < 178_956_970
    }
    images = {row["md5"] for row in library.query("SELECT md5 FROM images")}
    assert images == expected_ok
    rejects = library.query("SELECT source_uri, reason, message FROM rejects")
    assert {Path(r["source_uri"]).name for r in rejects} >= {"giant-image.jpg", "README.md"}
    assert all(r["reason"] and r["message"] for r in rejects)
    assert summary.checks == {
        "hash_coverage": True,
        "uploads_present": True,
        "attribute_keys_in_occurrences": True,
        "images_md5_unique": True,
        "serving_store_level": True,
    }


def test_every_image_is_stored_once_under_its_md5(corpus_library):
    root, summary = corpus_library
    store = LocalObjectStore(root / "objects")
    library = Library(root)
    md5s = [row["md5"] for row in library.query("SELECT md5 FROM images")]
    assert sorted(k.rsplit("/", 1)[-1] for k in store.iter_keys()) == sorted(md5s)
    assert summary.uploaded == len(md5s)
    # the corpus holds byte-identical copies under other names: stored once, seen twice
    assert summary.already_stored == summary.ok - len(md5s) > 0
    twice = library.query("SELECT md5, occurrences FROM images WHERE occurrences > 1")
    assert twice and all(row["occurrences"] == 2 for row in twice)


def test_tables_are_delta_tables_partitioned_by_bucket(corpus_library):
    root, _ = corpus_library
    library = Library(root)
    for name in ("occurrences", "rejects", "attributes", "images"):
        assert (root / "lake" / name / "_delta_log").is_dir(), name
    table = DeltaTable(str(root / "lake" / "occurrences"))
    assert table.metadata().partition_columns == ["bucket"]
    files = [Path(uri) for uri in table.file_uris()]
    assert files and all(f.parent.name.startswith("bucket=") for f in files)
    for path in files[:20]:
        bucket = int(path.parent.name.split("=")[1])
        md5s = pq.read_table(path, columns=["md5"])["md5"].to_pylist()
        assert all(int(m[:2], 16) == bucket for m in md5s)
        assert md5s == sorted(md5s)
    assert library.query("SELECT count(DISTINCT shard) AS n FROM occurrences")[0]["n"] == 4
    # images: one row per md5, its occurrences counted
    counts = library.query(
        "SELECT (SELECT count(*) FROM images) AS images, "
        "(SELECT count(DISTINCT md5) FROM occurrences) AS distinct_md5s, "
        "(SELECT sum(occurrences) FROM images) AS counted, "
        "(SELECT count(*) FROM occurrences) AS occurrences"
    )[0]
    assert counts["images"] == counts["distinct_md5s"]
    assert counts["counted"] == counts["occurrences"]


def test_lookup_returns_the_row_attributes_and_sources(corpus_library, corpus_dir):
    root, _ = corpus_library
    row = next(r for r in _manifest_rows(corpus_dir) if r["path"].endswith("Landscape_6.jpg"))
    image = Library(root).lookup(row["md5"])
    assert image is not None
    assert (image["format"], image["size_bytes"]) == ("jpeg", int(row["bytes"]))
    # stored 1200x1800 with EXIF orientation 6: displayed as the landscape it is
    assert (image["width"], image["height"], image["orientation"]) == (1800, 1200, 6)
    assert image["attributes"]["derived"]["image.aspect_ratio"] == 1.5
    assert image["sources"] == [str(corpus_dir / row["path"])]
    assert Library(root).lookup("0" * 32) is None
    with pytest.raises(ValueError, match="not an md5"):
        Library(root).lookup("'; DROP TABLE images; --")


def test_exif_attributes_land_in_the_cube(corpus_library):
    root, _ = corpus_library
    rows = Library(root).query(
        "SELECT attribute, count(*) AS n FROM attributes GROUP BY attribute ORDER BY attribute"
    )
    counts = {r["attribute"]: r["n"] for r in rows}
    assert counts["exif.make"] >= 20 and counts["exif.captured_at"] >= 10
    assert counts["image.megapixels"] == counts["image.animated"]


def test_the_same_images_again_add_no_rows_and_no_uploads(corpus_library, instance):
    root, _ = corpus_library
    library = Library(root)
    before = library.query("SELECT count(*) AS n FROM images")[0]["n"]
    again = ingest_batch(
        str(root / "objects"),
        library=root,
        max_images_per_shard=200,
        workers=0,
        environ={},
        instance=instance,
        progress=lambda _: None,
    )
    assert again.success and again.uploaded == 0 and again.already_stored == before
    assert library.query("SELECT count(*) AS n FROM images")[0]["n"] == before


def test_a_manifest_batch_brings_its_extra_columns(tmp_path, corpus_dir, instance):
    photos = sorted((corpus_dir / "github_recurser_exif-orientation-examples").glob("*.jpg"))
    manifest = tmp_path / "batch.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uri", "label", "score", "reviewed"])
        for number, photo in enumerate(photos):
            reviewed = "true" if number % 2 == 0 else "false"
            writer.writerow([str(photo), f"orientation-{number}", number / 2, reviewed])
        writer.writerow([str(tmp_path / "missing.jpg"), "gone", 0.0, "false"])
    root = tmp_path / "library"
    summary = ingest_batch(
        str(manifest),
        library=root,
        max_images_per_shard=4,
        workers=0,
        environ={"ASSET_LIBRARY_ALLOWED_ROOTS": str(corpus_dir)},  # absolute paths outside
        instance=instance,
        progress=lambda _: None,
    )
    assert summary.success and summary.shards == 3
    assert summary.rejects_by_reason == {"missing": 1}
    library = Library(root)
    labels = library.query(
        "SELECT attribute, value, value_type FROM attributes WHERE origin = 'manifest' "
        "ORDER BY attribute, value"
    )
    # value types annotate the text as written: 0.5 reads as a double, 1.0 does not
    assert {(r["attribute"], r["value"], r["value_type"]) for r in labels} >= {
        ("label", "orientation-0", "string"),
        ("score", "0.5", "double"),
        ("score", "1.0", "string"),
        ("reviewed", "true", "boolean"),
    }
    found = library.query("SELECT * FROM images_with_attribute('label', 'orientation-0')")
    assert len(found) == 1
    missing = library.query("SELECT reason, message FROM rejects")
    assert missing == [
        {"reason": "missing", "message": f"{tmp_path / 'missing.jpg'}: no such file"}
    ]


@pytest.mark.parametrize(
    ("content", "suffix", "expected"),
    [
        ("path,label\na.jpg,x\n", ".csv", "no 'uri' column"),
        ("uri,label\na.jpg,x\n,y\n", ".csv", "row 2: the uri is empty"),
        ('{"uri": "s3://"}\n', ".jsonl", "row 1: malformed S3 uri"),
        ('{"uri": "http://example.com/a.jpg"}\n', ".jsonl", "unsupported uri scheme"),
        ("not json\n", ".jsonl", "line 1: not JSON"),
        ("uri,tag,tag\na.jpg,x,y\n", ".csv", "the header \\(line 1\\): the name 'tag' is repeated"),
        ('{"uri": "a.jpg", "tag": "x", "tag": "y"}\n', ".jsonl", "line 1: the name 'tag' is"),
    ],
)
def test_a_bad_manifest_fails_planning_naming_file_row_and_reason(
    tmp_path, instance, content, suffix, expected
):
    manifest = tmp_path / f"bad{suffix}"
    manifest.write_text(content)
    with pytest.raises(PlanningFailed, match=expected) as raised:
        ingest_batch(
            str(manifest),
            library=tmp_path / "library",
            environ={},
            instance=instance,
            progress=lambda _: None,
        )
    assert str(manifest) in str(raised.value)


def test_a_rerun_shard_replaces_exactly_its_own_rows(corpus_library, instance):
    from asset_library.definitions import build_definitions
    from asset_library.defs.resources import build_resources

    root, summary = corpus_library
    shard = f"{summary.batch}-s00001"
    library = Library(root)
    count = "SELECT (SELECT count(*) FROM occurrences) AS o, (SELECT count(*) FROM images) AS i, "
    count += (
        "(SELECT count(*) FROM attribute_occurrences) AS a, (SELECT count(*) FROM rejects) AS r"
    )
    before = library.query(count)[0]
    version = DeltaTable(str(root / "lake" / "occurrences")).version()
    defs = build_definitions(build_resources({}, root=str(root)))
    instance.add_dynamic_partitions("shards", [shard])
    result = defs.resolve_job_def("ingest_shard").execute_in_process(
        partition_key=shard, instance=instance
    )
    assert result.success
    assert DeltaTable(str(root / "lake" / "occurrences")).version() == version + 1  # one commit
    assert library.query(count)[0] == before  # occurrences newer than images, same counts
    refreshed = defs.resolve_job_def("refresh_library").execute_in_process(instance=instance)
    assert refreshed.success
    assert library.query(count)[0] == before


def test_the_audit_catches_a_planted_duplicate_and_a_missing_object(tmp_path, corpus_dir, instance):
    from deltalake import write_deltalake

    from asset_library.definitions import build_definitions
    from asset_library.defs.resources import build_resources

    root = tmp_path / "library"
    folder = corpus_dir / "github_jenssegers_imagehash"
    first = ingest_batch(
        str(folder), library=root, workers=0, environ={}, instance=instance, progress=print
    )
    assert first.success
    images = DeltaTable(str(root / "lake" / "images"))
    write_deltalake(images, images.to_pyarrow_table().slice(0, 1), mode="append")
    md5 = Library(root).query("SELECT md5 FROM images LIMIT 1")[0]["md5"]
    (root / "objects" / object_key(md5)).unlink()

    defs = build_definitions(build_resources({}, root=str(root)))
    result = defs.resolve_job_def("audit_library").execute_in_process(
        instance=instance, raise_on_error=False
    )
    outcome = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not result.success
    assert not outcome["md5_unique"].passed
    assert outcome["md5_unique"].metadata["duplicated"].value == 1
    assert not outcome["uploads_present"].passed
    assert md5 in outcome["uploads_present"].metadata["missing_examples"].value
    assert outcome["hash_coverage"].passed and outcome["attribute_keys_in_images"].passed


def test_trigger_records_name_the_batch_and_its_shards(corpus_library):
    root, summary = corpus_library
    record = json.loads((root / "triggers" / f"{summary.batch}.json").read_text())
    assert record["trigger"] == summary.trigger and record["kind"] == "cli"
    assert len(record["shards"]) == 4 and record["images"] == summary.images
