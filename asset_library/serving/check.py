"""Checking the store: whether it answers as the lake does, for the ``serving_store_level``
check."""

from __future__ import annotations

import random
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from asset_library.lake import row_count
from asset_library.serving.backend import Backend, SqliteBackend
from asset_library.serving.reader import StoreUnavailable
from asset_library.serving.runs import Run, newest, parse_runs, table
from asset_library.serving.schema import STORE_FORMAT


@dataclass
class StoreCheck:
    """The store against the lake: row counts, and the records of a sample of md5s."""

    passed: bool
    store_rows: int
    lake_rows: int
    sampled: int
    differing: list[str]
    reason: str


def check_store(library: Any, sample: int = 100, seed: int | None = None) -> StoreCheck:
    """Whether the store of ``library`` (a ``Library``) answers as the lake does: as many
    image rows as ``images``, and the same record from both for ``sample`` md5s drawn from the
    store (the first md5 at or after a random one: a cost that does not grow with the
    library; an md5 the store lacks shows in the row count)."""
    lake_rows = row_count(library.lake.open("images"))
    backend = library.serving_backend
    if backend is None:
        return StoreCheck(False, 0, lake_rows, 0, [], "the library has no serving store")
    draw = random.Random(seed)
    try:
        with closing(backend.connect_reader()) as connection:
            cursor = connection.cursor()
            if isinstance(backend, SqliteBackend):
                cursor.execute("BEGIN")  # one snapshot: runs merged away between reads or not
            cursor.execute("SELECT key, value FROM meta")
            meta = dict(cursor.fetchall())
            if meta.get("format") != STORE_FORMAT:
                layout = meta.get("format")
                return StoreCheck(False, 0, lake_rows, 0, [], f"store of layout {layout!r}")
            runs = parse_runs(meta.get("runs"))
            store_rows, chosen = _count_and_sample(backend, cursor, runs, sample, draw)
    except (*backend.errors, FileNotFoundError) as error:
        return StoreCheck(False, 0, lake_rows, 0, [], f"store unreadable: {error}")
    differing = []
    for md5 in sorted(chosen):
        try:
            stored = library.store_record(md5)
        except StoreUnavailable as why:
            return StoreCheck(False, store_rows, lake_rows, 0, [], str(why))
        if stored != library.lake_record(md5):
            differing.append(md5)
    reasons = []
    if store_rows != lake_rows:
        reasons.append(f"{store_rows} image rows in the store, {lake_rows} in images")
    if differing:
        reasons.append(f"{len(differing)} of {len(chosen)} sampled records differ")
    return StoreCheck(
        not reasons, store_rows, lake_rows, len(chosen), differing, "; ".join(reasons) or "level"
    )


def _count_and_sample(
    backend: Backend, cursor: Any, runs: list[Run], sample: int, draw: random.Random
) -> tuple[int, set[str]]:
    """The images the store has (their newest row a record) and up to ``sample`` md5s drawn
    from it (the first at or after a random md5, over every run: one seek a run)."""
    if not runs:
        return 0, set()
    cursor.execute(
        f"SELECT count(*) FROM ({newest('images', runs, 'record')}) latest WHERE record IS NOT NULL"
    )
    store_rows = int(cursor.fetchone()[0])
    first = " UNION ALL ".join(
        f"SELECT (SELECT min(md5) FROM {table('images', run)} WHERE md5 >= :start) AS m"
        for run in runs
    )
    sql = backend.reader_sql(f"SELECT min(m) FROM ({first}) firsts")
    chosen = set()
    for _ in range(sample if store_rows else 0):
        cursor.execute(sql, {"start": f"{draw.getrandbits(128):032x}"})
        found = cursor.fetchone()[0]
        if found is None:  # past the last md5: the first
            cursor.execute(sql, {"start": ""})
            found = cursor.fetchone()[0]
        chosen.add(found)
    return store_rows, chosen


def count_images(cursor: Any, runs: list[Run]) -> int:
    """The images a store has over ``runs`` (those whose newest row is a record)."""
    if not runs:
        return 0
    cursor.execute(
        f"SELECT count(*) FROM ({newest('images', runs, 'record')}) latest WHERE record IS NOT NULL"
    )
    return int(cursor.fetchone()[0])


def stored_runs(cursor: Any) -> list[Run]:
    """The runs a store's ``meta`` lists."""
    cursor.execute("SELECT value FROM meta WHERE key = 'runs'")
    found = cursor.fetchone()
    return parse_runs(found[0] if found else None)
