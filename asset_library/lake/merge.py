"""``images``: merged from the ``occurrences`` change feed, never computed on a read.

:func:`merge_images` folds in what changed in ``occurrences`` since its last merge (the change
data feed, version by version), recording the occurrences version it reached as a Delta app
transaction (``transaction_version(IMAGES_APP)``). A merge appends: new md5s to ``images``,
count changes to ``image_counts``; it rewrites ``images`` files only for md5s that lost an
occurrence. Its commit boundaries can be crashed at on purpose (:data:`CRASH_AT`), and the md5s
``images`` holds are cached beside the library (:mod:`.keyset`) so a merge need not read them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError

from asset_library.lake.history import changes_no_row, commit_history, rewrites
from asset_library.lake.keyset import CachedKeys, ImageKeys, KeyCacheError, digests
from asset_library.lake.scan import lake_dataset, plain_schema
from asset_library.lake.schemas import (
    IMAGE_COUNTS_SCHEMA,
    IMAGES_SCHEMA,
    OCCURRENCES_SCHEMA,
    SHARD_MARK,
)
from asset_library.lake.table import Lake, row_count, small_pages, writer_options

logger = logging.getLogger(__name__)

#: How many times a merge that lost a commit race to another merge reads the tables again.
MERGE_ATTEMPTS = 8
#: The Delta app id under which ``images`` records the occurrences version it has merged.
IMAGES_APP = "asset_library.images"


@dataclass
class MergeResult:
    """What one merge did: occurrences versions folded in, buckets and md5s touched."""

    from_version: int
    to_version: int
    shards: list[str] = field(default_factory=list)
    buckets: list[int] = field(default_factory=list)
    md5s: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    duplicated_md5s: int = 0
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return self.to_version > self.from_version


def merged_version(lake: Lake) -> int:
    """The occurrences version ``images`` has merged up to (-1 before any merge)."""
    images = lake.open("images")
    if images is None:
        return -1
    version = images.transaction_version(IMAGES_APP)
    return -1 if version is None else int(version)


def read_changes(
    lake: Lake, table: DeltaTable, start: int, end: int, columns: list[str]
) -> pa.Table:
    """Rows inserted and deleted in versions ``start..end`` of ``table`` (change data feed),
    less the commits that only rewrote rows as they were (compaction's sorted rewrite, which
    Delta records as every row of its buckets deleted and inserted again: reading them cost a
    merge after a compaction the whole table twice, to net them out)."""
    wanted = [*columns, "_change_type", "_commit_version", "_commit_timestamp"]
    skipped = rewrites(lake, table, start, end)
    parts = []
    first = start
    for version in [*sorted(skipped), end + 1]:
        if first <= version - 1:
            reader = table.load_cdf(
                starting_version=first, ending_version=version - 1, columns=wanted
            )
            parts.append(pa.RecordBatchReader.from_stream(reader).read_all())
        first = version + 1
    if not parts:  # nothing in the range but rewrites (or an empty range)
        declared = plain_schema(pa.schema(table.schema().to_arrow()))
        change = [("_change_type", pa.string()), ("_commit_version", pa.int64())]
        return pa.schema(
            [declared.field(c) for c in columns]
            + [pa.field(n, t) for n, t in change]
            + [pa.field("_commit_timestamp", pa.timestamp("ms"))]
        ).empty_table()
    return pa.concat_tables(parts)


#: The custom metadata key naming the merge that made an ``images`` commit (a new id each).
MERGE_MARK = "asset_library.merge"


def shards_not_merged(lake: Lake) -> list[str] | None:
    """The shards whose rows landed in ``occurrences`` after the version ``images`` has merged
    up to, from their commits' :data:`SHARD_MARK`: what the next refresh folds in. ``None`` if
    the history cannot be read."""
    occurrences = lake.open("occurrences")
    if occurrences is None:
        return []
    entries = commit_history(lake, occurrences, merged_version(lake) + 1, occurrences.version())
    if entries is None:
        return None
    return sorted({entry[SHARD_MARK] for entry in entries.values() if entry.get(SHARD_MARK)})


def _level_check(lake: Lake, images: DeltaTable, version: int) -> Callable[[int, str], bool]:
    """Whether the key cache made by merge ``merge`` at ``cached`` is level with ``images`` at
    ``version``: that commit is still there as that merge made it (not a lake restored from a
    copy, or another lake's), and every commit since changed no row (compaction's rewrite, a
    vacuum)."""

    def check(cached: int, merge: str) -> bool:
        entries = commit_history(lake, images, cached, version)
        if entries is None or set(entries) != set(range(cached, version + 1)):
            return False
        if entries[cached].get(MERGE_MARK) != merge:
            return False
        return all(changes_no_row(entries[v]) for v in range(cached + 1, version + 1))

    return check


def merge_images(lake: Lake) -> MergeResult:
    """Fold every occurrences commit since the last merge into ``images`` and ``image_counts``.

    An md5 new to ``images`` is appended once (its first occurrence and its count then); an md5
    already there that only gained occurrences gets one ``image_counts`` row with the gain:
    no ``images`` file is rewritten. Only an md5 that lost an occurrence (its shard was replaced
    or emptied) is recomputed from its current occurrences in its bucket and rewritten (or
    deleted) by a Delta ``MERGE``, its ``image_counts`` rows offset to zero. Two commits:
    ``image_counts`` first, then ``images``, each recording the occurrences version reached.
    A merge cut between them left ``image_counts`` ahead of ``images``: the next merge first
    makes that range's ``images`` commit (from the occurrences as of the version counted, and
    without counting it again), then merges what landed since, so every occurrence counts
    once whatever landed in between. Two merges at once (two machines refreshing one library)
    make one's commit fail with a conflict: that one reads the tables again and merges what is
    left, up to :data:`MERGE_ATTEMPTS` times. Then md5 uniqueness is checked in the touched
    buckets."""
    for attempt in range(1, MERGE_ATTEMPTS + 1):
        try:
            with small_pages():
                return _merge_images(lake)
        except CommitFailedError as error:
            if attempt == MERGE_ATTEMPTS:
                raise
            logger.info("images merge met another merge's commit (%s): merging again", error)
            time.sleep(random.uniform(0.1, 0.5) * attempt)
    raise AssertionError("unreachable")


def _merge_images(lake: Lake) -> MergeResult:
    started = time.perf_counter()
    occurrences = lake.table("occurrences")
    images = lake.table("images")
    counts = lake.table("image_counts")
    last = merged_version(lake)
    counted = counted_version(lake)
    now = occurrences.version()
    if counted > now:
        raise ValueError(
            f"{lake.uri('image_counts')} records occurrences version {counted}, beyond the "
            f"latest of {lake.uri('occurrences')} ({now}): these tables are not one lake's"
        )
    keys = ImageKeys(lake.image_keys, lake.layout) if lake.image_keys is not None else None
    done: list[MergeResult] = []
    if counted > last:  # a merge of last+1..counted committed image_counts, then stopped:
        # its images commit is made from the same range, its counts are not written twice
        reached = DeltaTable(
            lake.uri("occurrences"), version=counted, storage_options=dict(lake.storage_options)
        )
        done.append(_merge_range(lake, reached, images, counts, keys, last, counted, False))
        last = counted
    if now > last:
        done.append(_merge_range(lake, occurrences, images, counts, keys, last, now, True))
    first = done[0].from_version if done else last
    result = MergeResult(from_version=first, to_version=done[-1].to_version if done else last)
    for part in done:
        result.shards = sorted({*result.shards, *part.shards})
        result.buckets = sorted({*result.buckets, *part.buckets})
        result.md5s += part.md5s
        result.inserted += part.inserted
        result.updated += part.updated
        result.deleted += part.deleted
        result.duplicated_md5s += part.duplicated_md5s
    result.seconds = time.perf_counter() - started
    return result


def counted_version(lake: Lake) -> int:
    """The occurrences version ``image_counts`` has counted up to (-1 before any merge).
    Ahead of :func:`merged_version` only after a merge stopped between its two commits."""
    counts = lake.open("image_counts")
    version = None if counts is None else counts.transaction_version(IMAGES_APP)
    return -1 if version is None else int(version)


def _merge_range(
    lake: Lake,
    occurrences: DeltaTable,
    images: DeltaTable,
    counts: DeltaTable,
    keys: ImageKeys | None,
    last: int,
    now: int,
    write_counts: bool,
) -> MergeResult:
    """Fold occurrences versions ``last + 1..now`` (``occurrences`` loaded at ``now``) into
    ``images``, and into ``image_counts`` unless an earlier merge of this range already
    committed them there (``write_counts`` false)."""
    result = MergeResult(from_version=last, to_version=now)
    images.update_incremental()
    counts.update_incremental()
    changes = read_changes(lake, occurrences, last + 1, now, [f.name for f in OCCURRENCES_SCHEMA])
    # delta-rs annotates the table id as int; it is the table's UUID text
    start, table_id, merge = images.version(), str(images.metadata().id), uuid.uuid4().hex
    cached = (
        keys.level_with(table_id, start, _level_check(lake, images, start), row_count(images))
        if keys is not None
        else None
    )
    with duckdb.connect() as connection:
        connection.register("changes", changes)
        # One row per occurrence that changed: n > 0 added, n < 0 removed, 0 (rewritten
        # unchanged, or added then removed within the range) dropped.
        connection.execute(
            """
            CREATE TEMP TABLE net AS
            SELECT * EXCLUDE (_change_type, _commit_version, _commit_timestamp, r) FROM (
              SELECT *, sum(CASE WHEN _change_type = 'insert' THEN 1 ELSE -1 END)
                        OVER (PARTITION BY md5, shard, ordinal, ingested_at) AS n,
                     row_number() OVER (PARTITION BY md5, shard, ordinal, ingested_at
                                        ORDER BY _commit_version DESC) AS r
              FROM changes WHERE _change_type IN ('insert', 'delete'))
            WHERE r = 1 AND n <> 0 AND md5 IS NOT NULL
            """
        ).fetchall()
        summary = connection.execute(
            "SELECT list(DISTINCT shard), list(DISTINCT bucket) FROM changes"
        ).fetchall()[0]
        result.shards = sorted(s for s in (summary[0] or []) if s)
        touched = sorted({int(b) for b in (summary[1] or []) if b is not None})
        result.buckets = touched
        rebuild = keys is not None and cached is None
        plan = _merge_plan(connection, lake, images, occurrences, counts, touched, cached, rebuild)
    result.md5s = plan.md5s
    if write_counts:
        crash_point("image_counts")
        write_deltalake(
            counts,
            plan.counts,
            mode="append",
            partition_by=["bucket"],
            commit_properties=_merged_to(now, merge),
        )
        result.updated = plan.counts.num_rows
    crash_point("images")
    if plan.recomputed.num_rows:
        source = pa.concat_tables([plan.new.cast(_SOURCE_SCHEMA), plan.recomputed])
        metrics = (
            images.merge(
                source,
                predicate=_bucket_predicate(touched) + " AND t.md5 = s.md5",
                source_alias="s",
                target_alias="t",
                commit_properties=_merged_to(now, merge),
            )
            .when_matched_delete(predicate="s.mode = 'set' AND s.occurrences = 0")
            .when_matched_update(updates=_SET_UPDATES, predicate="s.mode = 'set'")
            .when_not_matched_insert(updates=_INSERT, predicate="s.occurrences > 0")
            .execute()
        )
        result.inserted = int(metrics.get("num_target_rows_inserted", 0))
        result.updated += int(metrics.get("num_target_rows_updated", 0))
        result.deleted = int(metrics.get("num_target_rows_deleted", 0))
    else:  # the usual case: new md5s appended, sorted by md5 so a lookup skips row groups
        write_deltalake(
            images,
            plan.new.drop_columns(["mode"]).cast(IMAGES_SCHEMA),
            mode="append",
            partition_by=["bucket"],
            **writer_options("images"),
            commit_properties=_merged_to(now, merge),
        )
        result.inserted = plan.new.num_rows
    crash_point("image_keys")
    if keys is not None:
        _keep_keys(keys, plan, table_id, images.version(), merge)
    result.duplicated_md5s = plan.duplicated
    return result


#: The environment variable naming a merge's commit boundary at which the process kills
#: itself (SIGKILL), as a crash there would: ``image_counts`` (before that commit), ``images``
#: (between the two commits), ``image_keys`` (after both); ``<name>@<n>``: the n-th time the
#: process reaches it. How a crash at each boundary is rehearsed on real tables.
CRASH_AT = "ASSET_LIBRARY_CRASH_AT"
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Kill this process here if :data:`CRASH_AT` names this boundary (and this time)."""
    wanted = os.environ.get(CRASH_AT)
    if not wanted:
        return
    _reached[name] = _reached.get(name, 0) + 1
    point, _, nth = wanted.partition("@")
    if point == name and _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _keep_keys(keys: ImageKeys, plan: _Plan, table_id: str, version: int, merge: str) -> None:
    """Bring the key cache level with the ``images`` version this merge committed: its new
    md5s added, or (when it read every bucket's md5 column) rebuilt from what it read; cleared
    when md5s left ``images`` (rare: a shard replaced or emptied). Its commits have landed
    whatever happens here: a cache that cannot be kept is cleared, and the next merge reads
    the table."""
    try:
        if plan.recomputed.num_rows:
            keys.clear()
        elif plan.read is not None:
            read = np.concatenate([plan.read, digests(plan.new["md5"])], axis=1)
            keys.rebuild(read, table_id, version, merge)
        elif plan.from_cache:
            keys.add(digests(plan.new["md5"]), table_id, version, merge)
        else:  # the cache lost a run while this merge read it
            keys.clear()
    except Exception:  # noqa: BLE001 - a cache: never fail the merge that landed
        logger.warning(
            "images key cache in %s cleared after an error", keys.directory, exc_info=True
        )
        with contextlib.suppress(OSError):
            keys.clear()


def _merged_to(version: int, merge: str | None = None) -> CommitProperties:
    """A merge's commit: the occurrences version it reached, and the merge's own id."""
    metadata = {"asset_library.occurrences_version": str(version)}
    if merge is not None:
        metadata[MERGE_MARK] = merge
    return CommitProperties(
        app_transactions=[Transaction(app_id=IMAGES_APP, version=version)],
        custom_metadata=metadata,
    )


_SET_UPDATES = {f.name: f"s.{f.name}" for f in IMAGES_SCHEMA if f.name != "bucket"}
_INSERT = {f.name: f"s.{f.name}" for f in IMAGES_SCHEMA}
_SOURCE_SCHEMA = pa.schema([("mode", pa.string()), *IMAGES_SCHEMA])


def _bucket_predicate(buckets: Iterable[int]) -> str:
    listed = ", ".join(str(int(b)) for b in buckets)
    return f"t.bucket IN ({listed})" if listed else "t.bucket = -1"


@dataclass
class _Plan:
    """What a merge writes: ``new`` images rows to add, ``counts`` rows to append, and the
    ``recomputed`` rows of md5s that lost an occurrence (``mode = 'set'``); ``duplicated``:
    md5s the touched buckets would hold more than once after it."""

    duplicated: int
    new: pa.Table
    counts: pa.Table
    recomputed: pa.Table
    md5s: int
    #: the digests of every md5 ``images`` held, when the merge read them to rebuild the key
    #: cache
    read: np.ndarray | None = None
    #: whether the key cache told which changed md5s ``images`` held
    from_cache: bool = False


def _in_buckets(
    lake: Lake, table: DeltaTable, schema: pa.Schema, buckets: list[int], md5s: pa.Array
) -> pa.Table:
    """These md5s' rows of a table (``schema``'s columns), reading only their buckets' files.
    The md5 filter is applied after the read: files a MERGE wrote hold text as string_view,
    which pyarrow's dataset filter will not compare with a string."""
    if not buckets or len(md5s) == 0:
        return schema.empty_table()
    rows = lake_dataset(table, lake).to_table(
        columns=schema.names, filter=pc.field("bucket").isin(buckets)
    )
    rows = rows.filter(pc.is_in(rows["md5"].cast(pa.string()), value_set=md5s.cast(pa.string())))
    return rows.cast(schema)


def _md5s(
    lake: Lake, images: DeltaTable, buckets: list[int] | None, digested: list[np.ndarray] | None
) -> pa.Table | pa.RecordBatchReader:
    """The md5 column of these buckets of ``images`` (every bucket: ``None``). With
    ``digested``, batch by batch, each batch's digests appended to it as it passes: memory for
    a batch and 16 bytes an md5 while the key cache is rebuilt. Without, read whole (in chunks)
    for DuckDB to probe on every core: 2.7 s at 11.8M md5s against 3.5-5.3 s streamed."""
    scanner = lake_dataset(images, lake).scanner(
        columns=["md5"],
        filter=None if buckets is None else pc.field("bucket").isin(buckets or [-1]),
    )
    if digested is None:
        return scanner.to_table()

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in scanner.to_batches():
            digested.append(digests(batch.column(0)))
            yield batch

    return pa.RecordBatchReader.from_batches(scanner.projected_schema, batches())


def _merge_plan(
    connection: duckdb.DuckDBPyConnection,
    lake: Lake,
    images: DeltaTable,
    occurrences: DeltaTable,
    counts: DeltaTable,
    touched: list[int],
    cached: CachedKeys | None = None,
    rebuild: bool = False,
) -> _Plan:
    """Split the net changes: md5s new to ``images`` (their first added occurrence and count),
    md5s already there that only gained (their gain, for ``image_counts``), and md5s that lost
    an occurrence (recomputed from their current occurrences)."""
    columns = ", ".join(f.name for f in IMAGES_SCHEMA if f.name != "occurrences")
    connection.execute(
        """
        CREATE TEMP TABLE per_md5 AS
        SELECT md5, any_value(bucket) AS bucket, sum(n)::BIGINT AS gained,
               bool_or(n < 0) AS lost
        FROM net GROUP BY md5
        """
    ).fetchall()
    changed = connection.sql("SELECT md5 FROM per_md5").to_arrow_table()["md5"]
    held = None
    if cached is not None:
        try:
            held = cached.held(changed)
        except KeyCacheError as error:  # rewritten meanwhile, or damaged: read the table
            logger.warning("%s; reading the images table instead", error)
    read: list[np.ndarray] | None = None
    if held is not None:  # the key cache answers: a binary search per changed md5
        connection.register(
            "known", pa.table({"md5": changed.filter(pa.array(held)).cast(pa.string())})
        )
    else:  # the read that grows with the library: the md5 column of the touched buckets (of
        # every bucket when the key cache is rebuilt from it)
        read = [] if rebuild else None
        connection.register("known", _md5s(lake, images, None if rebuild else touched, read))
    # Probed once, against a hash table of the changed md5s (the small side), never built on.
    connection.execute(
        """
        CREATE TEMP TABLE matched AS
        SELECT md5, count(*) AS copies FROM known
        WHERE md5 IN (SELECT md5 FROM per_md5) GROUP BY md5
        """
    ).fetchall()
    new = connection.sql(
        f"""
        SELECT 'add' AS mode, {columns}, gained AS occurrences FROM (
          SELECT net.*, p.gained,
                 row_number() OVER (PARTITION BY net.md5
                                    ORDER BY ingested_at, shard, ordinal) AS k
          FROM net JOIN per_md5 p USING (md5)
          WHERE n > 0 AND p.gained > 0 AND net.md5 NOT IN (SELECT md5 FROM matched))
        WHERE k = 1 ORDER BY bucket, md5
        """
    ).to_arrow_table()
    gains = connection.sql(
        "SELECT md5, gained AS occurrences, bucket FROM per_md5 WHERE NOT lost AND gained <> 0 "
        "AND md5 IN (SELECT md5 FROM matched) ORDER BY bucket, md5"
    ).to_arrow_table()
    lost = connection.sql(
        "SELECT md5, bucket FROM per_md5 WHERE lost AND md5 IN (SELECT md5 FROM matched)"
    ).to_arrow_table()
    # Uniqueness of the touched buckets after this merge, given it held before (the previous
    # merge checked it; ``audit_library`` checks the whole library): an md5 the buckets held
    # twice among those changed, plus one appended twice or appended while held.
    connection.register("appended", new.select(["md5"]))
    duplicated = connection.execute(
        """
        SELECT (SELECT count(*) FROM matched WHERE copies > 1)
             + (SELECT count(*) - count(DISTINCT md5) FROM appended)
             + (SELECT count(*) FROM appended WHERE md5 IN (SELECT md5 FROM matched))
        """
    ).fetchall()[0][0]
    recomputed = _SOURCE_SCHEMA.empty_table()
    offsets = IMAGE_COUNTS_SCHEMA.empty_table()
    if lost.num_rows:
        lost_buckets = sorted({int(b) for b in lost["bucket"].to_pylist()})
        connection.register("lost", lost)
        connection.register(
            "current_rows",
            _in_buckets(lake, occurrences, OCCURRENCES_SCHEMA, lost_buckets, lost["md5"]),
        )
        connection.register(
            "counted", _in_buckets(lake, counts, IMAGE_COUNTS_SCHEMA, lost_buckets, lost["md5"])
        )
        recomputed = connection.sql(
            f"""
            SELECT 'set' AS mode, l.md5 AS md5, r.* EXCLUDE (md5, bucket, k, occurrences),
                   coalesce(r.occurrences, 0) AS occurrences, l.bucket AS bucket
            FROM lost l LEFT JOIN (
              SELECT {columns}, count(*) OVER (PARTITION BY md5) AS occurrences,
                     row_number() OVER (PARTITION BY md5 ORDER BY ingested_at, shard, ordinal) AS k
              FROM current_rows) r ON r.md5 = l.md5 AND r.k = 1
            """
        ).to_arrow_table()
        recomputed = recomputed.select(_SOURCE_SCHEMA.names).cast(_SOURCE_SCHEMA)
        # Their count is now whole in images: what image_counts adds for them goes to zero.
        offsets = connection.sql(
            "SELECT c.md5, -sum(c.occurrences)::BIGINT AS occurrences, any_value(l.bucket) "
            "AS bucket FROM counted c JOIN lost l USING (md5) GROUP BY c.md5 "
            "HAVING sum(c.occurrences) <> 0"
        ).to_arrow_table()
    return _Plan(
        duplicated=int(duplicated),
        new=new.select(_SOURCE_SCHEMA.names).cast(_SOURCE_SCHEMA),
        counts=pa.concat_tables(
            [gains.cast(IMAGE_COUNTS_SCHEMA), offsets.cast(IMAGE_COUNTS_SCHEMA)]
        ),
        recomputed=recomputed,
        md5s=len(changed),
        read=None if read is None else np.concatenate([np.empty((2, 0), np.uint64), *read], axis=1),
        from_cache=held is not None,
    )
