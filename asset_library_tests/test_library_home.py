"""A library's home: a folder or ``s3://bucket[/prefix]``, and nothing else becomes one."""

from __future__ import annotations

from pathlib import Path

import pytest

from asset_library.defs.resources import build_resources
from asset_library.layout import InvalidHomeError, LibraryLayout, cache_home, resolve_home


@pytest.mark.parametrize(
    ("home", "resolved"),
    [
        ("s3://lib", "s3://lib"),
        ("s3://lib/", "s3://lib"),
        ("s3://lib/library", "s3://lib/library"),
        ("s3://lib/a/b/", "s3://lib/a/b"),
        ("s3://my.bucket-1/x", "s3://my.bucket-1/x"),
    ],
)
def test_an_s3_home_is_accepted_in_one_spelling(home: str, resolved: str) -> None:
    assert resolve_home(home) == resolved


def test_a_folder_home_is_an_absolute_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_home("lib") == str(tmp_path / "lib")
    assert resolve_home(tmp_path / "x") == str(tmp_path / "x")
    assert resolve_home("./s3:x") == str(tmp_path / "s3:x")  # a folder, said as one
    monkeypatch.setenv("ASSET_LIBRARY_HOME", "s3://env-bucket/p")
    assert resolve_home() == "s3://env-bucket/p"
    monkeypatch.delenv("ASSET_LIBRARY_HOME")
    assert resolve_home() == str(tmp_path / "library")


@pytest.mark.parametrize(
    ("home", "reason"),
    [
        ("gs://x", "unsupported scheme gs:"),
        ("http://x", "unsupported scheme http:"),
        ("file:///tmp/x", "unsupported scheme file:"),
        ("s3:/x", "not an S3 URL"),
        ("s3:x", "not an S3 URL"),
        ("s3://", "no bucket named"),
        ("s3:///x", "no bucket named"),
        ("s3://B/x", "not a valid bucket name"),
        ("s3://a..b/x", "not a valid bucket name"),
        ("s3://lib/a//b", "prefix segment ''"),
        ("s3://lib/a/../b", "prefix segment '..'"),
    ],
)
def test_any_other_home_is_refused_naming_it(home: str, reason: str) -> None:
    with pytest.raises(InvalidHomeError, match="a library is a folder or s3://") as refused:
        resolve_home(home)
    assert repr(home) in str(refused.value) and reason in str(refused.value)


def test_an_s3_library_works_in_its_cache_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ASSET_LIBRARY_CACHE", str(tmp_path / "cache"))
    layout = LibraryLayout.at("s3://lib/team/library")
    assert layout.root == tmp_path / "cache" / "libraries" / "lib" / "team" / "library"
    assert layout.location == "s3://lib/team/library"
    assert layout.lake_location == "s3://lib/team/library/lake"
    assert layout.objects_location == "s3://lib/team/library/objects"
    assert layout.landing_location == "s3://lib/team/library/landing"
    assert layout.dagster_home.is_relative_to(tmp_path / "cache")
    monkeypatch.delenv("ASSET_LIBRARY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_home() == tmp_path / "xdg" / "asset-library"


def test_resources_refuse_a_home_of_another_scheme(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidHomeError, match="'gs://x'"):
        build_resources({"ASSET_LIBRARY_HOME": "gs://x"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("home", ["gs://x", "s3:/x", "s3://"])
def test_ingest_into_a_home_of_another_scheme_fails_and_creates_nothing(
    home: str, run_cli, corpus_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("ASSET_LIBRARY_HOME", home)
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_cli("ingest", str(corpus_dir / "github_jenssegers_imagehash"))
    assert code == 2, (out, err)
    assert f"library home {home!r}" in err and "a library is a folder or s3://" in err
    assert sorted(tmp_path.rglob("*")) == before  # no folder named after it, anywhere
    code, _, err = run_cli("status", "--library", home)
    assert code == 2 and f"library home {home!r}" in err
