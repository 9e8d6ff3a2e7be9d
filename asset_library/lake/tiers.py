"""Which files of a bucket compaction merges: size tiers, so a row is rewritten once per tier.

A file's tier is a step of a log scale of its size in rows (the log's exact count: a merge of
files holds their sum, where bytes shrink or grow with compression and each file's footer):
tier 0 under ``tier_rows``, tier ``t`` from ``tier_rows * fan_in ** (t - 1)`` up to ``fan_in``
times that. A shard's commit adds small files; once a tier holds ``fan_in`` files they are
merged into one, about ``fan_in`` times as large, so it lands a tier up, where it may complete
that tier in turn (planned in the same pass: each bucket is rewritten at most once per
compaction). Files of higher tiers are
left alone until their own tier fills. A row is thus rewritten about once per tier it climbs,
``log_fan_in(bucket / shard file)`` times in its life, and a bucket holds at most
``fan_in - 1`` files per tier between compactions.

Every bucket of a table receives a shard's rows at once, so the buckets carry at once too: the
shard that fills a high tier would rewrite that much of the library in one run.
:func:`within_budget` caps a run's bytes, the most crowded buckets first; the rest wait for the
next run, so each run costs about the same.

With ``tier_rows`` above every file (everything in tier 0), this is the whole-bucket rewrite:
a bucket of ``fan_in`` files or more merged into one; ``fan_in`` 1 rewrites every bucket whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Files of one tier that make it merge into one (and the size ratio between tiers).
FAN_IN = 8
#: Files of fewer rows are tier 0: under one row group of the tables read by md5
#: (``table.BY_MD5_ROW_GROUP``), where a file is mostly its footer. A log scale's offset only:
#: empty tiers cost nothing, and a tier-0 merge rewrites at most ``fan_in`` times this. A shard
#: of 10M images writes ~39k occurrences rows to each of 256 buckets (tier 2, of 32k-256k
#: rows); a bucket of a billion images, ~3.9M rows, reaches tier 4 (2M-16M).
TIER_ROWS = 4096


@dataclass(frozen=True)
class DataFile:
    """One live file of a bucket, as the Delta log lists it."""

    path: str
    rows: int
    size: int


def tier_of(rows: int, fan_in: int = FAN_IN, tier_rows: int = TIER_ROWS) -> int:
    """The tier of a file of ``rows`` rows."""
    tier, bound = 0, tier_rows
    while rows >= bound:
        tier, bound = tier + 1, bound * max(fan_in, 2)
    return tier


def check_policy(fan_in: int, tier_rows: int) -> None:
    """A clear error for a policy that cannot terminate or means nothing."""
    if fan_in < 1:
        raise ValueError(f"compaction fan_in {fan_in}: must be 1 or more (files merged at once)")
    if tier_rows < 1:
        raise ValueError(f"compaction tier_rows {tier_rows}: must be a positive number of rows")


def files_to_merge(
    files: Sequence[DataFile], fan_in: int = FAN_IN, tier_rows: int = TIER_ROWS
) -> list[DataFile]:
    """The files of one bucket to merge into one now (none: the bucket is left as it is).

    From the lowest tier up: a tier holding ``fan_in`` files (counting the file the merge so
    far would make, of the sum of its inputs' rows) joins the merge; a tier that does not
    stops it. So the small files go first, and a large file is read only when its tier is full."""
    check_policy(fan_in, tier_rows)
    if fan_in == 1:  # every bucket rewritten whole, a single file too
        return list(files)
    by_tier: dict[int, list[DataFile]] = {}
    for found in files:
        by_tier.setdefault(tier_of(found.rows, fan_in, tier_rows), []).append(found)
    chosen: list[DataFile] = []
    for tier in sorted(by_tier):
        present = len(by_tier[tier])
        if chosen:  # the merged file lands in some tier: this one counts it, if it is this one
            lands = tier_of(sum(f.rows for f in chosen), fan_in, tier_rows)
            if lands > tier:
                continue  # it goes past this tier, whose files stay
            if lands < tier:
                break
            present += 1
        if present >= fan_in:
            chosen.extend(by_tier[tier])
        elif chosen:
            break
    return chosen


def within_budget(
    plan: dict[int, list[DataFile]], files: dict[int, list[DataFile]], max_bytes: int | None
) -> dict[int, list[DataFile]]:
    """The buckets of ``plan`` (each one's files to merge) that one run merges: all of them if
    ``max_bytes`` is ``None``, else those whose merges read at most ``max_bytes`` in all (at
    least one), the buckets holding the most files first (the slowest to read; a bucket left
    waiting gains files, so it comes first next time), then the lowest numbers."""
    if max_bytes is None:
        return plan
    if max_bytes < 1:
        raise ValueError(f"compaction max_bytes {max_bytes}: must be a positive number of bytes")
    chosen: dict[int, list[DataFile]] = {}
    spent = 0
    for bucket in sorted(plan, key=lambda b: (-len(files.get(b, ())), b)):
        cost = sum(f.size for f in plan[bucket])
        if chosen and spent + cost > max_bytes:
            continue  # a smaller merge further down may still fit
        chosen[bucket] = plan[bucket]
        spent += cost
    return chosen
