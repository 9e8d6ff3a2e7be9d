"""Picking images from the shared corpus by its tables (``MANIFEST.tsv``, ``DETAILS.tsv``)."""

from __future__ import annotations

import csv
from pathlib import Path


def corpus_jpegs(corpus_dir: Path, count: int) -> list[tuple[Path, str]]:
    """`count` small, decodable, distinct still JPEGs of the corpus, with their md5s."""
    with (corpus_dir / "MANIFEST.tsv").open() as handle:
        manifest = {row["path"]: row for row in csv.DictReader(handle, delimiter="\t")}
    with (corpus_dir / "DETAILS.tsv").open() as handle:
        details = {row["path"]: row for row in csv.DictReader(handle, delimiter="\t")}
    chosen: dict[str, Path] = {}
    for path, row in sorted(manifest.items()):
        fine = details.get(path, {})
        if (
            row["format"] == "JPEG"
            and int(row["bytes"]) < 100_000
            and fine.get("decode") == "ok"
            and fine.get("frames") == "1"
        ):
            chosen.setdefault(row["md5"], corpus_dir / path)
        if len(chosen) == count:
            return [(path, md5) for md5, path in chosen.items()]
    raise AssertionError(f"the corpus has fewer than {count} small still JPEGs")
