"""The gallery's browsing pages on real libraries: a group a bounded page at a time with the
members' distances, the batches and a page per batch, the empty states, and every value from
the library escaped."""

from __future__ import annotations

import html
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from asset_library import Library
from asset_library.layout import LibraryLayout
from asset_library.serve import ServeSettings, batch_pages, create_app, group_page

MEMBER = re.compile(
    r'<div class="member" data-md5="([0-9a-f]{32})" '
    r'data-phash="(\d+)" data-dhash="(\d+)" data-ahash="(\d+)">'
)


def _client(root: Path, cache: Path) -> TestClient:
    return TestClient(create_app(ServeSettings(library=root, cache_dir=cache)))


@pytest.fixture(scope="module")
def client(corpus_library, tmp_path_factory) -> Iterator[TestClient]:
    with _client(corpus_library[0], tmp_path_factory.mktemp("gallery-cache")) as live:
        yield live


@pytest.fixture(scope="module")
def library(corpus_library) -> Library:
    return Library(corpus_library[0])


def _link(body: str, rel: str) -> str | None:
    found = re.search(rf'href="([^"]+)" rel="{rel}"', body)
    return html.unescape(found.group(1)) if found else None


def _walk(client: TestClient, url: str | None, rel: str) -> list[list[tuple[str, ...]]]:
    """Every page from ``url`` following its ``rel`` links: each page's members."""
    pages = []
    while url:
        reply = client.get(url)
        assert reply.status_code == 200, url
        pages.append(MEMBER.findall(reply.text))
        url = _link(reply.text, rel)
    return pages


def test_a_group_is_shown_a_bounded_page_at_a_time_with_its_distances(client, library, monkeypatch):
    groups = library.near_duplicate_groups()
    number, members = max(enumerate(groups), key=lambda g: len(g[1]))
    per_page = len(members) // 3  # the corpus's largest group, in three or four pages
    assert per_page >= 1
    monkeypatch.setattr(group_page, "MEMBERS_PER_PAGE", per_page)
    ahead = _walk(client, f"/groups/{number}", "next")
    assert all(1 <= len(page) <= per_page for page in ahead)
    assert len(ahead) == -(-len(members) // per_page)
    assert {m[0] for m in ahead[0]}.isdisjoint(m[0] for m in ahead[1])
    assert [m[0] for page in ahead for m in page] == sorted(members)
    # back from the last page by the previous links: the same pages
    last = f"/groups/{number}?after={ahead[-2][-1][0]}"
    assert _walk(client, last, "prev") == ahead[::-1]
    # the distances to the first member, from the hashes as the lake holds them (hex text)
    hashes = {r["md5"]: r for r in library.query("SELECT md5, phash, dhash, ahash FROM images")}
    first = hashes[min(members)]
    for md5, *distances in (m for page in ahead for m in page):
        expected = [
            (int(hashes[md5][kind], 16) ^ int(first[kind], 16)).bit_count()
            for kind in ("phash", "dhash", "ahash")
        ]
        assert [int(d) for d in distances] == expected, md5
    assert [int(d) for d in ahead[0][0][1:]] == [0, 0, 0]
    shown = client.get(f"/groups/{number}").text
    assert f"images 1-{per_page} of {len(members)}" in shown and 'rel="prev"' not in shown


def test_a_group_page_refuses_a_bad_cursor_naming_it(client):
    for query, name in (("after=zz", "after"), (f"before={'g' * 32}", "before")):
        reply = client.get(f"/groups/0?{query}")
        assert reply.status_code == 422 and f"{name}: not an md5" in reply.text
    both = client.get(f"/groups/0?after={'0' * 32}&before={'f' * 32}")
    assert both.status_code == 422 and "not both" in both.text


def test_home_lists_recent_batches_and_largest_groups_each_bounded(client, library, corpus_library):
    body = client.get("/").text
    batches = body.split('id="recent-batches"')[1].split("</section>")[0]
    largest = body.split('id="largest-groups"')[1].split("</section>")[0]
    # other tests may add batches to the shared corpus library: the newest five are shown
    listed = re.findall(r'href="/batches/([^"]+)"', batches)
    total = len(list((corpus_library[0] / "triggers").glob("*.json")))
    assert 1 <= len(listed) == min(total, 5) and (f"all {total:,} batches" in batches) == (
        total > 5
    )
    assert f'href="/batches/{corpus_library[1].batch}"' in client.get("/batches").text
    linked = re.findall(r'href="/groups/(\d+)"', largest)
    total = len(library.near_duplicate_groups())
    assert linked == [str(n) for n in range(min(total, 5))]
    assert (f"all {total:,} groups" in largest) == (total > 5)
    assert 'id="drop"' in body and 'id="results"' in body  # the search is still there


def test_a_batch_page_counts_what_the_catalog_holds(client, library, corpus_library, monkeypatch):
    batch = corpus_library[1].batch
    body = client.get(f"/batches/{batch}").text

    def count(sql: str) -> int:
        return library.query(sql, [batch])[0]["n"]

    images = count("SELECT count(DISTINCT md5) AS n FROM occurrences WHERE batch = ?")
    rejects = count("SELECT count(*) AS n FROM rejects WHERE batch = ?")
    assert f"<tr><th>images</th><td>{images:,}</td></tr>" in body
    assert f"<tr><th>rejects</th><td>{rejects:,}</td></tr>" in body
    by_reason = library.query(
        "SELECT reason, count(*) AS n FROM rejects WHERE batch = ? GROUP BY reason", [batch]
    )
    assert rejects and by_reason
    for row in by_reason:
        assert f">{row['reason']}</a></td><td>{row['n']:,}</td>" in body
    shards = re.findall(r"<tr><td class='mono'>([^<]+)</td>", body)
    assert len(shards) == corpus_library[1].shards == 4
    # the corpus was ingested on a test instance that is gone: the page says the states are unknown
    assert "shard states unknown: no Dagster instance" in body
    shown = re.findall(r'class="tile" href="/view/([0-9a-f]{32})"', body)
    in_batch = {
        r["md5"]
        for r in library.query("SELECT DISTINCT md5 FROM occurrences WHERE batch = ?", [batch])
    }
    assert 0 < len(shown) <= 12 and set(shown) <= in_batch
    monkeypatch.setattr(batch_pages, "SHARDS_PER_PAGE", 3)  # the shards a page at a time
    paged = [client.get(f"/batches/{batch}?page={n}") for n in (1, 2, 3)]
    assert [re.findall(r"<tr><td class='mono'>([^<]+)</td>", p.text) for p in paged[:2]] == [
        shards[:3],
        shards[3:],
    ]
    assert paged[2].status_code == 404 and "past the end" in paged[2].text
    assert client.get("/batches/no_such_batch").status_code == 404
    bad = client.get("/batches/a..b")
    assert bad.status_code == 422 and "invalid batch id" in bad.text


def test_an_empty_library_says_what_is_empty_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("ASSET_LIBRARY_LANDING", raising=False)
    layout = LibraryLayout.open(tmp_path / "library")
    with _client(layout.root, tmp_path / "cache") as live:
        home = live.get("/")
        batches = live.get("/batches").text
        groups = live.get("/groups").text
    assert home.status_code == 200
    for body in (home.text, batches):
        assert f"No batches yet — land a folder in <code>{layout.landing_dir}</code>" in body
        assert "asset-library ingest &lt;folder&gt;" in body
    for body in (home.text, groups):
        assert "the near-duplicate groups are computed by the refresh" in body


HOSTILE_FOLDER = 'in"><script>alert(1)<'
HOSTILE_FILE = "<svg onload=alert(2)>.jpg"


@pytest.mark.slow  # an ingest through Dagster
def test_a_hostile_source_is_escaped_and_shard_states_are_what_status_says(
    run_cli, tmp_path, corpus_dir
):
    folder = tmp_path / HOSTILE_FOLDER
    folder.mkdir()
    forest = corpus_dir / "github_jenssegers_imagehash/forest"
    for n, image in enumerate(sorted(forest.glob("*.jpg"))[:3]):
        shutil.copy(image, folder / f"{n}{HOSTILE_FILE}")
    code, out, err = run_cli("ingest", str(folder))
    assert code == 0, err
    root = tmp_path / "library"
    status = run_cli("status")[1]
    batch = re.search(r"^(\S+)\s+\d+ images", status, re.M)
    assert batch is not None
    states = dict(re.findall(r"^  (\S+)  (\w+)$", status, re.M))
    assert len(states) == 1
    with _client(root, tmp_path / "cache") as live:
        pages = {
            path: live.get(path).text for path in ("/", "/batches", f"/batches/{batch.group(1)}")
        }
    for path, body in pages.items():
        assert "<script>alert" not in body and "<svg onload" not in body, path
        assert html.escape(HOSTILE_FOLDER) in body or html.escape(HOSTILE_FILE) in body, path
    page = pages[f"/batches/{batch.group(1)}"]
    assert html.escape(HOSTILE_FILE) in page  # a sample image's name
    assert "No rejects in this batch: every source it read was ingested." in page
    shown = dict(re.findall(r"<tr><td class='mono'>([^<]+)</td><td>[\d,]+</td><td>[\d,]+</td>"
                            r"<td>(\w+)</td></tr>", page))  # fmt: skip
    assert shown == states and set(states.values()) == {"materialized"}
    assert f"{len(states)} materialized" in page
    tally = Counter(states.values())
    assert all(f"{n:,} {state}" in pages["/"] for state, n in tally.items())


def test_the_groups_page_shows_each_groups_first_members(client, library):
    groups = library.near_duplicate_groups()
    body = client.get("/groups").text
    for number, members in enumerate(groups[:20]):
        row = body.split(f'<a href="/groups/{number}">Group {number}</a>')[1]
        row = row.split("</section>")[0]
        shown = re.findall(r'class="tile" href="/view/([0-9a-f]{32})"', row)
        assert shown == sorted(members)[:9], number
        assert (f"+{len(members) - 9} more" in row) == (len(members) > 9)
