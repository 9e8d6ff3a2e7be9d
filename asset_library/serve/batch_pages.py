"""The batches: a page listing them newest first, and a page per batch with its shards and
their states, its counts, its rejects by reason and a few of its images."""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from asset_library.ids import InvalidIdError, check_batch_id
from asset_library.ingest.triggers import TriggerRecord
from asset_library.library import Library
from asset_library.serve import reads
from asset_library.serve.batch_states import BatchList, ShardStates, batch_plan, recent_batches
from asset_library.serve.group_page import image_summaries
from asset_library.serve.pages import borrow, e, error_page, layout, pager, past_the_end, tile

#: The most batches a page of batches lists, the most shards a batch page lists, and the
#: images a batch page shows.
BATCHES_PER_PAGE = 50
SHARDS_PER_PAGE = 100
SAMPLE_IMAGES = 12

router = APIRouter(include_in_schema=False)


def shard_states(request: Request) -> ShardStates:
    states: ShardStates = request.app.state.shard_states
    return states


def batch_counts(library: Library, batches: list[str]) -> dict[str, dict[str, int]]:
    """Each batch's images (distinct md5s), occurrences and rejects in the catalog."""
    counts = {b: {"images": 0, "occurrences": 0, "rejects": 0} for b in batches}
    for row in library.query(
        "SELECT batch, count(DISTINCT md5) AS images, count(*) AS occurrences FROM occurrences "
        "WHERE batch IN (SELECT unnest(?)) GROUP BY batch",
        [batches],
    ):
        counts[row["batch"]].update(images=row["images"], occurrences=row["occurrences"])
    for row in library.query(
        "SELECT batch, count(*) AS n FROM rejects WHERE batch IN (SELECT unnest(?)) GROUP BY batch",
        [batches],
    ):
        counts[row["batch"]]["rejects"] = row["n"]
    return counts


def state_summary(states: dict[str, str] | str, shards: list[str]) -> str:
    """``4 materialized, 1 failed``, or why the states are unknown."""
    if isinstance(states, str):
        return f'<span class="muted">{len(shards):,} shards, states unknown</span>'
    tally = Counter(states[s] for s in shards)
    shown = ", ".join(f'<span class="state {e(s)}">{n:,} {e(s)}</span>' for s, n in tally.items())
    return shown or '<span class="muted">no shards</span>'


def batch_table(request: Request, library: Library, found: BatchList) -> str:
    """The batches of ``found`` as table rows: counts, shards and their states."""
    records: list[TriggerRecord] = found.records
    counts = batch_counts(library, [r.batch for r in records])
    states = shard_states(request).of([s for r in records for s in r.shards])
    rows = "".join(
        f'<tr><td class="mono"><a href="/batches/{e(r.batch)}">{e(r.batch)}</a></td>'
        f"<td>{e(r.triggered_at)}</td><td class='src' title='{e(r.source)}'>{e(r.source)}</td>"
        f"<td>{counts[r.batch]['images']:,} of {r.images:,} planned</td>"
        f"<td>{counts[r.batch]['rejects']:,}</td><td>{state_summary(states, r.shards)}</td></tr>"
        for r in records
    )
    return (
        "<table class='list'><thead><tr><th>batch</th><th>planned</th><th>source</th>"
        "<th>images</th><th>rejects</th><th>shards</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def landing_zone(library: Library) -> str:
    """Where the landing sensor looks for batches: as the Dagster resources have it."""
    return os.environ.get("ASSET_LIBRARY_LANDING") or str(library.layout.landing_dir)


def no_batches(library: Library) -> str:
    """What an empty library says, and how to fill it."""
    root = library.layout.root
    return (
        f'<p class="empty">No batches yet — land a folder in <code>{e(landing_zone(library))}'
        f"</code> (with its marker) or run <code>asset-library ingest &lt;folder&gt; --library "
        f"{e(root)}</code>.</p>"
    )


PageNumber = Annotated[int, Query(ge=1, le=reads.MAX_OFFSET // BATCHES_PER_PAGE)]


@router.get("/batches")
def batches(request: Request, page: PageNumber = 1) -> Response:
    with borrow(request) as library:
        found = recent_batches(library.layout, BATCHES_PER_PAGE, (page - 1) * BATCHES_PER_PAGE)
        pages = max(1, math.ceil(found.total / BATCHES_PER_PAGE))
        if page > pages:
            return past_the_end("/batches", page, pages)
        table = batch_table(request, library, found) if found.records else no_batches(library)
    body = (
        f"<h1>Batches</h1><p class='lede'>{found.total:,} batches, the newest first.</p>"
        f"{table}{pager('/batches', page, pages)}"
    )
    return layout("Batches", body, "Batches")


@router.get("/batches/{batch}")
def batch_page(request: Request, batch: str, page: PageNumber = 1) -> Response:
    try:
        check_batch_id(batch)
    except InvalidIdError as error:
        return error_page("Bad request", f"batch: {error}", 422)
    with borrow(request) as library:
        plan = batch_plan(library.layout, batch)
        counts = batch_counts(library, [batch])[batch]
        by_shard = {
            r["shard"]: r
            for r in library.query(
                "SELECT shard, count(DISTINCT md5) AS images, count(*) AS occurrences "
                "FROM occurrences WHERE batch = ? GROUP BY shard",
                [batch],
            )
        }
        by_reason = library.query(
            "SELECT reason, count(*) AS n FROM rejects WHERE batch = ? GROUP BY reason "
            "ORDER BY n DESC, reason",
            [batch],
        )
        firsts = library.query(
            "SELECT DISTINCT md5 FROM (SELECT md5 FROM occurrences WHERE batch = ? "
            "ORDER BY shard, ordinal LIMIT ?) ORDER BY md5",
            [batch, SAMPLE_IMAGES],
        )
        samples = image_summaries(library, [r["md5"] for r in firsts])
    if plan is None and not (counts["occurrences"] or counts["rejects"]):
        message = f"no batch {batch} in this library (its batches are listed at /batches)"
        return error_page("Not found", message, 404)
    planned = {s.key: s.images for s in plan.shards} if plan else {}
    shards = list(planned) if plan else sorted(by_shard)
    pages = max(1, math.ceil(len(shards) / SHARDS_PER_PAGE))
    if page > pages:
        return past_the_end(f"/batches/{batch}", page, pages)
    states = shard_states(request).of(shards)
    shown = shards[(page - 1) * SHARDS_PER_PAGE : page * SHARDS_PER_PAGE]
    shard_rows = "".join(
        f"<tr><td class='mono'>{e(s)}</td><td>{planned.get(s, 0):,}</td>"
        f"<td>{by_shard.get(s, {}).get('images', 0):,}</td>"
        f"<td>{e('unknown' if isinstance(states, str) else states[s])}</td></tr>"
        for s in shown
    )
    reasons = "".join(
        f'<tr><td><a href="/rejected?reason={e(quote(r["reason"]))}">{e(r["reason"])}</a></td>'
        f"<td>{r['n']:,}</td></tr>"
        for r in by_reason
    )
    rejects = (
        f"<table class='list'><thead><tr><th>reason</th><th>rejects</th></tr></thead>"
        f"<tbody>{reasons}</tbody></table>"
        if reasons
        else '<p class="empty">No rejects in this batch: every source it read was ingested.</p>'
    )
    images = "".join(tile(image) for image in samples) or (
        '<p class="empty">No images from this batch in the catalog yet: its shards put them '
        "there as they finish (see their states above).</p>"
    )
    source = f"{e(plan.source)}, planned {e(plan.planned_at)}" if plan else "no plan file"
    body = (
        f'<p><a href="/batches">← all batches</a></p><h1 class="mono">{e(batch)}</h1>'
        f"<p class='lede'>{source}</p><table class='kv'>"
        f"<tr><th>images</th><td>{counts['images']:,}</td></tr>"
        f"<tr><th>occurrences</th><td>{counts['occurrences']:,}</td></tr>"
        f"<tr><th>rejects</th><td>{counts['rejects']:,}</td></tr>"
        f"<tr><th>planned</th><td>{plan.images if plan else 0:,}</td></tr>"
        f"<tr><th>shards</th><td>{state_summary(states, shards)}</td></tr></table>"
        f"<h2>Shards</h2>"
        + (f'<p class="muted">{e(states)}</p>' if isinstance(states, str) else "")
        + "<table class='list'><thead><tr><th>shard</th><th>planned</th><th>images</th>"
        f"<th>state</th></tr></thead><tbody>{shard_rows}</tbody></table>"
        f"{pager(f'/batches/{batch}', page, pages)}"
        f"<h2>Rejects by reason</h2>{rejects}"
        f"<h2>Some of its images</h2><section class='grid'>{images}</section>"
        f"<p><a href='/query/images_in_batch?batch_id={e(batch)}'>all of them (JSON)</a></p>"
    )
    return layout(batch, body, "Batches")
