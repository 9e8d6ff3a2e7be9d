"""The service under hostile load and damaged storage: its memory stays under the figure the
docs state, and bytes that are not their key's are never served as the image."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import dagster as dg
import pytest

from asset_library import Library
from asset_library.layout import LibraryLayout
from asset_library.orchestrate import ingest_batch
from asset_library.serve import ServeSettings, create_app
from asset_library.storage import DamageRecord, object_key, verify_objects
from asset_library_tests.http_server import LiveServer

FOREST = "github_jenssegers_imagehash/forest"


def _ingest(source: Path, root: Path) -> None:
    with dg.instance_for_test() as instance:
        summary = ingest_batch(
            str(source), library=root, workers=1, environ={}, instance=instance, progress=print
        )
    assert summary.success, summary.failures


@pytest.fixture(scope="module")
def forest(tmp_path_factory, corpus_dir) -> Path:
    """The forest photos, as a batch of their own."""
    folder = tmp_path_factory.mktemp("forest")
    shutil.copytree(corpus_dir / FOREST, folder, dirs_exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def small_library(tmp_path_factory, forest) -> Path:
    root = tmp_path_factory.mktemp("library")
    _ingest(forest, root)
    return root


def test_a_damaged_object_is_never_served_and_the_repair_path_sees_it(
    small_library, forest, tmp_path
):
    library = Library(small_library)
    md5 = library.query("SELECT md5 FROM images ORDER BY size_bytes LIMIT 1")[0]["md5"]
    path = Path(library.object_store().uri(object_key(md5)))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit: same size, other bytes
    path.write_bytes(bytes(data))
    settings = ServeSettings(library=small_library, cache_dir=tmp_path / "cache")
    with LiveServer(create_app(settings)) as live:
        for method, route in (
            ("GET", f"/images/{md5}/bytes"),
            ("GET", f"/images/{md5}/thumb"),
            ("POST", f"/similar?md5={md5}&transforms=dihedral"),
        ):
            reply = live.request(method, route)
            assert reply.status == 502, (route, reply.status)
            assert "etag" not in reply.headers and "immutable" not in str(reply.headers)
            detail = reply.json()["detail"]
            assert str(path) in detail and "damaged" in detail, detail
        assert not list((tmp_path / "cache").rglob("*.jpg"))  # no thumbnail of damaged bytes
        other = library.query("SELECT md5 FROM images WHERE md5 <> ?", [md5])[0]["md5"]
        assert live.get(f"/images/{other}/bytes").status == 200

    record = DamageRecord(LibraryLayout(small_library).damaged_objects_dir)
    assert record.md5s() == {md5}
    sizes = [
        (r["md5"], r["size_bytes"]) for r in library.query("SELECT md5, size_bytes FROM images")
    ]
    # the checks read a recorded object's bytes whatever their sample (here none)
    (problem,) = verify_objects(library.object_store(), sizes, 0, suspects=record.md5s())
    assert problem.md5 == md5 and problem.kind == "content"

    _ingest(forest, small_library)  # the source again: write-once re-writes the damaged object
    assert hashlib.md5(path.read_bytes()).hexdigest() == md5
    assert record.md5s() == set()
    with LiveServer(create_app(settings)) as live:
        reply = live.get(f"/images/{md5}/bytes")
        assert reply.status == 200 and hashlib.md5(reply.body).hexdigest() == md5
        assert reply.headers["etag"] == f'"{md5}"'
    assert verify_objects(library.object_store(), sizes, len(sizes)) == []
