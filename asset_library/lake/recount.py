"""Whether ``images`` counts each occurrence once, and the repair of a library that does not.

The count ``images`` shows for an md5 (its ``occurrences`` as first merged plus its
``image_counts`` rows) must equal the md5's rows in ``occurrences`` as of the version ``images``
has merged (later shards are not counted yet). Both are read bucket by bucket: memory for one
bucket's md5s, whatever the library's size.

:func:`recount` repairs a library whose counts drifted (a merge of an earlier version killed
between its two commits, then merged again after another batch landed, counted that range
twice): it appends one ``image_counts`` row per wrong md5 with the difference, so the count
shown becomes the true one; no ``images`` file is rewritten.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from asset_library.lake.merge import IMAGES_APP, counted_version, merge_images, merged_version
from asset_library.lake.scan import lake_dataset
from asset_library.lake.schemas import IMAGE_COUNTS_SCHEMA
from asset_library.lake.table import Lake

#: The custom metadata of a recount's commit.
RECOUNT_MARK = {"asset_library.operation": "recount"}
#: Examples of wrong md5s a report keeps.
EXAMPLES = 10

#: One bucket's md5s whose count ``images`` shows differs from their occurrences: ``shown`` (NULL:
#: no ``images`` row), ``truth`` (0: no occurrence), ``copies`` (``images`` rows of the md5).
#: The count ``images`` shows per md5 (as its view does: each row's count plus the md5's
#: ``image_counts``), and how many rows it has.
_SHOWN = """
    SELECT i.md5::VARCHAR AS md5, count(*) AS copies, sum(i.occurrences + coalesce(a.n, 0)) AS n
    FROM img i LEFT JOIN (SELECT md5::VARCHAR AS md5, sum(occurrences) AS n FROM cnt GROUP BY 1) a
    ON a.md5 = i.md5::VARCHAR GROUP BY 1
"""
_WRONG_SQL = f"""
    WITH truth AS (SELECT md5::VARCHAR AS md5, count(*) AS n FROM occ GROUP BY 1),
         shown AS ({_SHOWN})
    SELECT md5, $bucket::INTEGER AS bucket, s.n::BIGINT AS shown,
           coalesce(t.n, 0)::BIGINT AS truth, coalesce(s.copies, 0)::BIGINT AS copies
    FROM truth t FULL JOIN shown s USING (md5)
    WHERE s.n IS DISTINCT FROM t.n
    ORDER BY md5
"""


@dataclass
class CountReport:
    """What :func:`check_counts` found, library-wide."""

    #: The occurrences version ``images`` has merged: the occurrences its counts count.
    version: int
    #: ``image_counts`` is ahead of ``images``: a merge stopped between its two commits (the
    #: next refresh finishes it).
    unfinished: bool = False
    occurrences: int = 0
    #: The sum of the counts ``images`` shows.
    counted: int = 0
    #: md5s ``images`` holds once whose count is wrong (what :func:`recount` repairs).
    wrong: int = 0
    #: md5s with occurrences and no ``images`` row, and ``images`` rows of no occurrence.
    missing: int = 0
    orphaned: int = 0
    #: md5s ``images`` holds more than once (the uniqueness check's; a recount leaves them).
    duplicated: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            not self.unfinished
            and self.occurrences == self.counted
            and not (self.wrong or self.missing or self.orphaned or self.duplicated)
        )

    def describe(self) -> str:
        if self.passed:
            return f"images counts each of the {self.occurrences:,} occurrences once"
        found = [
            f"images counts {self.counted:,} occurrences, occurrences holds {self.occurrences:,} "
            f"(version {self.version})"
        ]
        if self.unfinished:
            found.append("a merge stopped between its two commits: the next refresh finishes it")
        for n, what in (
            (self.wrong, "md5s with a wrong count (repair: asset-library recount)"),
            (self.missing, "md5s with occurrences but no images row"),
            (self.orphaned, "images rows without an occurrence"),
            (self.duplicated, "md5s with more than one images row"),
        ):
            if n:
                found.append(f"{n:,} {what}")
        return "; ".join(found)


def _table_at(lake: Lake, name: str, version: int | None = None) -> DeltaTable | None:
    if version is None:
        return lake.open(name)
    return DeltaTable(lake.uri(name), version=version, storage_options=dict(lake.storage_options))


@dataclass
class BucketCounts:
    """One bucket's occurrences, the sum of the counts ``images`` shows for it, and its md5s
    whose count differs (see ``_WRONG_SQL`` for the columns)."""

    occurrences: int
    counted: int
    wrong: pa.Table


def bucket_counts(lake: Lake, version: int) -> Iterator[BucketCounts]:
    """Bucket by bucket, the counts ``images`` shows against the rows of ``occurrences`` at
    ``version``."""
    tables = {
        "occ": _table_at(lake, "occurrences", version) if version >= 0 else None,
        "img": lake.open("images"),
        "cnt": lake.open("image_counts"),
    }
    columns = {"occ": ["md5"], "img": ["md5", "occurrences"], "cnt": ["md5", "occurrences"]}
    datasets = {
        name: None if table is None else lake_dataset(table, lake) for name, table in tables.items()
    }
    with duckdb.connect() as connection:
        for bucket in range(lake.n_buckets):
            for name, dataset in datasets.items():
                rows = (
                    IMAGE_COUNTS_SCHEMA.empty_table().select(columns[name])
                    if dataset is None
                    else dataset.to_table(
                        columns=columns[name], filter=pc.field("bucket") == bucket
                    )
                )
                connection.register(name, rows)
            occurrences, counted = connection.execute(
                "SELECT (SELECT count(*) FROM occ), (SELECT coalesce(sum(n), 0)::BIGINT FROM "
                f"({_SHOWN}))"
            ).fetchall()[0]
            wrong = connection.sql(_WRONG_SQL, params={"bucket": bucket}).to_arrow_table()
            yield BucketCounts(int(occurrences), int(counted), wrong)


def check_counts(lake: Lake) -> CountReport:
    """Whether ``images`` counts every occurrence it has merged exactly once, md5 by md5."""
    version = merged_version(lake)
    report = CountReport(version=version, unfinished=counted_version(lake) > version)
    for bucket in bucket_counts(lake, version):
        report.occurrences += bucket.occurrences
        report.counted += bucket.counted
        for row in bucket.wrong.to_pylist():
            if row["copies"] > 1:
                report.duplicated += 1
            elif row["shown"] is None:
                report.missing += 1
            elif row["truth"] == 0:
                report.orphaned += 1
            else:
                report.wrong += 1
            if len(report.examples) < EXAMPLES:
                shown, truth = row["shown"], row["truth"]
                report.examples.append(f"{row['md5']} (shown {shown}, occurs {truth})")
    return report


@dataclass
class Recount:
    """What :func:`recount` did."""

    version: int
    #: md5s whose count was corrected, and by how many occurrences in all (negative: fewer).
    corrected: int = 0
    difference: int = 0
    #: Problems a recount cannot repair (rows missing, orphaned or held twice), left as found.
    left: CountReport | None = None


def recount(lake: Lake) -> Recount:
    """Make every count ``images`` shows equal its md5's occurrences: finish any merge first,
    then append one ``image_counts`` row per wrong md5 with the difference, in one commit that
    records the occurrences version it counted against (so it conflicts with a merge committing
    meanwhile instead of mixing with it). Running it again changes nothing."""
    merge_images(lake)
    version = merged_version(lake)
    done = Recount(version=version)
    counts = lake.table("image_counts")  # as read: a merge committing after it conflicts
    corrections = [
        wrong.filter(
            pc.and_(
                pc.equal(wrong["copies"], 1),
                pc.and_(pc.is_valid(wrong["shown"]), pc.greater(wrong["truth"], 0)),
            )
        )
        for wrong in (bucket.wrong for bucket in bucket_counts(lake, version))
    ]
    rows = pa.concat_tables(corrections) if corrections else None
    if rows is not None and rows.num_rows:
        difference = pc.subtract(rows["truth"], rows["shown"])
        write_deltalake(
            counts,
            pa.table(
                {"md5": rows["md5"], "occurrences": difference, "bucket": rows["bucket"]}
            ).cast(IMAGE_COUNTS_SCHEMA),
            mode="append",
            partition_by=["bucket"],
            commit_properties=CommitProperties(
                app_transactions=[Transaction(app_id=IMAGES_APP, version=version)],
                custom_metadata=RECOUNT_MARK,
            ),
        )
        done.corrected = rows.num_rows
        done.difference = int(pc.sum(difference).as_py())
    left = check_counts(lake)
    done.left = None if left.passed else left
    return done
