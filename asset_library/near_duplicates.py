"""The near-duplicate groups: computed from the similarity index (:mod:`asset_library.similarity`)
and kept beside it in ``index/near_duplicates.parquet``, a cache that readers check and, if it
is damaged, compute again without writing it."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from asset_library.index_files import GROUPS_FILE
from asset_library.lake import NEAR_DUPLICATES_SCHEMA, Lake
from asset_library.lake.scan import lake_dataset
from asset_library.layout import LibraryLayout, atomic_path
from asset_library.search.thresholds import (
    DEFAULT_CONFIRM_DISTANCE,
    DEFAULT_MIN_QUALITY,
    DEFAULT_PHASH_THRESHOLD,
)
from asset_library.similarity import SimilarityIndex, loaded_index

logger = logging.getLogger(__name__)


class NearDuplicates:
    """The near-duplicate groups: connected groups of images within pHash distance
    :data:`DEFAULT_PHASH_THRESHOLD` (and dHash :data:`DEFAULT_CONFIRM_DISTANCE`, as a search
    confirms a match) of a neighbour, low-information images left out. Computed from the index
    and kept in :data:`GROUPS_FILE`, a cache: a reader that cannot read it computes the groups
    itself (and writes nothing); the next refresh writes it again."""

    def __init__(
        self,
        layout: LibraryLayout,
        lake: Lake,
        index: Callable[[], SimilarityIndex] | None = None,
    ) -> None:
        self.layout = layout
        self.lake = lake
        self.path = layout.index_dir / GROUPS_FILE
        self._index = index or (lambda: loaded_index(layout, lake))

    def compute(self) -> list[list[str]]:
        """The groups as the index and ``images`` have them now, largest first."""
        index = self._index()
        if not index.exists:
            return []
        return index.groups(
            DEFAULT_PHASH_THRESHOLD,
            exclude=self.low_information(),
            confirm=DEFAULT_CONFIRM_DISTANCE,
        )

    def low_information(self) -> list[str]:
        """md5s under the default information cut: their hashes are rounding noise and would
        join unrelated images."""
        images = self.lake.open("images")
        if images is None:
            return []
        dataset = lake_dataset(images, self.lake)
        rows = dataset.to_table(columns=["md5"], filter=pc.field("quality") < DEFAULT_MIN_QUALITY)
        return rows["md5"].to_pylist()

    def write(self, groups: list[list[str]]) -> None:
        """Replace the groups file atomically, each page checksummed so that damage is seen."""
        with atomic_path(self.path) as tmp:
            pq.write_table(groups_table(groups), tmp, write_page_checksum=True)
        self.layout.publish(self.path)

    def stamp(self) -> tuple[int | None, int | None]:
        """Changes when the groups file or the index it follows is replaced."""
        for path in (self.path, self.layout.segments_manifest_path):
            self.layout.fetch(path)
        return tuple(  # type: ignore[return-value]
            path.stat().st_mtime_ns if path.exists() else None
            for path in (self.path, self.layout.segments_manifest_path)
        )

    def read(self) -> pa.Table:
        """The groups file, every page's checksum and the whole footer checked (raises on any
        damage, naming the file)."""
        try:
            with pq.ParquetFile(self.path, page_checksum_verification=True) as file:
                metadata = file.metadata
                for group in range(metadata.num_row_groups):
                    metadata.row_group(group).to_dict()
                if not file.schema_arrow.equals(NEAR_DUPLICATES_SCHEMA):
                    raise ValueError(f"columns {file.schema_arrow}, not {NEAR_DUPLICATES_SCHEMA}")
                table = file.read()
            if table.num_rows != metadata.num_rows:
                raise ValueError(f"{table.num_rows} rows read, {metadata.num_rows} recorded")
            return table
        except (OSError, ValueError, KeyError, pa.ArrowException) as error:
            raise ValueError(f"{self.path}: {type(error).__name__}: {error}") from None

    def table(self) -> pa.Table:
        """What readers answer: the file if it reads whole, else the groups computed now (the
        file is left as it is: readers write nothing)."""
        if self.layout.fetch(self.path):
            try:
                return self.read()
            except ValueError as error:
                logger.warning("near-duplicate groups file damaged, computed again: %s", error)
        elif self.layout.index_dir.exists():
            logger.warning("near-duplicate groups file missing, computed again: %s", self.path)
        return groups_table(self.compute())


def groups_table(groups: list[list[str]]) -> pa.Table:
    """Rows of :data:`NEAR_DUPLICATES_SCHEMA`: each group numbered in the order given."""
    rows = {
        "group_id": [n for n, group in enumerate(groups) for _ in group],
        "group_size": [len(group) for group in groups for _ in group],
        "md5": [md5 for group in groups for md5 in group],
    }
    return pa.table(rows, schema=NEAR_DUPLICATES_SCHEMA)
