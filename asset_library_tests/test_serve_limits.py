"""The service under hostile load and damaged storage: its memory stays under the figure the
docs state, and bytes that are not their key's are never served as the image."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from asset_library import Library
from asset_library.layout import LibraryLayout
from asset_library.runs.orchestrate import ingest_batch
from asset_library.serve import ServeSettings, create_app
from asset_library.serve.settings import TOKEN_ENV
from asset_library.storage import DamageRecord, object_key, verify_objects
from asset_library_tests.support.http_server import LiveServer, multipart

FOREST = "github_jenssegers_imagehash/forest"
#: The peak RSS the docs state for ``serve`` with its default decode pool (2 slots, one
#: full-size image's pixels) under any mix of heavy requests.
PEAK_RSS_LIMIT = 2 * 2**30
GIANT_SIDE = 13_000


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
    _giant_png(folder / "giant.png")
    return folder


def _giant_png(path: Path) -> None:
    """13000x13000 pixels (0.5 GB decoded) in well under a MB: 100x100 blocks of noise."""
    blocks = np.random.default_rng(7).integers(0, 256, (130, 130, 3), dtype=np.uint8)
    with Image.fromarray(blocks).resize((GIANT_SIDE, GIANT_SIDE), Image.Resampling.NEAREST) as big:
        big.save(path, compress_level=9)


@pytest.fixture(scope="module")
def small_library(tmp_path_factory, forest) -> Path:
    root = tmp_path_factory.mktemp("library")
    _ingest(forest, root)
    return root


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def test_heavy_requests_keep_the_service_under_its_stated_peak_rss(small_library, forest, tmp_path):
    """The real ``serve`` process, 9 decodes of a 13000x13000 image at once: uploads,
    searches by md5 with every rotation (no body) and first thumbnails."""
    giant = (forest / "giant.png").read_bytes()
    md5 = hashlib.md5(giant).hexdigest()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "asset_library.cli", "serve", "--port", str(port),
               "--library", str(small_library), "--cache-dir", str(tmp_path),
               "--decode-wait", "600"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/stats", timeout=5):
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        idle = _peak_rss(process.pid)
        body, content_type = multipart("image", "giant.png", giant)
        requests = (
            [("POST", "/similar", body, {"Content-Type": content_type})] * 3
            + [("POST", f"/similar?md5={md5}&transforms=dihedral", None, {})] * 3
            + [("GET", f"/images/{md5}/thumb", None, {})] * 3
        )

        def send(request: tuple[str, str, bytes | None, dict[str, str]]) -> int:
            method, path, data, headers = request
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            try:
                connection.request(method, path, body=data, headers=headers)
                response = connection.getresponse()
                response.read()
                return response.status
            finally:
                connection.close()

        with ThreadPoolExecutor(len(requests)) as pool:
            statuses = list(pool.map(send, requests))
        peak = _peak_rss(process.pid)
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    print(f"serve peak RSS: {idle / 2**30:.2f} GiB idle, {peak / 2**30:.2f} GiB under load")
    assert statuses == [200] * len(requests), statuses
    assert peak < PEAK_RSS_LIMIT, f"{peak / 2**30:.2f} GiB"


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
