"""``asset-library serve`` over real HTTP on the ingested corpus: every endpoint against the
Python API it stands for, the error cases, the upload limits and the token rule."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import threading
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from PIL import Image

from asset_library import Library
from asset_library.cli import main
from asset_library.lake.catalog import MACROS
from asset_library.runs.orchestrate import ingest_batch
from asset_library.serve import ServeRefused, ServeSettings, create_app
from asset_library.serve.settings import TOKEN_ENV, default_cache_dir
from asset_library.serve.uploads import DecodePool, PoolBusy
from asset_library.storage import object_key
from asset_library_tests.support.http_server import LiveServer, multipart

FOREST = "github_jenssegers_imagehash/forest/forest-high.jpg"


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """The library's files but SQLite's shared-memory and log files, which a reader of the
    serving store in WAL mode opens (they hold locks, not data)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(("-shm", "-wal"))
    }


@pytest.fixture(scope="module")
def library(corpus_library) -> Library:
    return Library(corpus_library[0])


@pytest.fixture(scope="module")
def library_before(corpus_library) -> dict[str, tuple[int, int]]:
    """Every file of the library as the service first saw it."""
    return _tree(corpus_library[0])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-cache")


@pytest.fixture(scope="module")
def server(corpus_library, library_before, cache_dir):
    settings = ServeSettings(library=corpus_library[0], cache_dir=cache_dir)
    with LiveServer(create_app(settings)) as live:
        yield live


def _same(api: Any, python: Any) -> bool:
    """Whether a JSON value is the Python value (datetimes as ISO text)."""
    if isinstance(python, datetime):
        return datetime.fromisoformat(api.replace("Z", "+00:00")) == python
    if isinstance(python, dict):
        return api.keys() == python.keys() and all(_same(api[k], v) for k, v in python.items())
    if isinstance(python, list | tuple):
        pairs = zip(api, python, strict=False)
        return len(api) == len(python) and all(_same(a, p) for a, p in pairs)
    return api == python


def _md5_of_format(library: Library, fmt: str) -> str:
    return library.query("SELECT md5 FROM images WHERE format = ? ORDER BY md5 LIMIT 1", [fmt])[0][
        "md5"
    ]


def test_an_image_record_is_what_library_lookup_returns(server, library):
    canon = library.query("SELECT md5 FROM images_with_attribute(?, ?)", ["exif.make", "Canon"])
    md5s = [canon[0]["md5"], *(_md5_of_format(library, f) for f in ("png", "webp", "gif"))]
    for md5 in md5s:
        reply = server.get(f"/images/{md5}")
        assert reply.status == 200 and reply.headers["content-type"] == "application/json"
        assert _same(reply.json(), library.lookup(md5)), md5
    upper = server.get(f"/images/{md5s[0].upper()}")
    assert upper.status == 200 and upper.json()["md5"] == md5s[0]
    missing = server.get(f"/images/{'0' * 32}")
    assert missing.status == 404 and "0" * 32 in missing.json()["detail"]
    bad = server.get("/images/not-an-md5")
    assert bad.status == 422 and "'not-an-md5'" in bad.json()["detail"]


@pytest.mark.parametrize(
    "fmt, media",
    [("jpeg", "image/jpeg"), ("png", "image/png"), ("webp", "image/webp"), ("tiff", "image/tiff")],
)
def test_bytes_are_the_stored_image_with_its_type_and_etag(server, library, fmt, media):
    md5 = _md5_of_format(library, fmt)
    reply = server.get(f"/images/{md5}/bytes")
    assert reply.status == 200
    assert hashlib.md5(reply.body).hexdigest() == md5
    assert reply.headers["content-type"] == media
    assert reply.headers["etag"] == f'"{md5}"'
    again = server.get(f"/images/{md5}/bytes", {"If-None-Match": f'W/"x", "{md5}"'})
    assert again.status == 304 and again.body == b""
    other = server.get(f"/images/{md5}/bytes", {"If-None-Match": '"0123"'})
    assert other.status == 200 and len(other.body) == len(reply.body)
    assert server.get(f"/images/{'f' * 32}/bytes").status == 404


def test_a_thumbnail_is_made_once_in_the_cache_never_in_the_library(server, library, cache_dir):
    md5 = library.query("SELECT md5 FROM images ORDER BY width * height DESC LIMIT 1")[0]["md5"]
    reply = server.get(f"/images/{md5}/thumb")
    assert reply.status == 200 and reply.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(reply.body)) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) == 256
    (made,) = [p for p in cache_dir.rglob("*.jpg") if p.stem == md5]
    stamp = made.stat().st_mtime_ns
    assert server.get(f"/images/{md5}/thumb").body == reply.body
    assert made.stat().st_mtime_ns == stamp  # served from the cache, not made again
    etag = reply.headers["etag"]
    assert server.get(f"/images/{md5}/thumb", {"If-None-Match": etag}).status == 304
    assert server.get(f"/images/{'e' * 32}/thumb").status == 404
    # every format in the corpus makes a thumbnail
    for row in library.query("SELECT any_value(md5) AS md5 FROM images GROUP BY format"):
        assert server.get(f"/images/{row['md5']}/thumb").status == 200, row


def test_similar_by_md5_and_by_upload_is_library_similar(server, library, corpus_dir):
    photo = (corpus_dir / FOREST).read_bytes()
    by_upload = server.upload("/similar", photo)
    assert by_upload.status == 200
    assert by_upload.json() == {
        "count": len(expected := library.similar(photo)),
        "results": expected,
    }
    md5 = hashlib.md5(photo).hexdigest()
    assert server.request("POST", f"/similar?md5={md5}").json()["results"] == library.similar(md5)
    query = "max_distance=12&limit=5&hash=dhash&min_quality=0"
    found = server.upload(f"/similar?{query}", photo).json()["results"]
    assert found == library.similar(photo, max_distance=12, limit=5, hash="dhash", min_quality=None)
    flag = (corpus_dir / "github_lovell_sharp/Flag_of_the_Netherlands.png").read_bytes()
    loose = server.upload("/similar?confirm=64", flag).json()["results"]
    assert loose == library.similar(flag, confirm=64)
    assert len(loose) > len(server.upload("/similar", flag).json()["results"])
    turned = server.request("POST", f"/similar?md5={md5}&transforms=dihedral").json()["results"]
    assert turned == library.similar(md5, transforms="dihedral")
    assert {"transform", "distance"} <= set(turned[0])


def test_similar_refuses_bad_input_naming_it(server, corpus_dir):
    photo = (corpus_dir / FOREST).read_bytes()
    neither = server.request("POST", "/similar")
    assert neither.status == 422 and "md5" in neither.json()["detail"]
    both = server.upload(f"/similar?md5={hashlib.md5(photo).hexdigest()}", photo)
    assert both.status == 422 and "not both" in both.json()["detail"]
    text = server.upload("/similar", b"just some text, no image", filename="notes.txt")
    assert text.status == 422 and "notes.txt" in text.json()["detail"]
    assert "not a recognised image format" in text.json()["detail"]
    empty = server.upload("/similar", b"", filename="empty.jpg")
    assert empty.status == 422 and "empty.jpg" in empty.json()["detail"]
    unknown = server.request("POST", f"/similar?md5={'1' * 32}")
    assert unknown.status == 404 and "1" * 32 in unknown.json()["detail"]
    assert server.request("POST", "/similar?md5=zz").status == 422
    for bad, name in (("hash=md5", "hash"), ("max_distance=65", "max_distance"),
                      ("transforms=all", "transforms"), ("limit=0", "limit"),
                      ("confirm=65", "confirm")):  # fmt: skip
        reply = server.upload(f"/similar?{bad}", photo)
        assert reply.status == 422 and name in json.dumps(reply.json()["detail"]), bad
    dihedral_dhash = server.upload("/similar?hash=dhash&transforms=dihedral", photo)
    assert dihedral_dhash.status == 422 and "phash" in dihedral_dhash.json()["detail"]


def test_a_too_large_upload_gets_413_declared_or_chunked(corpus_library, tmp_path, corpus_dir):
    settings = ServeSettings(
        library=corpus_library[0], cache_dir=tmp_path / "cache", max_upload_bytes=50_000
    )
    photo = (corpus_dir / FOREST).read_bytes()
    assert len(photo) > 50_000
    with LiveServer(create_app(settings)) as small:
        declared = small.upload("/similar", photo)
        assert declared.status == 413
        assert "limit is 0.0476837 MiB" in declared.json()["detail"]
        body, content_type = multipart("image", "big.jpg", photo)
        chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))  # no Content-Length
        chunked = small.request(
            "POST",
            "/similar",
            body=chunks,
            headers={"Content-Type": content_type},  # http.client sends it chunked
        )
        assert chunked.status == 413
        thumb = corpus_dir / "github_jenssegers_imagehash/forest/forest-thumb.jpg"
        assert small.upload("/similar", thumb.read_bytes()).status == 200


@pytest.mark.parametrize("workers, budget", [(1, 10**9), (4, 1000)])
def test_the_decode_pool_is_bounded_by_slots_and_pixels_and_busy_means_503(workers, budget):
    gate = threading.Event()
    pool = DecodePool(workers=workers, wait_s=0.2, pixel_budget=budget)

    async def three() -> tuple[Any, Any, Any]:
        first = asyncio.ensure_future(pool.run(lambda: gate.wait(10) and "first", 600))
        await asyncio.sleep(0.05)
        try:
            second = await pool.run(lambda: "second", 600)
        except PoolBusy as busy:
            second = busy
        small = await pool.run(lambda: "small", 10) if workers > 1 else None
        gate.set()
        return await first, second, small

    first, second, small = asyncio.run(three())
    pool.close()
    assert first == "first"
    assert isinstance(second, PoolBusy) and f"{workers} decode slots" in str(second)
    assert small == ("small" if workers > 1 else None)  # room left in the budget: no wait


def test_a_macro_page_is_the_same_macro_through_library_query(server, library):
    path = "/query/images_with_attribute?attr=exif.make&val=Canon"
    expected = library.query(
        "SELECT * FROM images_with_attribute(?, ?) ORDER BY md5", ["exif.make", "Canon"]
    )
    whole = server.get(path + "&limit=1000").json()
    assert whole["total"] == len(expected) >= 3 and whole["next"] is None
    assert _same(whole["rows"], expected)
    assert whole["arguments"] == {"attr": "exif.make", "val": "Canon"}
    rows, url = [], path + "&limit=2"
    while url:
        page = server.get(url).json()
        rows += page["rows"]
        url = page["next"] and urlsplit(page["next"])._replace(scheme="", netloc="").geturl()
    assert _same(rows, expected)
    big = server.get("/query/images_at_least?min_width=4000&min_height=3000").json()
    assert _same(
        big["rows"], library.query("SELECT * FROM images_at_least(?, ?) ORDER BY md5", [4000, 3000])
    )
    md5 = expected[0]["md5"]
    own_order = server.get(f"/query/attributes_of?key={md5}").json()["rows"]
    assert own_order == library.query("SELECT * FROM attributes_of(?)", [md5])


def test_macro_errors_name_the_macro_and_its_arguments(server, library):
    unknown = server.get("/query/drop_everything")
    assert unknown.status == 404 and "'drop_everything'" in unknown.json()["detail"]
    assert "images_with_attribute" in unknown.json()["detail"]
    missing = server.get("/query/images_at_least?min_width=10")
    assert missing.status == 422 and "missing min_height" in missing.json()["detail"]
    extra = server.get("/query/image?key=ab&colour=red")
    assert extra.status == 422 and "unknown colour" in extra.json()["detail"]
    twice = server.get("/query/image?key=ab&key=cd")
    assert twice.status == 422 and "once" in twice.json()["detail"]
    wrong = server.get("/query/images_at_least?min_width=wide&min_height=1")
    assert wrong.status == 422 and "min_width='wide'" in wrong.json()["detail"]
    assert server.get("/query/image?key=ab&limit=0").status == 422
    before = library.query("SELECT count(*) AS n FROM images")[0]["n"]
    sneaky = quote("x'); DROP TABLE images; --")
    reply = server.get(f"/query/images_in_batch?batch_id={sneaky}")
    assert reply.status == 200 and reply.json()["total"] == 0
    assert library.query("SELECT count(*) AS n FROM images")[0]["n"] == before


def test_duplicate_pages_are_the_near_duplicate_groups(server, library):
    groups, url = [], "/duplicates?limit=7"
    while url:
        page = server.get(url).json()
        groups += page["groups"]
        url = page["next"] and urlsplit(page["next"])._replace(scheme="", netloc="").geturl()
    expected = library.near_duplicate_groups()
    assert [g["md5s"] for g in groups] == expected and page["total"] == len(expected)
    assert [g["group"] for g in groups] == list(range(len(expected)))
    assert all(g["size"] == len(g["md5s"]) for g in groups)
    one = server.get("/duplicates/1").json()
    assert [image["md5"] for image in one["images"]] == expected[1]
    assert server.get(f"/duplicates/{len(expected)}").status == 404


def test_rejects_and_stats_count_what_the_catalog_holds(server, library, corpus_library):
    counts = {
        r["reason"]: r["n"]
        for r in library.query("SELECT reason, count(*) AS n FROM rejects GROUP BY reason")
    }
    stats = server.get("/stats").json()
    assert stats["rejects"] == counts
    assert stats["images"] == sum(stats["formats"].values())
    assert stats["images"] == library.query("SELECT count(*) AS n FROM images")[0]["n"]
    assert stats["near_duplicate_groups"] == len(library.near_duplicate_groups())
    # other tests may add batches to the shared corpus library: each batch counts its own
    batches = {b["batch"]: b for b in stats["batches"]}
    corpus_batch = corpus_library[1].batch
    rejected = "SELECT count(*) AS n FROM rejects WHERE batch = ?"
    assert batches[corpus_batch]["shards"] == 4
    assert batches[corpus_batch]["rejects"] == library.query(rejected, [corpus_batch])[0]["n"]
    assert sum(b["rejects"] for b in batches.values()) == sum(counts.values())
    everything = server.get("/rejects?limit=1000").json()
    assert everything["total"] == sum(counts.values()) == len(everything["rejects"])
    for reason, n in counts.items():
        page = server.get(f"/rejects?reason={reason}&limit=2").json()
        assert page["total"] == n
        assert {r["reason"] for r in page["rejects"]} == {reason}
    assert server.get("/rejects?reason=nonsense").json()["total"] == 0


def test_the_schema_the_docs_and_the_gallery_pages_answer(server, library):
    schema = server.get("/openapi.json").json()
    for path in ("/images/{md5}", "/images/{md5}/bytes", "/images/{md5}/thumb", "/similar",
                 "/query/{macro}", "/duplicates", "/rejects", "/stats"):  # fmt: skip
        assert path in schema["paths"], path
    docs = server.get("/docs")
    assert docs.status == 200 and b"/query/{macro}" in docs.body
    assert b"cdn" not in docs.body.lower()
    md5 = library.near_duplicate_groups()[0][0]
    for page in ("/", "/groups", "/groups/0", "/rejected?reason=corrupt", f"/view/{md5}"):
        reply = server.get(page)
        assert reply.status == 200 and reply.headers["content-type"].startswith("text/html")
        assert b"http://" not in reply.body and b"https://" not in reply.body, page
    for asset in ("/static/gallery.css", "/static/gallery.js"):
        reply = server.get(asset)
        assert reply.status == 200 and not re.search(rb"https?:|@import|//\w", reply.body), asset
    assert md5.encode() in server.get("/groups/0").body
    assert server.get("/view/nothex").status == 422
    assert server.get(f"/view/{'0' * 32}").status == 404
    assert server.get("/groups/99999").status == 404
    lookup = server.get(f"/lookup?md5={md5.upper()}")
    assert lookup.status == 303 and lookup.headers["location"] == f"/view/{md5}"


def test_the_docs_page_and_the_schema_list_each_macro_with_its_arguments(server):
    docs = server.get("/docs").body.decode()
    description = server.get("/openapi.json").json()["paths"]["/query/{macro}"]["get"]
    for name, (params, _) in MACROS.items():
        signature = f"{name}({params})"  # the argument names the catalog's macro takes
        assert signature in docs, signature
        assert signature in description["description"], signature


def test_no_request_wrote_the_library(server, corpus_library, library_before):
    # (module order: after every test above)
    assert _tree(corpus_library[0]) == library_before


def test_beyond_loopback_a_token_is_required(corpus_library, tmp_path, monkeypatch, capsys):
    root = corpus_library[0]
    with pytest.raises(ServeRefused, match=TOKEN_ENV):
        ServeSettings.resolve(root, host="0.0.0.0", environ={})
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["serve", "--library", str(root), "--host", "0.0.0.0"]) == 2
    assert "refusing to listen on 0.0.0.0: beyond loopback" in capsys.readouterr().err
    assert ServeSettings.resolve(root, host="::1", environ={}).token is None
    with pytest.raises(ServeRefused, match="inside the library"):
        ServeSettings.resolve(root, cache_dir=root / "thumbs", environ={})
    with pytest.raises(ServeRefused, match="no asset library"):
        ServeSettings.resolve(tmp_path, environ={})
    settings = ServeSettings.resolve(
        root, host="0.0.0.0", cache_dir=tmp_path / "c", environ={TOKEN_ENV: "s3cret"}
    )
    assert settings.token == "s3cret"
    assert default_cache_dir(root, {"XDG_CACHE_HOME": str(tmp_path)}).parent == (
        tmp_path / "asset-library"
    )
    with LiveServer(create_app(settings)) as guarded:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            reply = guarded.get("/stats", headers)
            assert reply.status == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert guarded.request("POST", f"/similar?md5={'1' * 32}").status == 401
        assert guarded.get("/stats", {"Authorization": "Bearer s3cret"}).status == 200
        page = guarded.get("/groups", {"Accept": "text/html"})
        assert page.status == 303 and page.headers["location"] == "/login"
        assert guarded.get("/login").status == 200
        body = b"token=s3cret"
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        cookie = guarded.request("POST", "/login", body, form).headers["set-cookie"]
        jar = {"Cookie": cookie.split(";")[0], "Accept": "text/html"}
        assert guarded.get("/groups", jar).status == 200
        assert guarded.get("/groups", {**jar, "Cookie": "asset_library_token=no"}).status == 303


def test_the_serve_command_starts_the_service(corpus_library, tmp_path):
    """The command as a user runs it: a process that answers, stopped by a signal."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "asset_library.cli", "serve", "--port", str(port),
               "--library", str(corpus_library[0]), "--cache-dir", str(tmp_path)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
                    assert json.load(r)["images"] > 300
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err


def test_bytes_and_thumbnails_come_from_an_s3_library_store(
    s3_bucket, s3_env, corpus_dir, tmp_path, instance
):
    root = tmp_path / "library"
    env = {**s3_env, "ASSET_LIBRARY_OBJECTS": f"s3://{s3_bucket}/library"}
    source = corpus_dir / "github_jenssegers_imagehash"
    summary = ingest_batch(
        str(source), library=root, workers=0, environ=env, instance=instance, progress=print
    )
    assert summary.success and not (root / "objects").exists()
    rows = Library(root).query("SELECT md5, format FROM images ORDER BY md5")
    settings = ServeSettings(library=root, cache_dir=tmp_path / "cache")
    with LiveServer(create_app(settings)) as live:
        for row in rows:
            reply = live.get(f"/images/{row['md5']}/bytes")
            assert reply.status == 200 and hashlib.md5(reply.body).hexdigest() == row["md5"]
            assert reply.headers["content-type"] == f"image/{row['format']}"
            assert live.get(f"/images/{row['md5']}/thumb").status == 200
        assert len(list((tmp_path / "cache").rglob("*.jpg"))) == len(rows)
        gone = rows[0]["md5"]
        Library(root).object_store().delete(object_key(gone))  # the store lost it since
        lost = live.get(f"/images/{gone}/bytes")
        assert lost.status == 502 and gone in lost.json()["detail"]
        assert live.get(f"/images/{gone}/thumb").status == 200  # made before: from the cache


HUGE = "99999999999999999999"


def test_a_bad_number_is_a_422_naming_it_on_every_route(server):
    for path, name in (
        (f"/duplicates?offset={HUGE}", "offset"),
        (f"/rejects?offset={HUGE}", "offset"),
        (f"/duplicates?limit={HUGE}", "limit"),
        (f"/duplicates/{HUGE}", "group"),
        ("/duplicates/-1", "group"),
        (f"/query/image?key=ab&offset={HUGE}", "offset"),
        ("/rejects?offset=ten", "offset"),
    ):
        reply = server.get(path)
        assert reply.status == 422, path
        detail = reply.json()["detail"]
        assert isinstance(detail, str) and detail.startswith(f"{name}:"), (path, detail)
    assert server.get(f"/duplicates?offset={2**62}").json()["groups"] == []
    for path in (f"/groups?page={HUGE}", f"/rejected?page={HUGE}", "/groups?page=two",
                 "/rejected?page=0", f"/groups/{HUGE}"):  # fmt: skip
        reply = server.get(path)
        assert reply.status == 422, path
        assert reply.headers["content-type"].startswith("text/html"), path
        assert b"page" in reply.body or b"group" in reply.body, path


def test_a_gallery_page_past_the_end_says_so(server):
    last = re.search(rb"page 1 of (\d+)", server.get("/rejected").body)
    pages = int(last.group(1)) if last else 1
    for path, base in (
        (f"/rejected?page={pages + 98}", "/rejected"),
        ("/groups?page=99", "/groups"),
    ):
        reply = server.get(path)
        assert reply.status == 404 and reply.headers["content-type"].startswith("text/html")
        assert b"past the end" in reply.body and f'href="{base}?page='.encode() in reply.body
        assert b" of " not in reply.body.split(b"<main>")[1]  # no "page 99 of 3" pager
