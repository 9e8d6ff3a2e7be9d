"""The store as runs: each sync writes what changed as a new run of tables (``images_7``,
``counts_7``, ``sources_7``, ``attributes_7``), in md5 order, so its pages are appended and a
sync costs what its shard holds however large the store is. (Changes written into one table
keyed by md5 landed on every page of it once the store held more pages than a shard rows: at
9.1M images a 1M-image shard's sync rewrote the whole 14.6 GB file, 5.7x shard 2's cost.)

A run holds changes, read newest first: an image's or a source's newest row wins (a ``NULL``
record or source URI: removed), counts and attribute counts add up over the runs (an attribute
value is the image's while its sum is above 0). Runs of one size tier merge into one once
``fan_in`` of them follow each other (:func:`runs_to_merge`), as the lake's files do
(:mod:`asset_library.lake.tiers`): a row is rewritten once per tier, and a reader has a few runs
to combine. ``meta`` lists the runs (``runs``: ``id:rows`` oldest first); a reader reads that
list in the snapshot it reads rows in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from asset_library.lake.tiers import tier_of

#: The tables a run holds, each named ``<table>_<run id>``.
RUN_TABLES = ("images", "counts", "sources", "attributes")
#: Runs of one tier merged into one: a reader combines at most ``fan_in - 1`` a tier.
FAN_IN = 4
#: Runs of fewer rows are tier 0 (a log scale's offset: a test's sync, a few changed images).
TIER_ROWS = 4096
#: The columns of each table a run holds after its key (the key first, then the rest).
KEYS = {
    "images": ("md5",),
    "counts": ("md5",),
    "sources": ("md5", "ingested_at", "shard", "ordinal"),
    "attributes": ("md5", "origin", "attribute", "value", "value_type"),
}


@dataclass(frozen=True)
class Run:
    """One run: its id (its tables' suffix; newer runs have larger ids) and its rows."""

    id: int
    rows: int


def parse_runs(text: str | None) -> list[Run]:
    """The runs ``meta`` lists (``id:rows`` oldest first, comma-separated)."""
    if not text:
        return []
    runs = []
    for part in text.split(","):
        run, _, rows = part.partition(":")
        runs.append(Run(int(run), int(rows)))
    return runs


def format_runs(runs: Sequence[Run]) -> str:
    """``meta``'s text for ``runs`` (oldest first)."""
    return ",".join(f"{run.id}:{run.rows}" for run in runs)


def table(name: str, run: Run | int) -> str:
    """A run's table: ``images_7``."""
    return f"{name}_{run.id if isinstance(run, Run) else run}"


def by_value_index(run: Run | int) -> str:
    """A run's index of its attribute rows by value, in md5 order."""
    return f"{table('attributes', run)}_by_value"


def union(name: str, runs: Sequence[Run], columns: str, where: str = "") -> str:
    """One select over every run's ``name`` table, each row with its run's id (``run``)."""
    condition = f" WHERE {where}" if where else ""
    return " UNION ALL ".join(
        f"SELECT {columns}, {run.id} AS run FROM {table(name, run)}{condition}" for run in runs
    )


def newest(name: str, runs: Sequence[Run], columns: str, where: str = "") -> str:
    """The newest row of each key of ``name`` over ``runs`` (``columns`` after the key), with
    its ``run``: the row that counts (a ``NULL`` value in it means removed)."""
    key = ", ".join(KEYS[name])
    if len(runs) == 1:  # one run: its rows are the newest
        return union(name, runs, f"{key}, {columns}", where)
    rows = union(name, runs, f"{key}, {columns}", where)
    return (
        f"SELECT {key}, {columns}, run FROM (SELECT *, row_number() OVER (PARTITION BY {key} "
        f"ORDER BY run DESC) AS newest_first FROM ({rows}) unioned) ranked WHERE newest_first = 1"
    )


def runs_to_merge(runs: Sequence[Run], fan_in: int = FAN_IN, tier_rows: int = TIER_ROWS) -> int:
    """How many of the newest runs to merge into one now (0: none).

    Only runs next to each other in age merge (the newest row must stay the newest). From the
    lowest tier up: the newest runs of that tier or below, taken while they last, merge once
    ``fan_in`` of them are of that tier; a small run stranded between larger ones joins the
    next merge over it."""
    tiers = [tier_of(run.rows, fan_in, tier_rows) for run in runs]
    for tier in sorted(set(tiers)):
        taken = 0
        for found in reversed(tiers):
            if found > tier:
                break
            taken += 1
        if sum(1 for found in tiers[len(tiers) - taken :] if found == tier) >= fan_in:
            return taken
    return 0
