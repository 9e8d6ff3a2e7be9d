"""HTTP serving benchmark: lookups, similar-by-md5 and similar-by-upload through
``asset-library serve``, against the same calls on ``Library`` in this process.

Run by hand, never in CI (about a minute):

    uv run python benchmarks/serve.py --library library     # after `make demo`

It starts ``asset-library serve`` on a free loopback port (a real process, its own thumbnail
cache in a temporary folder), then per call runs a bounded client (``--threads`` threads, each
with one keep-alive ``http.client`` connection) over the library's md5s in a shuffled order for
``--seconds``, and prints requests/s with latency p50/p99, with one client and with
``--threads``; the baseline, measured in the same run, is the same call on one ``Library`` in
this process (one thread), and the ratios are against it.

``--attributes`` measures the pages of images having an attribute value (a library built by
``benchmarks/scale.py --keep``: ``label`` has five values of 20% each, ``score`` a thousand of
0.1%): a rare value's rows (every page), a common value's first page and a deep one (page
``--depth``, by its cursor), each answered by the serving store and by the lake (the fallback's
own reads), in this process; the lake's time as a ratio to the store's, and the service's
``GET /attributes/images`` for the same page.

Lookups are also measured against a bare Starlette app (uvicorn, one process, as ``serve``)
reading the same records from the serving store's SQLite table by md5, started in the same run:
the service's rate and p99 are printed as ratios to the bare app's. ``--lookups-only`` measures
lookups alone (a library built by ``benchmarks/scale.py --keep`` has no image bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asset_library import Library  # noqa: E402
from asset_library.serving.runs import newest, parse_runs  # noqa: E402
from asset_library.storage import object_key  # noqa: E402
from asset_library_tests.support.http_server import multipart  # noqa: E402


def bare_app(store: str):  # noqa: ANN201 (Starlette is imported here only)
    """The baseline: GET /images/{md5} answers the record JSON from SQLite, nothing else (one
    table of every image's record keyed by md5, :func:`bare_store`)."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    local = threading.local()

    def lookup(request):  # noqa: ANN001, ANN202
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
            local.connection = connection
        row = connection.execute(
            "SELECT record FROM images WHERE md5 = ?", (request.path_params["md5"],)
        ).fetchone()
        return Response(row[0], media_type="application/json", status_code=200 if row else 404)

    return Starlette(
        routes=[Route("/images/{md5}", lookup), Route("/stats", lambda r: Response("{}"))]
    )


def bare_store(store: Path, to: Path) -> Path:
    """The bare app's file: every image's newest record from the store's runs, in one table
    keyed by md5 (what a store of one table would hold)."""
    with contextlib.closing(sqlite3.connect(f"file:{to}", uri=True)) as bare, bare:
        bare.execute("CREATE TABLE images (md5 TEXT PRIMARY KEY, record TEXT) WITHOUT ROWID")
        bare.execute("ATTACH ? AS store", (f"file:{store}?mode=ro",))
        (runs,) = bare.execute("SELECT value FROM store.meta WHERE key = 'runs'").fetchone()
        latest = newest("images", parse_runs(runs), "record").replace(
            " FROM images_", " FROM store.images_"
        )
        bare.execute(
            f"INSERT INTO images SELECT md5, record FROM ({latest}) latest "
            "WHERE record IS NOT NULL ORDER BY md5"
        )
    return to


def start_bare(store: Path, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, "--bare-app", str(store), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return wait_ready(process, port)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(library: Path, cache: Path, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "asset_library.cli", "serve", "--library", str(library),
               "--port", str(port), "--cache-dir", str(cache)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "ASSET_LIBRARY_TOKEN"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return wait_ready(process, port, "/openapi.json")  # /stats would compute the groups


def wait_ready(
    process: subprocess.Popen[bytes], port: int, probe: str = "/stats"
) -> subprocess.Popen[bytes]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", probe)
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.2)
        if process.poll() is not None:
            break
    process.kill()
    raise SystemExit(f"the server did not start: {process.stderr.read().decode()[-2000:]}")


Request = Callable[[int], tuple[str, str, bytes | None, dict[str, str]]]


def over_http(port: int, make: Request, n_items: int, threads: int, seconds: float) -> np.ndarray:
    """Latencies (s) of as many requests as ``threads`` clients make in ``seconds``."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    counter = iter(range(10**12))

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        while time.monotonic() < deadline:
            method, path, body, headers = make(next(counter) % n_items)
            start = time.perf_counter()
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - start)
            if response.status != 200:
                raise SystemExit(f"{method} {path}: HTTP {response.status}")
        connection.close()
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return np.array(latencies)


def in_process(call: Callable[[int], object], n_items: int, seconds: float) -> np.ndarray:
    latencies = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        start = time.perf_counter()
        call(i % n_items)
        latencies.append(time.perf_counter() - start)
        i += 1
    return np.array(latencies)


def line(name: str, latencies: np.ndarray, seconds: float) -> tuple[float, float]:
    rate = len(latencies) / seconds
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    print(f"  {name:<34} {rate:8.1f} /s   p50 {p50:7.2f} ms   p99 {p99:7.2f} ms")
    return rate, p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--library", default=os.environ.get("ASSET_LIBRARY_HOME", "library"))
    parser.add_argument("--threads", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--lookups-only", action="store_true", help="measure lookups alone")
    parser.add_argument(
        "--attributes", action="store_true", help="measure attribute pages alone (scale.py)"
    )
    parser.add_argument("--page", type=int, default=100, help="rows per attribute page")
    parser.add_argument("--depth", type=int, default=1000, help="the deep page's number")
    parser.add_argument("--bare-app", help=argparse.SUPPRESS)  # run the baseline app: store path
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_app:
        import uvicorn

        uvicorn.run(bare_app(args.bare_app), host="127.0.0.1", port=args.port, log_level="error")
        return
    library = Library(args.library)
    if args.attributes:
        attribute_pages(library, args.page, args.depth, args.seconds)
        return
    rows = library.query("SELECT md5 FROM images")
    random.Random(0).shuffle(rows)
    md5s = [r["md5"] for r in rows]
    answered = library.lookup(md5s[0])["answered_by"]
    if args.lookups_only:
        uploads, bodies = [], []
    else:
        store = library.object_store()
        uploads = [store.get(object_key(m)) for m in md5s[:64]]
        bodies = [multipart("image", "query", data) for data in uploads]
    print(f"library {library.path}: {len(md5s)} images; {args.threads} HTTP clients, "
          f"{args.seconds:g} s per measurement; {os.cpu_count()} cores; "
          f"lookups answered by the {answered}")  # fmt: skip

    cases: list[tuple[str, Request, int, Callable[[int], object]]] = [
        ("lookup  GET /images/{md5}",
         lambda i: ("GET", f"/images/{md5s[i]}", None, {}), len(md5s),
         lambda i: library.lookup(md5s[i])),
        ("similar POST /similar?md5=",
         lambda i: ("POST", f"/similar?md5={md5s[i]}", None, {}), len(md5s),
         lambda i: library.similar(md5s[i])),
        ("upload  POST /similar (image)",
         lambda i: ("POST", "/similar?min_quality=0", bodies[i][0],
                    {"Content-Type": bodies[i][1]}), len(bodies),
         lambda i: library.similar(uploads[i], min_quality=None)),
    ]  # fmt: skip
    if args.lookups_only:
        cases = cases[:1]
    with tempfile.TemporaryDirectory() as cache:
        port = free_port()
        server = start_server(library.path, Path(cache), port)
        try:
            results = {}
            for name, request, n, direct in cases:
                over_http(port, request, n, args.threads, 1.0)  # warm up
                in_process(direct, n, 1.0)
                print(name)
                measured = in_process(direct, n, args.seconds)
                base_rate, base_p50 = line("Library in-process, 1 thread", measured, args.seconds)
                for clients in sorted({1, args.threads}):
                    measured = over_http(port, request, n, clients, args.seconds)
                    rate, p50 = line(f"HTTP, {clients} client(s)", measured, args.seconds)
                    results[f"{name}, {clients} client(s)"] = (rate / base_rate, p50 / base_p50)
                    print(f"    ratio to in-process: {rate / base_rate:.2f}x the rate, "
                          f"{p50 / base_p50:.2f}x the p50 latency")  # fmt: skip
            results.update(against_bare(library, md5s, port, args.threads, args.seconds))
            print(json.dumps({k: [round(a, 3), round(b, 3)] for k, (a, b) in results.items()}))
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)


def attribute_pages(library: Library, page: int, depth: int, seconds: float) -> None:
    """The store's and the lake's time for the same attribute pages, and the service's."""
    images = library.query("SELECT count(*) AS n FROM images")[0]["n"]
    common = library.query(  # the deep page's cursor: the md5 before its first row
        "SELECT md5 FROM md5s_with_attribute('label', 'cat') ORDER BY md5 LIMIT 1 OFFSET ?",
        [page * (depth - 1) - 1],
    )
    deep = common[0]["md5"] if common else None
    answered = library.images_with_attribute("label", "cat", limit=page)["answered_by"]
    rare = library.query("SELECT count(*) AS n FROM md5s_with_attribute('score', '7')")[0]["n"]
    print(f"library {library.path}: {images} images; pages of {page} rows; {os.cpu_count()} "
          f"cores; attribute pages answered by the {answered}")  # fmt: skip
    readers = {"store": library.store_attribute_page, "lake": library.lake_attribute_page}

    def pages(
        answered_by: str, value: tuple[str, str], after: str, limit: int, every: bool, images: bool
    ):
        """One page (``limit`` rows after ``after``; one more row to know if another
        follows, as ``images_with_attribute`` asks), or every page from there. A rare value
        is another each call (``score`` 7, 8, ...: each 0.1%), so no call finds the pages of
        the one before in a cache."""
        read = readers[answered_by]

        def call(i: int) -> int:
            start, rows = after, 0
            name, text = value if value[0] != "score" else ("score", str((7 + i) % 1000))
            while True:
                found = read(name, text, origin=None, after=start, limit=limit + 1, images=images)
                rows += min(len(found), limit)
                if not every or len(found) <= limit:
                    return rows
                start = found[limit - 1]["md5"]

        return call

    rare_name = f"rare value (score=7, 8, ...: {rare} rows), every page of 1000"
    cases = [
        (rare_name, ("score", "7"), "", 1000, True, True),
        (f"{rare_name}, md5s only", ("score", "7"), "", 1000, True, False),
        ("common value (label=cat), first page", ("label", "cat"), "", page, False, True),
        (f"common value (label=cat), page {depth}", ("label", "cat"), deep, page, False, True),
    ]
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        port = free_port()
        server = start_server(library.path, Path(cache), port)
        try:
            for name, value, after, limit, every, images in cases:
                if after is None:
                    print(f"{name}: the value has fewer than {depth} pages")
                    continue
                print(name)
                p50 = {}
                for answered_by in readers:
                    call = pages(answered_by, value, after, limit, every, images)
                    call(-1)  # warm
                    measured = in_process(call, 1000, seconds)
                    p50[answered_by] = line(f"Library, {answered_by}", measured, seconds)[1]
                results[name] = p50["lake"] / p50["store"]
                print(f"    lake / store: {results[name]:.1f}x the p50 latency")
                if not every:
                    query = f"/attributes/images?attr={value[0]}&val={value[1]}&limit={limit}"
                    query += f"&after={after}" if after else ""

                    def request(_: int, q: str = query) -> tuple[str, str, None, dict[str, str]]:
                        return "GET", q, None, {}

                    over_http(port, request, 1, 1, 1.0)  # warm up
                    measured = over_http(port, request, 1, 1, seconds)
                    http_p50 = line("HTTP GET /attributes/images, 1 client", measured, seconds)[1]
                    print(f"    HTTP / Library store: {http_p50 / p50['store']:.2f}x the p50")
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))


def against_bare(
    library: Library, md5s: list[str], port: int, threads: int, seconds: float
) -> dict[str, tuple[float, float]]:
    """GET /images/{md5} on the service and on the bare app, side by side: the service's rate
    and p99 as ratios to the bare app's (targets: >= 0.4x the rate with one client, p99
    within 3x with ``threads``)."""
    bare_port = free_port()
    scratch = Path(tempfile.mkdtemp(prefix="bare-"))
    built = bare_store(library.layout.serving_store_path, scratch / "bare.sqlite")
    bare = start_bare(built, bare_port)
    results = {}
    try:
        request: Request = lambda i: ("GET", f"/images/{md5s[i]}", None, {})  # noqa: E731
        print("lookup  GET /images/{md5}: the service against a bare Starlette + SQLite app")
        for clients in sorted({1, threads}):
            over_http(bare_port, request, len(md5s), clients, 1.0)  # warm up
            measured = over_http(bare_port, request, len(md5s), clients, seconds)
            bare_rate, _ = line(f"bare app, {clients} client(s)", measured, seconds)
            bare_p99 = float(np.percentile(measured, 99))
            measured = over_http(port, request, len(md5s), clients, seconds)
            rate, _ = line(f"service, {clients} client(s)", measured, seconds)
            p99 = float(np.percentile(measured, 99))
            print(f"    service / bare: {rate / bare_rate:.2f}x the rate, "
                  f"{p99 / bare_p99:.2f}x the p99")  # fmt: skip
            results[f"service/bare, {clients} client(s)"] = (rate / bare_rate, p99 / bare_p99)
    finally:
        bare.send_signal(signal.SIGINT)
        bare.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
