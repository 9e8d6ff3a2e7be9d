"""``asset-library ingest`` and ``status`` as a user runs them: what reaches the terminal, Ctrl-C,
and a run whose process was killed."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from asset_library.cli import main
from asset_library.library import Library
from asset_library.runs.instance import open_instance

PROJECT = Path(__file__).resolve().parents[1]
#: libtiff complains about this file ("_tiffReadProc: Invalid Read at loc 3309, eof: 2529."): its
#: strip 0 lies past the end of the file.
BAD_TIFF = "github_python-pillow_Pillow/crash-0c7e0e8e11ce787078f00b5b0ca409a167f070e0.tif"
#: Large wallpapers (4096x4096 WebP, 3700x2400 PNG): a shard of them takes seconds, not
#: milliseconds, so a signal lands while it runs.
SLOW_FOLDERS = ("debian_gnome-backgrounds", "debian_ukui-wallpapers")


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A library root; the variables the CLI sets for itself are restored after the test."""
    root = tmp_path / "library"
    home = root / ".dagster"
    home.mkdir(parents=True)
    shutil.copyfile(PROJECT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("ASSET_LIBRARY_HOME", str(root))
    return root


def test_libtiff_messages_stay_out_of_the_output_and_in_the_reject(
    cli_env, corpus_dir, tmp_path, capfd
):
    folder = tmp_path / "tiffs"
    folder.mkdir()
    shutil.copy(corpus_dir / BAD_TIFF, folder / "crash.tif")
    shutil.copy(corpus_dir / "github_python-pillow_Pillow/hopper.tif", folder / "hopper.tif")
    code = main(["ingest", str(folder), "--library", str(cli_env), "--workers", "1"])
    out, err = capfd.readouterr()
    assert code == 0, out + err
    assert "1 ingested" in out and "rejected  1 (truncated: 1)" in out
    for said in ("_tiffReadProc", "TIFFFillStrip", "TIFFReadDirectory"):
        assert said not in out and said not in err
    rejects = Library(cli_env).query("SELECT source_uri, reason, message FROM rejects")
    assert [(Path(r["source_uri"]).name, r["reason"]) for r in rejects] == [
        ("crash.tif", "truncated")
    ]
    assert rejects[0]["message"] == (
        "tiff cannot be decoded: decoder error -2; the decoder reported: "
        "_tiffReadProc: Invalid Read at loc 3309, eof: 2529.; "
        "TIFFFillStrip: Read error on strip 0; got 18446744073709550836 bytes, expected 1012."
    )


@pytest.fixture(scope="module")
def slow_batch(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine large images in one folder."""
    folder = tmp_path_factory.mktemp("slow")
    for name in SLOW_FOLDERS:
        for path in sorted((corpus_dir / name).rglob("*.*")):
            shutil.copy(path, folder / path.name)
    assert len(list(folder.iterdir())) == 9
    return folder


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "asset_library.cli", *args]


def _environment() -> dict[str, str]:
    """The test's environment without the variables that would point the CLI elsewhere."""
    env = dict(os.environ)
    for name in ("DAGSTER_HOME", "ASSET_LIBRARY_HOME"):
        env.pop(name, None)
    return env


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(*args),
        cwd=PROJECT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _start(*args: str) -> subprocess.Popen[str]:
    """The CLI in its own process group, as a terminal runs a foreground command."""
    return subprocess.Popen(
        _command(*args),
        cwd=PROJECT,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _shard_states(root: Path) -> tuple[str, dict[str, str]]:
    """``asset-library status``: its whole output, and each shard's state."""
    status = _run("status", "--library", str(root))
    assert status.returncode == 0, status.stderr
    states = dict(line.split() for line in status.stdout.splitlines() if line.startswith("  "))
    return status.stdout, states


def _run_statuses(root: Path) -> dict[str, list[dg.DagsterRunStatus]]:
    """Each shard's runs' statuses, oldest first, read from the library's Dagster instance."""
    instance = open_instance(root / ".dagster")
    try:
        found: dict[str, list[dg.DagsterRunStatus]] = {}
        for run in reversed(instance.get_runs(filters=dg.RunsFilter(job_name="ingest_shard"))):
            found.setdefault(run.tags["dagster/partition"], []).append(run.status)
        return found
    finally:
        instance.dispose()


def _temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.tmp"))


def _wait_for(condition: Callable[[], object], process: subprocess.Popen[str]) -> None:
    """Poll ``condition`` while ``process`` runs; fail if it ends or a minute passes first."""
    deadline = time.monotonic() + 60
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _live_processes(group: int) -> list[int]:
    """Processes of a process group that are still running (zombies excluded)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def _wait_for_no_processes(group: int, seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (live := _live_processes(group)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live


def _run_workers(root: Path) -> list[int]:
    """The ingest's run workers for the library at ``root`` that are still running (each is
    the leader of its own process group, so the CLI's group does not hold them)."""
    marker = f"ASSET_LIBRARY_HOME={root}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0") and _live_processes(
                int(environ.parent.name)
            ):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def _wait_for_no_workers(root: Path, seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (live := _run_workers(root)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live


def test_ctrl_c_stops_the_ingest_and_a_rerun_completes(slow_batch, tmp_path):
    root = tmp_path / "library"
    batch = "slow"
    ingest = _start(
        "ingest", str(slow_batch), "--library", str(root), "--batch", batch,
        "--shard-size", "3", "--workers", "1",
    )  # fmt: skip
    try:
        assert ingest.stdout is not None
        lines = []
        for line in ingest.stdout:
            lines.append(line)
            if line.startswith("[1/3]"):
                break
        # Ctrl-C, to the whole foreground group, once the second shard is reading its images.
        _wait_for(lambda: _temp_files(root / "shards"), ingest)
        os.killpg(ingest.pid, signal.SIGINT)
        out, err = ingest.communicate(timeout=120)
    finally:
        if ingest.poll() is None:
            os.killpg(ingest.pid, signal.SIGKILL)
    out = "".join(lines) + out
    assert ingest.returncode == 130, out + err
    assert "[1/3] slow-s00000: 3 images, 3 ok" in out
    assert "[2/3]" not in out and "[3/3]" not in out and "checks    " not in out
    assert "NOT DONE  slow-s00001" in err and "NOT DONE  slow-s00002" in err
    assert "NOT DONE  slow-s00000" not in err
    rerun = next(line for line in err.splitlines() if line.startswith("re-run:"))
    assert f"--batch {batch}" in rerun and f"--library {root}" in rerun
    assert _wait_for_no_processes(ingest.pid) == []
    assert _run_workers(root) == []  # the CLI waited for its workers to end

    # Nothing half-written: no temporary file, no shard part in the lake.
    assert _temp_files(root) == []
    library = Library(root)
    with duckdb.connect() as connection:
        for shard in ("slow-s00001", "slow-s00002"):
            keys = root / "shards" / f"{shard}.parquet"
            in_lake = library.query(
                "SELECT count(*) AS n FROM occurrences WHERE shard = ?", [shard]
            )[0]["n"]
            whole = connection.execute(
                "SELECT count(*) FROM read_parquet(?) WHERE status = 'ok'", [str(keys)]
            ).fetchone()[0] if keys.exists() else 0  # fmt: skip
            assert in_lake in (0, whole), shard

    # Dagster: the interrupted shard's run failed, none is left in progress.
    assert _run_statuses(root) == {
        "slow-s00000": [dg.DagsterRunStatus.SUCCESS],
        "slow-s00001": [dg.DagsterRunStatus.FAILURE],
    }
    _, states = _shard_states(root)
    assert states == {
        "slow-s00000": "materialized",
        "slow-s00001": "failed",
        "slow-s00002": "missing",
    }

    again = _run(*shlex.split(rerun.removeprefix("re-run:"))[1:])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "shards    3 ok, 0 failed" in again.stdout
    assert {shard: runs[-1] for shard, runs in _run_statuses(root).items()} == {
        shard: dg.DagsterRunStatus.SUCCESS for shard in states
    }
    assert _temp_files(root) == []


def test_a_killed_ingest_is_marked_failed_and_a_rerun_cleans_up(slow_batch, tmp_path):
    root = tmp_path / "library"
    args = ("ingest", str(slow_batch), "--library", str(root), "--batch", "killed")
    ingest = _start(*args, "--workers", "1")
    try:
        _wait_for(lambda: _temp_files(root / "shards"), ingest)
        os.kill(ingest.pid, signal.SIGKILL)  # kill -9 of the CLI, mid-shard
        ingest.communicate(timeout=60)
    finally:
        if ingest.poll() is None:
            os.killpg(ingest.pid, signal.SIGKILL)
    assert ingest.returncode == -signal.SIGKILL
    # Its run worker and fingerprinting processes end with it rather than go on or wait.
    assert _wait_for_no_processes(ingest.pid) == []
    assert _wait_for_no_workers(root) == []
    orphans = _temp_files(root)
    assert orphans and all(p.name.startswith(".killed-s00000.parquet.") for p in orphans)
    assert _run_statuses(root) == {"killed-s00000": [dg.DagsterRunStatus.STARTED]}

    output, states = _shard_states(root)
    assert "(ingest_shard killed-s00000) was in progress but its process is gone" in output
    assert states == {"killed-s00000": "failed"}
    assert _run_statuses(root) == {"killed-s00000": [dg.DagsterRunStatus.FAILURE]}

    again = _run(*args, "--workers", "1", "--replace")  # the killed run planned the batch
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[1/1] killed-s00000: 9 images, 9 ok" in again.stdout
    assert _temp_files(root) == []
    assert _run_statuses(root)["killed-s00000"] == [
        dg.DagsterRunStatus.FAILURE,
        dg.DagsterRunStatus.SUCCESS,
    ]


def test_ctrl_c_stops_shards_running_side_by_side(slow_batch, tmp_path):
    root = tmp_path / "library"
    ingest = _start(
        "ingest", str(slow_batch), "--library", str(root), "--batch", "two",
        "--shard-size", "3", "--workers", "1", "--parallel", "2", "--retries", "0",
    )  # fmt: skip
    try:
        # Ctrl-C once two shard runs are under way at the same time.
        def under_way() -> int:
            try:  # the CLI may still be creating the instance's tables
                statuses = _run_statuses(root).values()
            except Exception:
                return 0
            return sum(s[-1] == dg.DagsterRunStatus.STARTED for s in statuses)

        _wait_for(lambda: under_way() >= 2, ingest)
        os.killpg(ingest.pid, signal.SIGINT)
        out, err = ingest.communicate(timeout=120)
    finally:
        if ingest.poll() is None:
            os.killpg(ingest.pid, signal.SIGKILL)
    assert ingest.returncode == 130, out + err
    runs = _run_statuses(root)
    # A shard may end in the moment between the check and the signal; at least one is stopped.
    stopped = [
        shard for shard, statuses in runs.items() if statuses[-1] != dg.DagsterRunStatus.SUCCESS
    ]
    assert stopped and all(f"NOT DONE  {shard}" in err for shard in stopped)
    assert "--parallel 2" in next(line for line in err.splitlines() if line.startswith("re-run:"))
    assert _run_workers(root) == []
    assert _temp_files(root) == []
    # The runs under way ended failed, by Dagster's own handling of the forwarded stop; none
    # is left in progress.
    assert all(runs[shard] == [dg.DagsterRunStatus.FAILURE] for shard in stopped)
    assert all(statuses == [dg.DagsterRunStatus.SUCCESS] for shard, statuses in runs.items()
               if shard not in stopped)  # fmt: skip


def test_a_shard_whose_worker_is_killed_is_run_again_on_a_new_worker(slow_batch, tmp_path):
    """A worker killed mid-shard (as the out-of-memory killer would): its run is marked failed
    at once, the shard is run again on a worker started in its place, and the batch completes."""
    root = tmp_path / "library"
    ingest = _start(
        "ingest", str(slow_batch), "--library", str(root), "--batch", "oom",
        "--shard-size", "9", "--workers", "1", "--parallel", "1", "--retries", "1",
    )  # fmt: skip
    try:
        _wait_for(lambda: _temp_files(root / "shards"), ingest)
        [worker] = _run_workers(root)
        os.killpg(worker, signal.SIGKILL)  # the worker and its fingerprinting process
        out, err = ingest.communicate(timeout=300)
    finally:
        if ingest.poll() is None:
            os.killpg(ingest.pid, signal.SIGKILL)
    assert ingest.returncode == 0, out + err
    assert "oom-s00000: attempt 1 failed (its worker process ended (exit code -9)" in out
    assert "[1/1] oom-s00000: 9 images, 9 ok" in out and "(after 2 attempts)" in out
    assert "shards    1 ok, 1 of them after a retry, 0 failed" in out
    assert _run_statuses(root) == {
        "oom-s00000": [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.SUCCESS]
    }
    assert _run_workers(root) == [] and _temp_files(root) == []
