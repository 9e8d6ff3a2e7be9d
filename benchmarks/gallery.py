"""A near-duplicate group of thousands on the gallery: its first page and its last.

Run by hand from the project root (never in CI; a few minutes to build, seconds to measure)::

    uv run python benchmarks/gallery.py [--members 3000] [--at /dev/shm/gallery-lib]

It builds a library whose largest group holds ``--members`` copies of one corpus photo, each a
pixel apart (distinct md5s, the same pHash), ingested as any folder is. Then, on the real app
(FastAPI's TestClient, in this process), alternating, best of ``--rounds``:

- ``whole``: ``GET /duplicates/{n}``, every member in one answer (the read the group page made
  before it was cut into pages, without the HTML);
- ``first``: ``GET /groups/{n}``, the first page of the group;
- ``last``: ``GET /groups/{n}?after=<md5>``, its last page, by the cursor the next links carry.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
from fastapi.testclient import TestClient
from PIL import Image

from asset_library import Library
from asset_library.runs.orchestrate import ingest_batch
from asset_library.serve import ServeSettings, create_app

PHOTO = Path(__file__).parents[1] / "../shared/corpus/github_jenssegers_imagehash/forest"


def build(root: Path, members: int) -> None:
    """``members`` PNGs of one photo, each with one pixel changed, ingested into ``root``."""
    folder = root.parent / f"{root.name}-source"
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.open(PHOTO / "forest-high.jpg").convert("RGB").resize((96, 96))
    for n in range(members):
        copy = base.copy()
        copy.putpixel((n % 96, n // 96 % 96), (n % 251, n // 251 % 251, 7))
        copy.save(folder / f"copy-{n:06d}.png")
    with dg.instance_for_test() as instance:
        ingest_batch(
            str(folder), library=root, workers=2, environ={}, instance=instance,
            progress=lambda _: None,
        )  # fmt: skip
    shutil.rmtree(folder)


def best(client: TestClient, url: str) -> float:
    start = time.perf_counter()
    reply = client.get(url)
    assert reply.status_code == 200, (url, reply.status_code)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3000)
    parser.add_argument("--at", type=Path, help="a folder for the library (kept if given)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    temp = (
        None if args.at else tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    root = args.at or Path(temp or ".") / "library"
    if not (root / "library.json").exists():
        started = time.perf_counter()
        build(root, args.members)
        print(f"built {root} in {time.perf_counter() - started:.0f} s")
    groups = Library(root).near_duplicate_groups()
    number = max(range(len(groups)), key=lambda n: len(groups[n]))
    settings = ServeSettings(library=root, cache_dir=Path(tempfile.mkdtemp()))
    with TestClient(create_app(settings)) as client:
        url, pages = f"/groups/{number}", []
        while url:
            pages.append(url)
            found = re.search(r'href="([^"]+)" rel="next"', client.get(url).text)
            url = found.group(1) if found else None
        urls = {"whole": f"/duplicates/{number}", "first": pages[0], "last": pages[-1]}
        times: dict[str, float] = {name: float("inf") for name in urls}
        for _ in range(args.rounds):
            for name, url in urls.items():
                times[name] = min(times[name], best(client, url))
    if temp:
        shutil.rmtree(temp, ignore_errors=True)
    print(f"group {number}: {len(groups[number]):,} members, {len(pages)} pages")
    for name, seconds in times.items():
        print(f"{name:6} {seconds * 1000:8.1f} ms")
    print(f"last / first {times['last'] / times['first']:.2f}")
    print(f"whole / first {times['whole'] / times['first']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
