"""A library whose home is ``s3://bucket/prefix`` (SeaweedFS, auth on): everything durable is
there, a machine holds only caches, and a second machine with nothing of the first's answers
the same and ingests beside it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from asset_library.cli import main
from asset_library.lake.keyset import ImageKeys, digests
from asset_library.layout import LibraryLayout
from asset_library.library import Library
from asset_library.similarity import SimilarityIndex
from asset_library_tests.support.seaweedfs import SeaweedS3

FIRST = "github_recurser_exif-orientation-examples"
SECOND = "github_jenssegers_imagehash"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seaweed: SeaweedS3, s3_bucket: str
) -> Callable[[str], Path]:
    """Become a fresh machine: an empty cache folder, home folder and working folder, and
    nothing but the S3 settings and the library's URL in the environment."""
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "XDG_CACHE_HOME", "ASSET_LIBRARY_OBJECTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ASSET_LIBRARY_HOME", f"s3://{s3_bucket}/library")
    monkeypatch.setenv("ASSET_LIBRARY_WORKERS", "0")

    def become(name: str) -> Path:
        root = tmp_path / name
        for folder in ("cache", "home", "work"):
            (root / folder).mkdir(parents=True)
        monkeypatch.delenv("DAGSTER_HOME", raising=False)
        monkeypatch.setenv("ASSET_LIBRARY_CACHE", str(root / "cache"))
        monkeypatch.setenv("HOME", str(root / "home"))
        monkeypatch.chdir(root / "work")
        return root

    return become


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _answers(library: Library) -> dict:
    """What a user asks of the library: counts, a lookup of each image, similar images of
    each, and the near-duplicate groups."""
    md5s = [r["md5"] for r in library.query("SELECT md5 FROM images ORDER BY md5")]
    lookups = {}
    for md5 in md5s:
        found = library.lookup(md5)
        assert found is not None
        found.pop("answered_by")
        lookups[md5] = json.loads(json.dumps(found, default=str))
    return {
        "counts": library.query(
            "SELECT (SELECT count(*) FROM images) AS images, "
            "(SELECT count(*) FROM occurrences) AS occurrences, "
            "(SELECT count(*) FROM rejects) AS rejects"
        ),
        "lookups": lookups,
        "similar": {m: library.similar(m, max_distance=16) for m in md5s[:4]},
        "groups": library.near_duplicate_groups(),
    }


def test_an_s3_library_lives_at_its_url_and_a_second_machine_answers_the_same(
    machine,
    cli,
    corpus_dir: Path,
    seaweed: SeaweedS3,
    s3_bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    home = f"s3://{s3_bucket}/library"
    first = machine("first")
    code, out, err = cli("ingest", str(corpus_dir / FIRST), "--shard-size", "5", "--batch", "b1")
    assert code == 0, out + err
    assert f"library   {home}" in out and "2 ok" in out
    assert list((first / "work").iterdir()) == []  # no folder named after the URL, nothing
    assert _files(first / "home") <= {".dagster/.telemetry/user_id.yaml"}  # Dagster's own
    cache = first / "cache" / "libraries" / s3_bucket / "library"
    assert (cache / ".dagster").is_dir()  # the CLI's instance: in the cache folder
    keys = {o["Key"] for o in seaweed.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    for durable in (
        "library/library.json",
        "library/plans/b1/plan.json",
        "library/plans/b1/b1-s00000.parquet",
        "library/triggers/b1.json",
        "library/shards/b1-s00000.parquet",
        "library/lake/images/_delta_log/00000000000000000000.json",
        "library/index/segments.json",
        "library/index/near_duplicates.parquet",
        "library/image_keys/keys.json",
    ):
        assert durable in keys, durable
    assert any(k.startswith("library/objects/images/") for k in keys)
    code, out, _ = cli("status")
    assert code == 0 and "b1  9 images" in out
    md5 = Library().query("SELECT md5 FROM images ORDER BY md5 LIMIT 1")[0]["md5"]
    code, out, _ = cli("lookup", md5)
    assert code == 0 and json.loads(out)["md5"] == md5
    code, out, _ = cli("similar", md5, "--max-distance", "16")
    similar_first = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and similar_first
    before = _answers(Library(home))
    assert before["counts"][0]["images"] == 9 and before["groups"]

    shutil.rmtree(first)  # the first machine is gone, with its cache
    second = machine("second")
    assert _answers(Library(home)) == before
    code, out, _ = cli("similar", md5, "--max-distance", "16")
    assert [json.loads(line) for line in out.splitlines()] == similar_first
    code, out, _ = cli("status")
    assert code == 0 and "b1  9 images" in out

    code, out, err = cli("ingest", str(corpus_dir / SECOND), "--batch", "b2")
    assert code == 0, out + err
    after = _answers(Library(home))
    assert after["counts"][0]["images"] == 9 + 8
    assert before["lookups"].items() <= after["lookups"].items()
    code, out, _ = cli("status")
    assert "b1  9 images" in out and "b2  8 images" in out
    assert list((second / "work").iterdir()) == []
    # The second machine's refresh fetched the index and the key cache the first left at the
    # home and added to them; rebuilt from the lake, each would hold one segment / one run.
    client = seaweed.client()
    segments = json.loads(_read(client, s3_bucket, "library/index/segments.json"))["segments"]
    assert len(segments) == 2
    runs = json.loads(_read(client, s3_bucket, "library/image_keys/keys.json"))["runs"]
    assert [run["rows"] for run in runs] == [9, 8]

    # A damaged local copy (same size, other bytes: only its check sees it) is fetched again.
    layout = LibraryLayout.at(home)
    hashes = next((layout.index_dir / "phash").glob("seg-*/hashes.npy"))
    damaged = bytearray(hashes.read_bytes())
    damaged[-1] ^= 0xFF
    hashes.write_bytes(bytes(damaged))
    layout.settings_path.write_text("{" + " " * (layout.settings_path.stat().st_size - 1))
    index = SimilarityIndex(layout)
    assert index.damage is None and len(index) == 17
    assert "similarity index damaged here, fetched again" in caplog.text
    assert hashes.read_bytes() != bytes(damaged)
    assert layout.n_buckets == 256


def test_a_new_file_is_published_once_whichever_machine_comes_first(
    machine, s3_bucket: str
) -> None:
    home = f"s3://{s3_bucket}/library"
    machine("first")
    first = LibraryLayout.open(home)
    machine("second")
    second = LibraryLayout.open(home)  # the library the first created: not created again
    assert first.root != second.root and second.n_buckets == first.n_buckets
    for layout, text in ((first, "first"), (second, "second")):
        layout.plan_path("b1").parent.mkdir(parents=True)
        layout.plan_path("b1").write_text(text)
    assert first.publish_new(first.plan_path("b1"))
    assert not second.publish_new(second.plan_path("b1"))  # If-None-Match: * lost
    assert second.fetch(second.plan_path("b1")) and second.plan_path("b1").read_text() == "first"


def test_the_key_cache_is_kept_at_the_home_and_a_damaged_local_run_fetched_again(
    machine, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    home = f"s3://{s3_bucket}/library"
    md5s = pa.array([f"{n:032x}" for n in range(1000)])
    machine("first")
    first = LibraryLayout.open(home)
    ImageKeys(first.image_keys_dir, first).rebuild(digests(md5s), "table", 3, "merge")
    machine("second")  # nothing of the first's cache
    second = LibraryLayout.at(home)
    keys = ImageKeys(second.image_keys_dir, second)
    cached = keys.level_with("table", 3, lambda version, merge: True, 1000)
    assert cached is not None and cached.held(md5s).all() and keys.fetched == 1
    [run] = cached.runs
    path = second.image_keys_dir / run.file
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0xFF  # same size: only the CRC check sees it
    path.write_bytes(bytes(damaged))
    again = ImageKeys(second.image_keys_dir, second)
    assert again.level_with("table", 3, lambda version, merge: True, 1000) is not None
    assert "images key cache damaged here, fetched again" in caplog.text
    assert again.fetched == 1 and path.read_bytes() != bytes(damaged)


def test_a_key_cache_publish_deletes_only_the_runs_its_manifest_stopped_naming(
    machine, seaweed: SeaweedS3, s3_bucket: str
) -> None:
    home = f"s3://{s3_bucket}/library"
    level = lambda version, merge: True  # noqa: E731
    machine("first")
    first = LibraryLayout.open(home)
    ImageKeys(first.image_keys_dir, first).rebuild(digests(pa.array(["0" * 32])), "t", 1, "m")
    machine("second")
    second = LibraryLayout.at(home)
    keys = ImageKeys(second.image_keys_dir, second)
    assert keys.level_with("t", 1, level, 1) is not None
    client = seaweed.client()
    in_flight = "library/image_keys/run-of-a-third-machine.npy"
    client.put_object(Bucket=s3_bucket, Key=in_flight, Body=b"on its way")
    keys.add(digests(pa.array(["1" * 32])), "t", 2, "m2")  # merges its two runs into one
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="library/image_keys/")["Contents"]
    at_home = {o["Key"].removeprefix("library/image_keys/") for o in listed}
    manifest = json.loads(_read(client, s3_bucket, "library/image_keys/keys.json"))
    runs = {run["file"] for run in manifest["runs"]}
    assert len(runs) == 1 and at_home == {"keys.json", *runs, "run-of-a-third-machine.npy"}


def _read(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_a_folder_library_moves_to_an_empty_s3_home_and_answers_the_same(
    machine, cli, corpus_dir: Path, s3_bucket: str, instance, tmp_path: Path
) -> None:
    from asset_library.runs.orchestrate import ingest_batch

    folder = tmp_path / "folder-library"
    done = ingest_batch(
        str(corpus_dir / FIRST),
        library=folder,
        environ={"ASSET_LIBRARY_WORKERS": "0"},
        instance=instance,
        progress=lambda _: None,
    )
    assert done.success
    before = _answers(Library(folder))
    target = f"s3://{s3_bucket}/moved"
    code, out, err = cli("move-to", target, "--library", str(folder))
    assert code == 0, out + err
    assert f"copied to {target}" in out and not err
    machine("elsewhere")  # nothing of the folder's machine
    assert _answers(Library(target)) == before
    code, _, err = cli("move-to", target, "--library", str(folder))
    assert code == 2 and f"{target} is not empty" in err
    code, _, err = cli("move-to", "gs://x", "--library", str(folder))
    assert code == 2 and "'gs://x'" in err
