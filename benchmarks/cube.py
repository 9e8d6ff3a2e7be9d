"""The cube writer: the previous Python loop (a dict per attribute row) against the DuckDB one.

    uv run python benchmarks/cube.py [--rows 200000]

Both read the same synthetic keys file (three manifest attributes and three derived ones per
image). The previous writer is rebuilt here from its source as it was (``_cube_rows``: JSON
parsed and typed in Python, ``pa.Table.from_pylist``, then a DuckDB partitioned COPY); the new
one is ``write_shard``'s cube as it runs there: its rows computed (one DuckDB query over the
images, then gathered in md5 order) and committed to Delta, timed by ``write_shard`` itself.
Prints rows per second of each, the ratio, and the new one's time split (rows / commit), in one
run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asset_library.lake import SCHEMAS, Lake, write_shard  # noqa: E402
from asset_library.layout import LibraryLayout  # noqa: E402
from asset_library_tests.support.synthetic import random_md5s, write_keys  # noqa: E402

_CUBE_SCHEMA = pa.schema([f for f in SCHEMAS["attributes"]])


def _old_typed(value: Any) -> dict[str, str]:
    if isinstance(value, bool):
        return {"value": "true" if value else "false", "value_type": "boolean"}
    if isinstance(value, int):
        return {"value": str(value), "value_type": "integer"}
    if isinstance(value, float):
        return {"value": repr(value), "value_type": "double"}
    if isinstance(value, str):
        kind = "string"
        if len(value) >= 10 and value[4] == "-" and value[7] == "-":
            try:
                datetime.fromisoformat(value)
                kind = "timestamp"
            except ValueError:
                pass
        return {"value": value, "value_type": kind}
    return {"value": json.dumps(value, default=str), "value_type": "json"}


def _old_derived(image: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    width, height = image.get("width"), image.get("height")
    if width and height:
        found["image.aspect_ratio"] = round(width / height, 4)
        found["image.megapixels"] = round(width * height / 1e6, 3)
    found["image.animated"] = bool((image.get("frames") or 1) > 1)
    return found


def old_writer(keys: Path, out: Path) -> int:
    """The previous write_cube_table: a Python dict per attribute row, then COPY by bucket."""
    staging = out / "staging.parquet"
    columns = ["md5", "status", "extras", "width", "height", "frames", "source_uri", "batch"]
    columns += ["shard", "bucket"]
    rows_written = 0
    with pq.ParquetWriter(staging, _CUBE_SCHEMA) as writer:
        for batch in pq.ParquetFile(keys).iter_batches(batch_size=20_000, columns=columns):
            rows: list[dict[str, Any]] = []
            for image in batch.to_pylist():
                if image["status"] != "ok":
                    continue
                common = {k: image[k] for k in ("md5", "source_uri", "batch", "shard", "bucket")}
                extras = json.loads(image["extras"]) if image["extras"] else {}
                for attribute, value in extras.items():
                    if value is not None:
                        rows.append(
                            {
                                **common,
                                **_old_typed(value),
                                "attribute": attribute,
                                "origin": "manifest",
                            }
                        )
                for attribute, value in _old_derived(image).items():
                    rows.append(
                        {**common, **_old_typed(value), "attribute": attribute, "origin": "derived"}
                    )
            rows_written += len(rows)
            writer.write_table(pa.Table.from_pylist(rows, schema=_CUBE_SCHEMA))
    with duckdb.connect() as connection:
        connection.execute(
            f"COPY (SELECT * FROM read_parquet('{staging}') ORDER BY bucket, md5) TO "
            f"'{out / 'cube'}' (FORMAT parquet, PARTITION_BY (bucket))"
        ).fetchall()
    return rows_written


def new_writer(keys: Path, root: Path) -> dict[str, Any]:
    """``write_shard``'s cube: its rows computed and committed sorted by md5 (rows, seconds,
    of which computing the rows; the shard's other tables are written too, and not counted)."""
    layout = LibraryLayout.open(root, 256)
    return write_shard(Lake.of(layout, {}), "bench-s00000", keys)["attributes"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000, help="images in the keys file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        keys = write_keys(
            folder / "keys.parquet",
            batch="bench",
            shard="bench-s00000",
            n_buckets=256,
            md5s=random_md5s(np.random.default_rng(0), args.rows),
        )
        (folder / "old").mkdir()
        started = time.perf_counter()
        old_rows = old_writer(keys, folder / "old")
        old_s = time.perf_counter() - started
        new = new_writer(keys, folder / "new")
    new_rows, new_s = new["rows"], new["seconds"]
    print(
        json.dumps(
            {
                "images": args.rows,
                "old_rows": old_rows,
                "new_rows": new_rows,
                "old_seconds": round(old_s, 2),
                "new_seconds": round(new_s, 2),
                "new_rows_seconds": round(new["rows_seconds"], 2),
                "new_commit_seconds": round(new_s - new["rows_seconds"], 2),
                "old_rows_per_s": round(old_rows / old_s),
                "new_rows_per_s": round(new_rows / new_s),
                "speedup": round(old_s / new_s, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
