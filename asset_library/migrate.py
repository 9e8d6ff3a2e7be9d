"""Move a library of the previous layout (hand-laid Parquet under ``lake/base``, ``lake/cube``,
``lake/rejects``, a ``catalog.duckdb`` with absolute paths) onto the Delta lake.

Every shard's rows are rebuilt from the shard's keys file (``shards/<shard>.parquet``, the
library's working state, which the old layout kept too), so the new tables hold exactly what a
fresh ingest of those shards would write; then ``images`` is merged and the similarity index is
rebuilt. The old files are removed only after that succeeded. Running it twice does nothing the
second time. It sits above the lake, beside the similarity index it rebuilds.

A Delta lake written before ``image_counts`` and ``attribute_index`` (or before the index covered
the image) needs nothing from here: the catalog reads it as it is, the next merge starts
``image_counts`` and the next shard written (re)builds ``attribute_index`` from the cube and its
occurrences (see :meth:`asset_library.lake.table.Lake.table`); :func:`migrate` rebuilds such an
index at once, before shards are written side by side.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from asset_library.ids import check_shard_key
from asset_library.lake import Lake, is_outdated_index, merge_images, row_count, write_shard
from asset_library.layout import LibraryLayout
from asset_library.similarity import SimilarityIndex

_OLD_TABLES = ("base", "cube", "near_duplicates")


@dataclass
class Migration:
    shards: list[str] = field(default_factory=list)
    images: int = 0
    removed: list[str] = field(default_factory=list)
    #: Rows of an attribute index rebuilt to cover the image (``None``: none was rebuilt).
    index_rows: int | None = None


def old_layout(layout: LibraryLayout) -> bool:
    """Whether the library still has tables of the previous layout."""
    return (
        any((layout.lake_dir / name).exists() for name in _OLD_TABLES)
        or (layout.root / "catalog.duckdb").exists()
    )


def _old_shards(layout: LibraryLayout) -> set[str]:
    shards = set()
    for name in ("base", "cube"):
        for path in (layout.lake_dir / name).glob("bucket=*/*.parquet"):
            if not path.name.startswith("_"):
                shards.add(path.stem)
    for path in (layout.lake_dir / "rejects").glob("*.parquet"):
        if not path.name.startswith("_"):
            shards.add(path.stem)
    return shards


def migrate(layout: LibraryLayout, lake: Lake) -> Migration:
    """Rebuild the lake from the shards' keys files, merge images, drop the old files."""
    done = Migration()
    if not old_layout(layout):
        index = lake.open("attribute_index")
        cube = lake.open("attributes")
        if (index is None and row_count(cube)) or (
            index is not None and is_outdated_index("attribute_index", index)
        ):
            done.index_rows = row_count(lake.table("attribute_index"))
        return done
    shards = sorted(_old_shards(layout))
    missing = [s for s in shards if not layout.keys_path(s).exists()]
    if missing:
        raise FileNotFoundError(
            f"cannot migrate: no keys file for shard(s) {', '.join(missing[:5])} under "
            f"{layout.root / 'shards'}; re-ingest those batches instead"
        )
    lake.ensure()
    for shard in shards:
        write_shard(lake, check_shard_key(shard), layout.keys_path(shard))
        done.shards.append(shard)
    merged = merge_images(lake)
    done.images = merged.inserted
    # The index of the old layout was kept per shard; the new one follows images.
    shutil.rmtree(layout.index_dir, ignore_errors=True)
    SimilarityIndex(layout).sync(lake)
    for name in _OLD_TABLES:
        path = layout.lake_dir / name
        if path.exists():
            shutil.rmtree(path)
            done.removed.append(str(Path("lake") / name))
    rejects = layout.lake_dir / "rejects"
    for path in rejects.glob("*.parquet"):
        path.unlink()
        done.removed.append(str(path.relative_to(layout.root)))
    shutil.rmtree(layout.lake_dir / "_staging", ignore_errors=True)
    catalog = layout.root / "catalog.duckdb"
    if catalog.exists():
        catalog.unlink()
        done.removed.append("catalog.duckdb")
    return done
