"""The gallery: server-rendered pages over the same reads as the API, with a little JavaScript
for the search upload. Everything it loads is served here (no CDN, no web fonts)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from asset_library.ids import check_md5, is_md5
from asset_library.lake.catalog import MACRO_HELP, macro_signature
from asset_library.library import Library
from asset_library.search.thresholds import DEFAULT_MIN_QUALITY, DEFAULT_PHASH_THRESHOLD
from asset_library.serve import batch_pages, group_page, reads
from asset_library.serve.auth import COOKIE
from asset_library.serve.batch_states import recent_batches
from asset_library.serve.pages import borrow, e, error_page, layout, pager, past_the_end, tile
from asset_library.similarity import IndexNotReady

GROUPS_PER_PAGE = 20
#: Thumbnails shown in a group's row on the groups page; the group page shows them all, a
#: bounded page at a time.
ROW_THUMBS = 9
REJECTS_PER_PAGE = 50

router = APIRouter(include_in_schema=False)
router.include_router(group_page.router)
router.include_router(batch_pages.router)
#: A page number: from 1, and small enough that its first row is a catalog offset.
PageNumber = Annotated[
    int, Query(ge=1, le=reads.MAX_OFFSET // max(GROUPS_PER_PAGE, REJECTS_PER_PAGE))
]


#: The batches and the groups ``/`` lists; the rest are on their own pages.
HOME_ROWS = 5
NO_GROUPS = (
    "No near-duplicate groups yet: the near-duplicate groups are computed by the refresh "
    "(the <code>refresh_library</code> job, which <code>asset-library ingest</code> runs after "
    "its shards)."
)


@router.get("/")
def home(request: Request) -> Response:
    with borrow(request) as library:
        by_format = library.query(
            "SELECT format, count(*) AS n FROM images GROUP BY format ORDER BY n DESC, format"
        )
        rejects = library.query("SELECT count(*) AS n FROM rejects")[0]["n"]
        groups = group_page.largest_groups(library, HOME_ROWS, 0)
        batches = recent_batches(library.layout, HOME_ROWS, 0)
        recent = (
            batch_pages.batch_table(request, library, batches)
            if batches.records
            else batch_pages.no_batches(library)
        )
    images = sum(r["n"] for r in by_format)
    formats = ", ".join(f"{r['n']} {e(r['format'])}" for r in by_format)
    more_batches = (
        f'<p><a href="/batches">all {batches.total:,} batches →</a></p>'
        if batches.total > len(batches.records)
        else ""
    )
    group_rows = "".join(
        f'<li><a href="/groups/{g["group"]}">Group {g["group"]}</a> '
        f'<span class="muted">{g["size"]:,} images</span></li>'
        for g in groups.items
    )
    largest = (
        f'<ul class="groups">{group_rows}</ul>'
        if group_rows
        else f'<p class="empty">{NO_GROUPS}</p>'
    )
    more_groups = (
        f'<p><a href="/groups">all {groups.total:,} groups →</a></p>' if groups.has_next else ""
    )
    body = f"""
<section class="hero">
  <h1>Find an image's near-duplicates</h1>
  <p class="lede">{images:,} images{f" ({formats})" if formats else ""} ·
  <a href="/groups">{groups.total:,} near-duplicate groups</a> ·
  <a href="/rejected">{rejects:,} rejects</a> ·
  <a href="/batches">{batches.total:,} batch{"es" if batches.total != 1 else ""}</a></p>
  <label id="drop" class="drop" for="file">
    <input id="file" type="file" accept="image/*" hidden>
    <img id="query-preview" alt="" hidden>
    <span class="hint"><strong>Drop an image here</strong> or click to choose one</span>
  </label>
  <form id="options" class="options">
    <label>max distance <input name="max_distance" type="number" min="0" max="64"
      value="{DEFAULT_PHASH_THRESHOLD}"></label>
    <label>hash <select name="hash"><option>phash</option><option>dhash</option>
      <option>ahash</option></select></label>
    <label>min quality <input name="min_quality" type="number" min="0" max="100"
      value="{DEFAULT_MIN_QUALITY}"></label>
    <label class="check"><input name="transforms" type="checkbox" value="dihedral">
      rotated &amp; mirrored copies</label>
  </form>
</section>
<p id="status" class="status" role="status"></p>
<section id="results" class="grid"></section>
<section id="recent-batches"><h2>Recent batches</h2>{recent}{more_batches}</section>
<section id="largest-groups"><h2>Largest near-duplicate groups</h2>{largest}{more_groups}</section>
"""
    return layout("Search", body, "Search")


@router.get("/lookup")
def lookup(md5: str = "") -> Response:
    md5 = md5.strip()
    if not is_md5(md5):
        message = f"not an md5 key: {md5!r} (expected 32 hexadecimal digits)"
        return error_page("Not an md5", message, 422)
    return RedirectResponse(f"/view/{md5.lower()}", status_code=303)


@router.get("/view/{md5}")
def view(request: Request, md5: str) -> Response:
    if not is_md5(md5):
        message = f"not an md5 key: {md5!r} (expected 32 hexadecimal digits)"
        return error_page("Not an md5", message, 422)
    key = check_md5(md5)
    with borrow(request) as library:
        record = library.lookup(key)
        if record is None:
            message = f"no image with md5 {key} in the library"
            return error_page("Not found", message, 404)
        near = _similar_or_why_not(library, key)
        group = library.query("SELECT group_id FROM near_duplicates WHERE md5 = ?", [key])
    shown = {k: v for k, v in record.items() if k not in ("attributes", "sources")}
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(_text(v))}</td></tr>" for k, v in shown.items())
    attributes = "".join(  # where each value came from, so neither passes for the other
        f'<tr><th>{e(k)}</th><td>{e(_text(v))}</td><td class="muted">{e(origin)}</td></tr>'
        for origin, named in record["attributes"].items()
        for k, v in named.items()
    )
    sources = "".join(f"<li>{e(uri)}</li>" for uri in record["sources"])
    in_group = (
        f'<p>In <a href="/groups/{group[0]["group_id"]}">near-duplicate group '
        f"{group[0]['group_id']}</a>.</p>"
        if group
        else ""
    )
    if isinstance(near, str):
        similar = f'<p class="muted">{e(near)}</p>'
    else:
        others = [r for r in near if r["md5"] != key]
        similar = "".join(tile(r, f"{r['distance']} bits") for r in others)
        similar = similar or '<p class="muted">No other image within the default distance.</p>'

    body = f"""
<h1 class="mono">{key}</h1>
<div class="record">
  <a class="big" href="/images/{key}/bytes"><img src="/images/{key}/thumb" alt="image {key}"></a>
  <div><table class="kv">{rows}</table>{in_group}
  <p><a href="/images/{key}">JSON</a> · <a href="/images/{key}/bytes">original bytes</a></p></div>
</div>
<h2>Attributes</h2><table class="kv">{attributes}</table>
<h2>Sources</h2><ul class="sources">{sources}</ul>
<h2>Similar images</h2><section class="grid">{similar}</section>
"""
    return layout(key, body)


def _similar_or_why_not(library: Library, md5: str) -> list[dict[str, Any]] | str:
    """The image's nearest images, or why they can't be shown now."""
    try:
        return library.similar(md5, limit=40)
    except (ValueError, IndexNotReady) as error:
        return f"No search: {error}"


def _text(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


@router.get("/groups")
def groups(request: Request, page: PageNumber = 1) -> Response:
    with borrow(request) as library:
        found = group_page.largest_groups(
            library, GROUPS_PER_PAGE, (page - 1) * GROUPS_PER_PAGE, ROW_THUMBS
        )
        shown = [md5 for g in found.items for md5 in g["md5s"]]
        details = {r["md5"]: r for r in group_page.image_summaries(library, shown)}
    pages = max(1, math.ceil(found.total / GROUPS_PER_PAGE))
    if page > pages:
        return past_the_end("/groups", page, pages)
    rows = []
    for row in found.items:
        number, more = row["group"], row["size"] - ROW_THUMBS
        tiles = "".join(tile(details.get(m, {"md5": m})) for m in row["md5s"])
        tail = f'<a class="more" href="/groups/{number}">+{more} more</a>' if more > 0 else ""
        rows.append(
            f'<section class="group"><h2><a href="/groups/{number}">Group {number}</a> '
            f'<span class="muted">{row["size"]} images</span></h2>'
            f'<div class="row">{tiles}{tail}</div></section>'
        )
    body = (
        f"<h1>Near-duplicate groups</h1><p class='lede'>{found.total:,} groups, largest first: "
        "images the similarity index links within the default distance.</p>"
        + ("".join(rows) or f'<p class="empty">{NO_GROUPS}</p>')
        + pager("/groups", page, pages)
    )
    return layout("Near-duplicate groups", body, "Near-duplicates")


@router.get("/rejected")
def rejected(request: Request, reason: str = "", page: PageNumber = 1) -> Response:
    with borrow(request) as library:
        counts = reads.stats(library)["rejects"]
        found = reads.rejects(
            library, reason or None, REJECTS_PER_PAGE, (page - 1) * REJECTS_PER_PAGE
        )
    chips = [f'<a href="/rejected"{" class=active" if not reason else ""}>all '
             f"<b>{sum(counts.values())}</b></a>"]  # fmt: skip
    for name, n in counts.items():
        active = " class=active" if name == reason else ""
        chips.append(f'<a href="/rejected?reason={quote(name)}"{active}>{e(name)} <b>{n}</b></a>')
    rows = "".join(
        f"<tr><td class='src' title='{e(r['source_uri'])}'>{e(r['source_uri'])}</td>"
        f"<td><span class='reason'>{e(r['reason'])}</span></td><td>{e(r['message'])}</td>"
        f"<td class='mono small'>{e(r['batch'])}</td></tr>"
        for r in found.items
    )
    pages = max(1, math.ceil(found.total / REJECTS_PER_PAGE))
    if page > pages:
        return past_the_end("/rejected", page, pages, reason=reason)
    body = (
        f"<h1>Rejects</h1><nav class='chips'>{''.join(chips)}</nav>"
        "<table class='list'><thead><tr><th>source</th><th>reason</th><th>message</th>"
        f"<th>batch</th></tr></thead><tbody>{rows}</tbody></table>"
        + pager("/rejected", page, pages, reason=reason)
    )
    return layout("Rejects", body, "Rejects")


@router.get("/docs")
def docs(request: Request) -> Response:
    """The API reference from the OpenAPI schema, without Swagger UI's CDN scripts."""
    schema = request.app.openapi()
    rows = []
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            params = ", ".join(
                f"{p['name']}{'' if p.get('required') else '?'}" for p in op.get("parameters", [])
            )
            if "requestBody" in op:
                params = ", ".join(filter(None, [params, "multipart image?"]))
            rows.append(
                f"<tr><td><span class='method'>{method.upper()}</span></td>"
                f"<td class='mono'>{e(path)}</td><td>{e(op.get('summary'))}</td>"
                f"<td class='mono small'>{e(params)}</td></tr>"
            )
    macro_rows = "".join(
        f"<tr><td class='mono'>{e(macro_signature(name))}</td><td>{e(MACRO_HELP[name])}</td></tr>"
        for name in MACRO_HELP
    )
    body = (
        "<h1>API</h1><p class='lede'>JSON over HTTP, read-only. The full schema is at "
        "<a href='/openapi.json'>/openapi.json</a>; errors are <code>{\"detail\": ...}</code>."
        "</p><table class='list'><thead><tr><th></th><th>path</th><th>what</th>"
        f"<th>parameters</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        "<h2>Table macros</h2><p class='lede'><code>GET /query/{macro}?argument=value</code>, "
        "each argument by its name.</p><table class='list'><thead><tr><th>macro</th>"
        f"<th>what</th></tr></thead><tbody>{macro_rows}</tbody></table>"
    )
    return layout("API", body, "API")


@router.get("/login")
def login_form() -> Response:
    body = (
        "<h1>Token required</h1><p class='lede'>This library is served beyond loopback: "
        "enter its token (ASSET_LIBRARY_TOKEN).</p><form method='post' action='/login' "
        "class='login'><input type='password' name='token' autofocus aria-label='token'>"
        "<button>Open the gallery</button></form>"
    )
    return layout("Token required", body)


@router.post("/login")
def login(request: Request, token: str = Form()) -> Response:
    """Keep the token in an HttpOnly cookie; a wrong one is refused on the next page."""
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
    return response
