"""Batch ids: never reused by accident, replaced only on purpose, checked wherever they enter."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from asset_library.defs.assets.ingestion import BatchPlanConfig
from asset_library.ids import InvalidIdError, batch_id_for
from asset_library.ingest.plan import BatchExistsError, load_plan, plan_batch
from asset_library.ingest.sources import SourceItem
from asset_library.layout import LibraryLayout
from asset_library.library import Library
from asset_library.runs.orchestrate import ingest_batch

IMAGES = "github_jenssegers_imagehash"


@pytest.fixture
def two_sources(tmp_path: Path, corpus_dir: Path) -> tuple[Path, Path]:
    """Two folders of different images: ``forest`` (5 images) and ``office`` (3)."""
    forest, office = tmp_path / "forest", tmp_path / "office"
    shutil.copytree(corpus_dir / IMAGES / "forest", forest)
    shutil.copytree(corpus_dir / IMAGES / "office", office)
    return forest, office


def _batch_images(library: Path) -> int:
    return Library(library).query("SELECT count(*) AS n FROM images_in_batch('daily')")[0]["n"]


def test_a_batch_name_is_refused_twice_and_replaced_only_on_purpose(run_cli, tmp_path, two_sources):
    forest, office = two_sources
    library = tmp_path / "library"
    code, out, _ = run_cli("ingest", str(forest), "--batch", "daily", "--shard-size", "2")
    assert code == 0, out
    assert _batch_images(library) == 5

    code, out, err = run_cli("ingest", str(office), "--batch", "daily")
    assert code == 2  # a bad argument
    assert "batch 'daily' already exists" in err and "--replace" in err
    assert str(forest) in err  # what it would have replaced
    assert _batch_images(library) == 5  # nothing replaced

    # on purpose: re-planned from the new source, its shards re-run
    code, out, err = run_cli(
        "ingest", str(office), "--batch", "daily", "--replace", "--shard-size", "1"
    )
    assert code == 0, err
    assert _batch_images(library) == 3
    sources = Library(library).query("SELECT DISTINCT source_uri FROM occurrences")
    assert {Path(r["source_uri"]).parent for r in sources} == {office}
    assert load_plan(library / "plans" / "daily").source == str(office)

    # fewer shards than before would leave the old shards' rows behind: refused, said so
    code, out, err = run_cli("ingest", str(forest), "--batch", "daily", "--replace")
    assert code == 1
    assert "fewer than the 3 it replaces" in err
    assert _batch_images(library) == 3


def test_default_batch_ids_made_in_the_same_second_differ():
    when = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
    ids = {batch_id_for("/a/photos", when), batch_id_for("/b/photos/", when)}
    assert len(ids) == 2
    assert all(i.startswith("photos_20261130T120000_") for i in ids)
    # the landing zone's ids carry no time: a landed name is ingested once
    assert batch_id_for("photos_001") == batch_id_for("photos_001") == "photos_001"


def test_planning_refuses_an_existing_plan(tmp_path):
    layout = LibraryLayout.open(tmp_path)
    plan_dir = layout.plan_dir("b1")
    items = [SourceItem("s3://bucket/a.jpg"), SourceItem("s3://bucket/b.jpg")]
    first = plan_batch(items, batch="b1", source="s3://bucket", layout=layout)
    with pytest.raises(BatchExistsError, match="batch 'b1' already exists"):
        plan_batch(items[:1], batch="b1", source="s3://bucket/x", layout=layout)
    assert load_plan(plan_dir) == first
    # no staging folder is left behind by the refused planning
    assert sorted(p.name for p in plan_dir.parent.iterdir()) == ["b1"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--batch", "../../x"], "invalid batch id '../../x'"),
        (["--batch", "a,b"], "invalid batch id 'a,b'"),
        (["--shard-size", "0"], "argument --shard-size: 0 is less than 1"),
        (["--workers", "-1"], "argument --workers: -1 is less than 0"),
        (["--workers", "many"], "argument --workers: 'many' is not a whole number"),
        (["--parallel", "0"], "argument --parallel: 0 is less than 1"),
        (["--retries", "-1"], "argument --retries: -1 is less than 0"),
    ],
)
def test_bad_ingest_arguments_exit_2_naming_them(run_cli, tmp_path, two_sources, args, expected):
    forest, _ = two_sources
    code, _, err = run_cli("ingest", str(forest), *args)
    assert code == 2
    assert expected in err
    assert not (tmp_path / "library").exists()  # nothing planned, nothing written
    assert not (tmp_path / "x").exists()  # where library/plans/../../x would have gone


def test_the_python_and_dagster_layers_check_their_arguments_too(tmp_path, two_sources):
    forest, _ = two_sources
    with dg.instance_for_test() as instance:
        cases = [
            ({"batch": "../../x"}, "invalid batch id '../../x'"),
            ({"max_images_per_shard": 0}, "max_images_per_shard must be at least 1, not 0"),
            ({"workers": -1}, r"workers must be 0 \(in-process\) or more, not -1"),
            ({"parallel": 0}, "parallel must be at least 1, not 0"),
            ({"retries": -1}, "retries must be 0 or more, not -1"),
        ]
        for bad, message in cases:
            with pytest.raises((InvalidIdError, ValueError), match=message):
                ingest_batch(str(forest), library=tmp_path / "library", instance=instance, **bad)
    assert not (tmp_path / "library" / "plans").exists()
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        BatchPlanConfig(source=str(forest), max_images_per_shard=0)
