"""What every gallery page is made of: the frame, escaping, tiles, pagers and error pages.

Every value that comes from the library (names, URIs, messages) goes through :func:`e`."""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse


def e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def layout(title: str, body: str, active: str = "", status: int = 200) -> HTMLResponse:
    links = [("/", "Search"), ("/groups", "Near-duplicates"), ("/batches", "Batches")]
    links.append(("/rejected", "Rejects"))
    links.append(("/docs", "API"))
    nav = "".join(
        f'<a href="{href}"{" class=active" if label == active else ""}>{label}</a>'
        for href, label in links
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · asset-library</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/gallery.css">
</head><body>
<header class="bar"><a class="brand" href="/">asset&#8209;library</a><nav>{nav}</nav>
<form class="lookup" action="/lookup" method="get" role="search">
<input name="md5" placeholder="look up an md5" aria-label="md5" spellcheck="false"></form>
</header>
<main>{body}</main>
<script src="/static/gallery.js" defer></script>
</body></html>"""
    return HTMLResponse(page, status_code=status)


def error_page(title: str, message: str, status: int) -> HTMLResponse:
    """A page that says what was wrong, with the status that says it to a program."""
    return layout(title, f'<p class="error">{e(message)}</p>', status=status)


def past_the_end(base: str, page: int, pages: int, **params: str) -> HTMLResponse:
    """A 404 for a page number beyond the last, linking to the last page."""
    query = urlencode({**{k: v for k, v in params.items() if v}, "page": pages})
    body = (
        f'<p class="error">page {page:,} is past the end: there {"is" if pages == 1 else "are"} '
        f"{pages:,} page{'' if pages == 1 else 's'}.</p>"
        f'<p><a href="{base}?{e(query)}">the last page</a></p>'
    )
    return layout("No such page", body, status=404)


def tile(image: dict[str, Any], badge: str | None = None) -> str:
    """One thumbnail linking to the image's page."""
    md5 = image["md5"]
    name = str(image.get("source_uri") or "").rsplit("/", 1)[-1]
    size = f"{image.get('width')}×{image.get('height')} {image.get('format') or ''}"
    mark = f'<span class="badge">{e(badge)}</span>' if badge is not None else ""
    return (
        f'<a class="tile" href="/view/{md5}" title="{e(image.get("source_uri"))}">'
        f'<span class="frame"><img src="/images/{md5}/thumb" alt="{e(name)}" loading="lazy">'
        f'{mark}</span><span class="meta"><span class="name">{e(name)}</span>'
        f'<span class="dims">{e(size)}</span></span></a>'
    )


def pager(base: str, page: int, pages: int, **params: str) -> str:
    if pages <= 1:
        return ""

    def link(number: int, label: str) -> str:
        query = urlencode({**{k: v for k, v in params.items() if v}, "page": number})
        return f'<a href="{base}?{query}">{label}</a>'

    back = link(page - 1, "← previous") if page > 1 else '<span class="off">← previous</span>'
    ahead = link(page + 1, "next →") if page < pages else '<span class="off">next →</span>'
    return f'<nav class="pager">{back}<span>page {page} of {pages}</span>{ahead}</nav>'


def borrow(request: Request) -> Any:
    return request.app.state.libraries.borrow()
