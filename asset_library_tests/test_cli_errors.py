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


#: Every command that reads a library, with the arguments it needs.
READERS = [
    ("status",),
    ("lookup", "0" * 32),
    ("similar", "0" * 32),
    ("duplicates",),
    ("sql", "SELECT 1"),
    ("serve", "--port", "0"),
    ("migrate",),
]


@pytest.mark.parametrize("command", READERS, ids=[c[0] for c in READERS])
def test_a_path_without_a_library_exits_2_and_creates_nothing(run_cli, tmp_path, command):
    typo = tmp_path / "typo"
    code, out, err = run_cli(*command, "--library", str(typo))
    assert code == 2, (out, err)
    [line] = _assert_short(err)
    assert line.startswith(f"asset-library: no asset library at {typo}")
    assert not typo.exists()
    # A folder that holds something else is not a library either, and is left as it was.
    typo.mkdir()
    (typo / "notes.txt").write_text("not a library")
    code, _, err = run_cli(*command, "--library", str(typo))
    assert code == 2 and f"no asset library at {typo}" in err
    assert [p.name for p in typo.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("source", ["missing-folder", "missing.csv"])
def test_ingest_of_a_missing_source_exits_2_before_creating_the_library(run_cli, tmp_path, source):
    library = tmp_path / "new-library"
    code, out, err = run_cli("ingest", str(tmp_path / source), "--library", str(library))
    assert code == 2, (out, err)
    [line] = _assert_short(err)
    assert line.startswith(f"asset-library: batch source '{tmp_path / source}'")
    assert not library.exists()


@pytest.mark.parametrize("sql", ["SELEC 1", "SELECT * FROM images WHERE", ""])
def test_an_sql_syntax_error_is_not_called_a_refusal(run_cli, tmp_path, sql):
    root = LibraryLayout.open(tmp_path / "library").root
    code, out, err = run_cli("sql", sql, "--library", str(root))
    assert code == 2 and out == ""
    assert err.startswith("asset-library: not valid SQL: ")
    assert "read-only" not in err and "Traceback" not in err


def test_status_lists_an_ingested_batch_and_errors_exit_alike(run_cli, tmp_path, corpus_dir):
    """One ingest (they cost seconds) for status and for the same error in every command."""
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copyfile(corpus_dir / FOREST / "forest-low.jpg", batch / "low.jpg")
    assert run_cli("ingest", str(batch), "--batch", "one")[0] == 0
    code, out, _ = run_cli("status")
    assert code == 0
    assert "one  1 images" in out
    assert "one-s00000  materialized" in out
    assert Path(tmp_path / "library" / "triggers" / "one.json").exists()
    # An md5 the library does not have: exit 1, said the same way by lookup and similar.
    unknown = "0" * 32
    said = set()
    for command in ("lookup", "similar"):
        code, out, err = run_cli(command, unknown)
        assert code == 1, (command, out, err)
        [line] = _assert_short(err)
        said.add(line)
    assert said == {f"asset-library: no image with md5 {unknown} in the library"}
    # An existing --batch is a bad argument, like any other.
    code, _, err = run_cli("ingest", str(batch), "--batch", "one")
    assert code == 2
    [line] = _assert_short(err)
    assert line.startswith("asset-library: batch 'one' already exists")
    code, _, err = run_cli("ingest", str(batch), "--batch", "one", "--shard-size", "0")
    assert code == 2 and "argument --shard-size: 0 is less than 1" in err


def test_a_failed_refresh_is_reported_failed_and_status_shows_what_images_lacks(
    run_cli, tmp_path, corpus_dir
):
    """A damaged table file of the merge (``image_counts``'s first commit): the shards land,
    the refresh fails; neither the summary nor ``status`` passes that off as an empty library."""
    batch = tmp_path / "batch"
    batch.mkdir()
    for name in ("forest-low.jpg", "forest-high.jpg"):
        shutil.copyfile(corpus_dir / FOREST / name, batch / name)
    layout = LibraryLayout.open(tmp_path / "library")
    log = layout.table_dir("image_counts") / "_delta_log"
    log.mkdir(parents=True)
    (log / "00000000000000000000.json").write_text('{"commitInfo": {"timestamp": ')
    code, out, err = run_cli("ingest", str(batch), "--batch", "two", "--shard-size", "1")
    assert code == 1, out + err
    [summary] = [
        line for line in out.splitlines() if line.startswith("library   ") and "FAILED" in line
    ]
    assert summary.startswith("library   refresh FAILED: ")
    assert " 0 images," not in out and "attribute values" not in out, out
    assert "refresh_library FAILED" in out  # the checks line

    code, out, err = run_cli("status")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"library   {layout.root}"
    assert lines[1].startswith("refresh   last ") and ": FAILED (run " in lines[1]
    assert lines[1].endswith("): " + summary.removeprefix("library   refresh FAILED: "))
    assert lines[2] == (
        "pending   2 shard(s) whose rows images does not hold yet: two-s00000, two-s00001"
    )
    assert "two-s00000  materialized" in out and "two-s00001  materialized" in out
