"""``asset-library ingest`` and ``status`` as a user runs them: what reaches the terminal, Ctrl-C,
and a run whose process was killed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from asset_library.cli import main
from asset_library.library import Library

PROJECT = Path(__file__).resolve().parents[1]
#: libtiff writes to fd 2 on this file ("_tiffReadProc: Invalid Read at loc 3309, eof: 2529.").
BAD_TIFF = "github_python-pillow_Pillow/crash-0c7e0e8e11ce787078f00b5b0ca409a167f070e0.tif"


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
    assert "1 ingested" in out and "rejected  1 (corrupt: 1)" in out
    for said in ("_tiffReadProc", "TIFFFillStrip", "TIFFReadDirectory"):
        assert said not in out and said not in err
    rejects = Library(cli_env).query("SELECT source_uri, reason, message FROM rejects")
    assert [(Path(r["source_uri"]).name, r["reason"]) for r in rejects] == [
        ("crash.tif", "corrupt")
    ]
    assert rejects[0]["message"] == (
        "tiff cannot be decoded: decoder error -2; the decoder reported: "
        "_tiffReadProc: Invalid Read at loc 3309, eof: 2529.; "
        "TIFFFillStrip: Read error on strip 0; got 18446744073709550836 bytes, expected 1012."
    )
