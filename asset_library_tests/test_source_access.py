"""A batch reads regular files inside its own root only, unless the operator allows more."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from asset_library.ingest.access import ReadPolicy, SourceReadError
from asset_library.ingest.plan import load_plan
from asset_library.library import Library
from asset_library.runs.orchestrate import ingest_batch
from asset_library.storage import LocalObjectStore

FOREST = "github_jenssegers_imagehash/forest"


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO read blocks forever)."""

    def expire(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def secret(tmp_path: Path, corpus_dir: Path) -> Path:
    """A private image outside any batch: readable by this process, never to be ingested."""
    private = tmp_path / "private"
    private.mkdir()
    path = private / "secret.jpg"
    shutil.copyfile(corpus_dir / FOREST / "forest-thumb.jpg", path)
    path.chmod(0o600)
    return path


def _rejects(library: Path) -> dict[str, dict]:
    rows = Library(library).query("SELECT source_uri, md5, size_bytes, reason FROM rejects")
    return {Path(r["source_uri"]).name: r for r in rows}


def _stored(library: Path) -> set[str]:
    return {key.rsplit("/", 1)[-1] for key in LocalObjectStore(library / "objects").iter_keys()}


def test_a_folder_batch_reads_regular_files_inside_it_only(
    run_cli, tmp_path, corpus_dir, secret, monkeypatch
):
    batch = tmp_path / "batch"
    (batch / "_originals").mkdir(parents=True)
    shutil.copyfile(corpus_dir / FOREST / "forest-low.jpg", batch / "low.jpg")
    shutil.copyfile(corpus_dir / FOREST / "forest-high.jpg", batch / "_originals" / "high.jpg")
    (batch / "linked-in.jpg").symlink_to(batch / "_originals" / "high.jpg")
    (batch / "linked-out.jpg").symlink_to(secret)
    os.mkfifo(batch / "pipe.jpg")
    with (batch / "sparse.jpg").open("wb") as handle:
        handle.truncate(2_000_000)  # over the limit below, without using the disk
    monkeypatch.setenv("ASSET_LIBRARY_MAX_IMAGE_BYTES", "1000000")

    with _deadline(120):
        code, out, err = run_cli("ingest", str(batch))
    library = tmp_path / "library"
    assert code == 0, err
    accepted = Library(library).query("SELECT source_uri FROM occurrences ORDER BY 1")
    assert [r["source_uri"] for r in accepted] == [
        str(batch / "_originals" / "high.jpg"),  # a link inside the batch: fine, recorded resolved
        str(batch / "low.jpg"),
    ]
    rejects = _rejects(library)
    assert {name: r["reason"] for name, r in rejects.items()} == {
        "secret.jpg": "outside_batch",
        "pipe.jpg": "not_a_file",
        "sparse.jpg": "too_large",
    }
    assert all(r["md5"] is None and r["size_bytes"] is None for r in rejects.values())
    assert hashlib.md5(secret.read_bytes()).hexdigest() not in _stored(library)
    assert len(_stored(library)) == 2


def test_a_manifest_reads_under_its_folder_unless_roots_are_allowed(
    run_cli, tmp_path, corpus_dir, secret, monkeypatch
):
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copyfile(corpus_dir / FOREST / "forest-low.jpg", batch / "low.jpg")
    corpus_image = corpus_dir / FOREST / "forest-cropped.jpg"
    manifest = batch / "manifest.csv"
    manifest.write_text(f"uri\nlow.jpg\n../private/secret.jpg\n{corpus_image}\n/dev/zero\n")

    code, out, err = run_cli("ingest", str(manifest), "--batch", "closed")
    library = tmp_path / "library"
    assert code == 0, err
    rejects = _rejects(library)
    assert {name: r["reason"] for name, r in rejects.items()} == {
        "secret.jpg": "outside_batch",  # ../ resolved, then refused
        "forest-cropped.jpg": "outside_batch",  # absolute, not allowed
        "zero": "outside_batch",
    }
    assert all(r["md5"] is None and r["size_bytes"] is None for r in rejects.values())
    assert str(secret) in {r["source_uri"] for r in rejects.values()}  # stored resolved
    assert len(_stored(library)) == 1
    assert load_plan(library / "plans" / "closed").roots == [str(batch)]

    # the operator allows the corpus and /dev: the image is read, the device still is not
    monkeypatch.setenv("ASSET_LIBRARY_ALLOWED_ROOTS", os.pathsep.join([str(corpus_dir), "/dev"]))
    manifest.write_text(f"uri\n{corpus_image}\n/dev/zero\n")
    with _deadline(120):
        code, out, err = run_cli("ingest", str(manifest), "--batch", "opened")
    assert code == 0, err
    reasons = Library(library).query("SELECT reason FROM rejects WHERE batch = 'opened'")
    assert reasons == [{"reason": "not_a_file"}]
    assert hashlib.md5(corpus_image.read_bytes()).hexdigest() in _stored(library)
    assert load_plan(library / "plans" / "opened").roots == [str(batch), str(corpus_dir), "/dev"]


def test_the_reader_checks_before_it_opens(tmp_path):
    with pytest.raises(SourceReadError, match="not a regular file") as raised:
        ReadPolicy(("/dev",)).read_local("/dev/zero")
    assert raised.value.reason == "not_a_file"
    outside = tmp_path / "a.jpg"
    outside.write_bytes(b"x")
    with pytest.raises(SourceReadError) as raised:
        ReadPolicy((str(tmp_path / "other"),)).read_local(str(outside))
    assert raised.value.reason == "outside_batch"
    with pytest.raises(SourceReadError) as raised:
        ReadPolicy((str(tmp_path),)).read_local("a.jpg")
    assert raised.value.reason == "outside_batch"
    assert ReadPolicy((str(tmp_path),), max_bytes=1).read_local(str(outside)) == b"x"


def test_an_s3_manifest_never_reads_the_servers_files(
    seaweed, s3_env, s3_bucket, tmp_path, corpus_dir, secret, instance
):
    client = seaweed.client()
    small, large = corpus_dir / FOREST / "forest-low.jpg", corpus_dir / FOREST / "forest-high.jpg"
    for image in (small, large):
        client.put_object(Bucket=s3_bucket, Key=f"imgs/{image.name}", Body=image.read_bytes())
    uris = [f"s3://{s3_bucket}/imgs/{small.name}", f"s3://{s3_bucket}/imgs/{large.name}"]
    uris += [str(secret), "private/secret.jpg"]
    body = "\n".join(json.dumps({"uri": uri}) for uri in uris)
    client.put_object(Bucket=s3_bucket, Key="batch.jsonl", Body=body.encode())
    summary = ingest_batch(
        f"s3://{s3_bucket}/batch.jsonl",
        library=tmp_path / "library",
        workers=0,
        environ={**s3_env, "ASSET_LIBRARY_MAX_IMAGE_BYTES": "60000"},
        instance=instance,
        progress=lambda _: None,
    )
    assert summary.ok == 1
    assert summary.rejects_by_reason == {"outside_batch": 2, "too_large": 1}
    rejects = Library(tmp_path / "library").query("SELECT md5, size_bytes FROM rejects")
    assert all(r["md5"] is None and r["size_bytes"] is None for r in rejects)
    assert _stored(tmp_path / "library") == {hashlib.md5(small.read_bytes()).hexdigest()}
