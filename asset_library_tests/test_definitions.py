"""The code location loads the way `dg`, `dagster dev` and `dagster definitions validate` load
it: every module under `defs/`, nothing listed by hand."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import dagster as dg

from asset_library.definitions import load_defs
from asset_library.defs.assets.ingestion import SHARD_OUTPUTS

ROOT = Path(__file__).resolve().parents[1]
DEFS = ROOT / "asset_library" / "defs"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "ASSET_LIBRARY_HOME": str(tmp_path / "library")}
    env.pop("DAGSTER_HOME", None)
    return env


def test_the_code_location_validates(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful for code location asset_library" in result.stdout + result.stderr


def test_dg_check_defs_passes(tmp_path):
    dg_cli = Path(sys.executable).parent / "dg"
    result = subprocess.run(
        [str(dg_cli), "check", "defs"],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All definitions loaded successfully" in result.stdout + result.stderr


def test_every_definition_comes_from_the_defs_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ASSET_LIBRARY_HOME", str(tmp_path / "library"))
    defs = load_defs()
    graph = defs.resolve_asset_graph()
    assert {key.to_user_string() for key in graph.get_all_asset_keys()} == {
        "batch_plan",
        *SHARD_OUTPUTS,
        "images",
        "similarity_index",
        "near_duplicate_groups",
        "serving_store",
        "library_audit",
        "lake_compaction",
    }
    # the shard's outputs are one unit: one node, not subsettable, with the shard's checks
    shard = defs.resolve_assets_def("occurrences")
    assert set(shard.keys) == {dg.AssetKey(k) for k in SHARD_OUTPUTS} and not shard.can_subset
    assert {c.name for c in shard.check_specs} == {
        "hash_coverage",
        "uploads_present",
        "attribute_keys_in_occurrences",
    }
    jobs = {job.name for job in defs.resolve_all_job_defs()} - {"__ASSET_JOB"}
    assert jobs == {
        "plan_batch",
        "ingest_shard",
        "refresh_library",
        "compact_library",
        "audit_library",
    }
    assert {s.name for s in defs.sensors or []} == {
        "landing_sensor",
        "shard_sensor",
        "refresh_sensor",
    }
    assert {s.name for s in defs.schedules or []} == {"retry_failed_shards"}
    assert set(defs.resources or {}) == {
        "library",
        "object_store",
        "sources",
        "landing",
        "s3",
        "duckdb",
    }
    assert defs.resolve_job_def("__ASSET_JOB").executor_def.name == "in_process"


def test_a_module_added_to_defs_is_part_of_the_code_location(tmp_path, monkeypatch):
    monkeypatch.setenv("ASSET_LIBRARY_HOME", str(tmp_path / "library"))
    name = f"added_{uuid.uuid4().hex[:8]}"
    module = DEFS / f"{name}.py"
    module.write_text(
        f"import dagster as dg\n\n\n@dg.asset\ndef {name}() -> None:\n    return None\n"
    )
    try:
        defs = load_defs()
    finally:
        module.unlink()
    assert dg.AssetKey(name) in defs.resolve_asset_graph().get_all_asset_keys()


def test_s3_keys_from_the_environment_stay_environment_variables(tmp_path, monkeypatch):
    """The code location holds the variables' names, not the secrets; a run reads the values."""
    from asset_library.defs.resources import build_resources

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env")
    resources = build_resources(root=str(tmp_path / "library"))
    s3 = resources["s3"]
    assert isinstance(s3.aws_access_key_id, dg.EnvVar)
    assert s3.aws_secret_access_key.env_var_name == "AWS_SECRET_ACCESS_KEY"
    with dg.build_sensor_context(resources={"sources": resources["sources"]}) as context:
        assert context.resources.sources.s3.aws_access_key_id == "key-from-env"
    # keys given only to build_resources (not this process's environment) are literal
    given = build_resources({"AWS_ACCESS_KEY_ID": "given"}, root=str(tmp_path / "library"))
    assert given["s3"].aws_access_key_id == "given"
    # an S3 lake: its delta-rs options hold no secret from the environment; opening reads them
    monkeypatch.setenv("ASSET_LIBRARY_LAKE", "s3://lake-bucket/lake")
    library = build_resources(root=str(tmp_path / "library"))["library"]
    assert "secret-from-env" not in str(library.lake_storage_options)
    assert library.lake_storage_options["AWS_REGION"]
    lake = library.lake()
    assert lake.storage_options["AWS_SECRET_ACCESS_KEY"] == "secret-from-env"


def test_the_library_wide_jobs_carry_the_serial_tag_the_instance_limits():
    """The tag that serialises the library-wide writers is spelled once: the jobs carry it and
    the instance's concurrency limit names it."""
    import yaml

    from asset_library.defs.tags import SERIAL_TAG, SERIAL_VALUE

    limits = yaml.safe_load((ROOT / "dagster.yaml").read_text())["concurrency"]["runs"]
    assert {"key": SERIAL_TAG, "limit": 1} in limits["tag_concurrency_limits"]
    defs = load_defs()
    for name in ("refresh_library", "compact_library", "audit_library"):
        assert defs.resolve_job_def(name).tags.get(SERIAL_TAG) == SERIAL_VALUE
