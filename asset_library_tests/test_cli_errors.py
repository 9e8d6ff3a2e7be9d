"""Errors name the thing that is wrong and fit on a line or two, never a traceback."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asset_library.layout import LibraryLayout

FOREST = "github_jenssegers_imagehash/forest"


def _assert_short(err: str) -> list[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, err
    assert "Traceback" not in err and "Stack Trace" not in err
    return lines


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("uri,label\na.jpg,x\nb.jpg\n", "row 2 (line 3): expected 2 columns, got 1"),
        ("path,label\n", "no 'uri' column (columns: path, label)"),
        ("path,label\na.jpg,x\n", "no 'uri' column (columns: path, label)"),
        ("", "the file is empty (no header row)"),
    ],
)
def test_a_bad_manifest_is_one_line_naming_file_row_and_reason(
    run_cli, tmp_path, content, expected
):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(content)
    code, out, err = run_cli("ingest", str(manifest))
    assert code == 1
    [line] = _assert_short(err)
    assert line.startswith(f"asset-library: planning failed: manifest {manifest}")
    assert expected in line
    assert "Traceback" not in out


def test_a_failed_shard_names_the_shard_and_the_source(run_cli, tmp_path, corpus_dir, monkeypatch):
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copyfile(corpus_dir / FOREST / "forest-low.jpg", batch / "low.jpg")
    objects = tmp_path / "objects"
    objects.write_text("a file where the object store's folder should be")
    monkeypatch.setenv("ASSET_LIBRARY_OBJECTS", str(objects))
    code, out, err = run_cli("ingest", str(batch), "--batch", "broken", "--retries", "1")
    assert code == 1
    assert "Traceback" not in out + err
    [again] = [line for line in out.splitlines() if "attempt 1 failed" in line]
    assert "broken-s00000: attempt 1 failed (shard broken-s00000 failed storing" in again
    [failure] = [line for line in out.splitlines() if "FAILED shard" in line]
    assert failure.startswith("[1/1] broken-s00000: FAILED shard broken-s00000 failed storing")
    assert str(batch / "low.jpg") in failure and "Error" in failure
    assert failure.endswith("(after 2 attempts)")
    # The summary names the shard and the first line of its failure once more.
    [named] = [line for line in out.splitlines() if line.startswith("FAILED    ")]
    assert named.startswith("FAILED    broken-s00000: shard broken-s00000 failed storing")
    assert f"re-run:   asset-library ingest {batch} --batch broken --replace" in out


def test_status_of_a_library_with_no_batches_says_so(run_cli, tmp_path):
    root = LibraryLayout.open(tmp_path / "library").root
    code, out, err = run_cli("status", "--library", str(root))
    assert code == 0, err
    assert out.strip() == f"no batches ingested yet in {root}"


def test_status_lists_an_ingested_batch(run_cli, tmp_path, corpus_dir):
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copyfile(corpus_dir / FOREST / "forest-low.jpg", batch / "low.jpg")
    assert run_cli("ingest", str(batch), "--batch", "one")[0] == 0
    code, out, _ = run_cli("status")
    assert code == 0
    assert out.splitlines()[0].startswith("one  1 images")
    assert "one-s00000  materialized" in out
    assert Path(tmp_path / "library" / "triggers" / "one.json").exists()


def test_output_cut_short_by_its_reader_ends_quietly(corpus_library):
    """``asset-library duplicates | head -1`` (the README's example): the reader closing the
    pipe ends the command with no traceback."""
    root, _ = corpus_library
    command = (
        f"{shlex.quote(sys.executable)} -m asset_library.cli duplicates "
        f"--library {shlex.quote(str(root))} | head -1"
    )
    # buffered, as in a plain shell: the last of the output is written at the final flush
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith('{"group": 0') and done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
