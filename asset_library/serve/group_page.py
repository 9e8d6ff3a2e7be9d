"""One near-duplicate group, a page of members at a time, each with its Hamming distances to
the group's first image (the smallest md5).

Pages are cut by a cursor (``after`` / ``before`` an md5), not an offset: a group can hold
thousands of images, and a deep page costs what the first does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from asset_library.ids import bucket_of, is_md5
from asset_library.library import Library
from asset_library.serve import reads
from asset_library.serve.pages import borrow, e, error_page, layout, tile

#: The most members a group page shows.
MEMBERS_PER_PAGE = 60
#: The hashes whose distances a member shows, the first the one groups are made by.
HASHES = ("phash", "dhash", "ahash")

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class MemberPage:
    """A slice of a group in md5 order: its members, where it starts, and the group's ends."""

    size: int
    first: str
    last: str
    before: int  # members before this slice
    members: list[dict[str, Any]]


def member_page(
    library: Library, group: int, after: str | None, before: str | None, limit: int
) -> MemberPage | None:
    """Up to ``limit`` members after ``after`` (or before ``before``), with ``<hash>_distance``
    to the group's first member; ``None`` if there is no such group."""
    cursor = before or after or ""
    ends = library.query(
        "SELECT count(*) AS size, min(md5) AS first, max(md5) AS last, "
        "count(*) FILTER (WHERE md5 <= ?) AS upto, count(*) FILTER (WHERE md5 < ?) AS below "
        "FROM near_duplicates WHERE group_id = ?",
        [cursor, cursor, group],
    )[0]
    if not ends["size"]:
        return None
    cut, order = ("md5 < ?", "DESC") if before else ("md5 > ?", "")
    md5s = [
        r["md5"]
        for r in library.query(
            f"SELECT md5 FROM near_duplicates WHERE group_id = ? AND {cut} "
            f"ORDER BY md5 {order} LIMIT ?",
            [group, cursor, limit],
        )
    ]
    rows = {r["md5"]: r for r in image_summaries(library, sorted({*md5s, ends["first"]}))}
    first = rows.get(ends["first"])  # absent only from a groups file older than the lake
    members = [
        {**rows[md5], **{f"{h}_distance": _bits(rows[md5], first, h) for h in HASHES}}
        for md5 in sorted(md5s)
        if md5 in rows
    ]
    preceding = ends["below"] - len(md5s) if before else ends["upto"]
    return MemberPage(ends["size"], ends["first"], ends["last"], preceding, members)


def image_summaries(library: Library, md5s: list[str]) -> list[dict[str, Any]]:
    """The images' summaries and hashes, in md5 order. The keys and their buckets are bound
    as literal lists, so that only the buckets that hold them are read (a subquery would read
    every bucket)."""
    if not md5s:
        return []
    buckets = sorted({bucket_of(md5, library.lake.n_buckets) for md5 in md5s})
    hashes = ", ".join(f"{h}_int" for h in HASHES)
    return library.query(
        f"SELECT {reads.SUMMARY_COLUMNS}, {hashes} FROM images "
        f"WHERE bucket IN ({', '.join('?' * len(buckets))}) "
        f"AND md5 IN ({', '.join('?' * len(md5s))}) ORDER BY md5",
        [*buckets, *md5s],
    )


def _bits(image: dict[str, Any], first: dict[str, Any] | None, kind: str) -> int | None:
    if first is None:
        return None
    return int(image[f"{kind}_int"] ^ first[f"{kind}_int"]).bit_count()


def member_tile(member: dict[str, Any]) -> str:
    """A member's tile, its pHash distance on the thumbnail and every distance below it."""
    if member["phash_distance"] is None:
        return f'<div class="member" data-md5="{e(member["md5"])}">{tile(member)}</div>'
    shown = " · ".join(f"{h[0]}Hash {member[f'{h}_distance']}" for h in HASHES)
    marks = " ".join(f'data-{h}="{int(member[h + "_distance"])}"' for h in HASHES)
    badge = f"{member['phash_distance']} bits"
    return (
        f'<div class="member" data-md5="{e(member["md5"])}" {marks}>{tile(member, badge)}'
        f'<span class="dist">{e(shown)} bits</span></div>'
    )


@router.get("/groups/{group}")
def group_page(
    request: Request,
    group: Annotated[int, Path(ge=0, le=reads.MAX_ID)],
    after: str = "",
    before: str = "",
) -> Response:
    for name, value in (("after", after), ("before", before)):
        if value and not is_md5(value):
            message = f"{name}: not an md5 key: {value!r} (expected 32 hexadecimal digits)"
            return error_page("Bad request", message, 422)
    if after and before:
        return error_page("Bad request", "give after or before, not both", 422)
    with borrow(request) as library:
        found = member_page(
            library, group, after.lower() or None, before.lower() or None, MEMBERS_PER_PAGE
        )
    if found is None:
        return error_page("Not found", f"no near-duplicate group {group}", 404)
    members = found.members
    base = f"/groups/{group}"
    back = '<span class="off">← previous</span>'
    ahead = '<span class="off">next →</span>'
    if members and members[0]["md5"] > found.first:
        back = f'<a href="{base}?before={members[0]["md5"]}" rel="prev">← previous</a>'
    if members and members[-1]["md5"] < found.last:
        ahead = f'<a href="{base}?after={members[-1]["md5"]}" rel="next">next →</a>'
    if members:
        where = (
            f"images {found.before + 1:,}-{found.before + len(members):,} of {found.size:,}"
            if found.size > len(members)
            else f"{found.size:,} images"
        )
        grid = "".join(member_tile(m) for m in members)
    else:
        where = f"{found.size:,} images"
        grid = f'<p class="muted">No images here: <a href="{base}">the first page</a>.</p>'
    pager = f'<nav class="pager">{back}<span>{where}</span>{ahead}</nav>'
    if found.size <= len(members):
        pager = ""  # all of it on one page
    body = (
        f'<p><a href="/groups">← all groups</a></p><h1>Group {group}</h1>'
        f'<p class="lede">{where}, in md5 order. Each shows its Hamming distances (bits of 64) '
        f'to the group\'s first image, <a href="/view/{found.first}">{found.first}</a>.</p>'
        f'{pager}<section class="grid" id="members">{grid}</section>{pager}'
    )
    return layout(f"Group {group}", body, "Near-duplicates")


def largest_groups(library: Library, limit: int, offset: int, thumbs: int = 0) -> reads.Page:
    """Groups largest first (their numbering): ``group``, ``size`` and the first ``thumbs``
    md5s (``md5s``), however large the group: its members are on its own page."""
    total = library.query("SELECT count(DISTINCT group_id) AS n FROM near_duplicates")[0]["n"]
    rows = library.query(
        "SELECT group_id AS group, any_value(group_size) AS size FROM near_duplicates "
        "GROUP BY group_id ORDER BY group_id LIMIT ? OFFSET ?",
        [limit, offset],
    )
    firsts: dict[int, list[str]] = {row["group"]: [] for row in rows}
    if thumbs and rows:
        for row in library.query(
            "SELECT group_id, md5 FROM near_duplicates WHERE group_id IN (SELECT unnest(?)) "
            "QUALIFY row_number() OVER (PARTITION BY group_id ORDER BY md5) <= ? "
            "ORDER BY group_id, md5",
            [list(firsts), thumbs],
        ):
            firsts[row["group_id"]].append(row["md5"])
    return reads.Page(total, limit, offset, [{**r, "md5s": firsts[r["group"]]} for r in rows])
