"""The documentation: the site builds with --strict and loads nothing from another host, its
references are the code's (every macro with the arguments it takes), the commands it gives
parse as written, and the command line answers a newcomer's first questions."""

from __future__ import annotations

import argparse
import html
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from asset_library.cli import _parser, main
from asset_library.lake.catalog import MACROS

REPO = Path(__file__).resolve().parents[1]
#: Every page a reader is sent to for commands: the README and the site's sources.
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as `make docs` builds it (strict: a warning fails the build)."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return out


def test_the_site_loads_nothing_from_another_host(site):
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 10
    loaded = re.compile(r"<(?:link|script|img|source|iframe)\b[^>]*?(?:href|src)=\"([^\"]*)\"")
    for page in pages:
        for url in loaded.findall(page.read_text()):
            assert not re.match(r"(https?:)?//", url), f"{page.relative_to(site)} loads {url}"
    for sheet in site.rglob("*.css"):
        assert not re.search(r"@import|url\((['\"]?)(https?:)?//", sheet.read_text()), sheet
    assert (site / "architecture.svg").exists() and (site / "gallery.png").exists()


def test_the_macro_reference_is_the_catalogs_own(site):
    for page in ("usage/sql/index.html", "usage/http/index.html"):
        text = html.unescape((site / page).read_text())
        for name, (params, _) in MACROS.items():
            assert f"{name}({params})" in text, f"{page} lacks {name}({params})"
    sources = "\n".join(page.read_text() for page in PAGES)
    for name, (params, _) in MACROS.items():  # no page spells a macro with other arguments
        for written in re.findall(rf"\b{name}\(([a-z_][a-z_, ]*)\)", sources):
            assert written == params, f"{name}({written}): the macro takes ({params})"


def test_the_generated_references_name_every_command_route_and_method(site):
    cli = (site / "usage/cli/index.html").read_text()
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        assert f"usage: asset-library {name}" in cli, name
        for action in command._actions:
            for option in action.option_strings:
                assert option in cli, f"{name} {option}"
    http = html.unescape((site / "usage/http/index.html").read_text())
    for route in ("/images/{md5}", "/similar", "/query/{macro}", "/duplicates/{group}", "/stats"):
        assert f"{route}</code>" in http, route
    python = (site / "usage/python/index.html").read_text()
    for method in ("lookup", "query", "frame", "similar", "near_duplicate_groups"):
        assert f"{method}(" in python, method


def _documented_commands() -> list[tuple[Path, list[str]]]:
    """Every `uv run asset-library ...` line the pages give, as its argument list (a synopsis
    line, with [optional] parts, is left out)."""
    found = []
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            start = line.find("uv run asset-library")
            if start < 0 or "[" in line or "`" in line[:start]:
                continue
            command = line[start:].split("|")[0].split("&")[0]
            words = shlex.split(command, comments=True)
            found.append((page, words[3:]))
    return found


def test_every_documented_command_parses_as_written():
    commands = _documented_commands()
    assert len(commands) >= 20
    parser = _parser()
    for page, argv in commands:
        if argv in ([], ["--version"]) or "--help" in argv:
            continue
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(
                f"{page.relative_to(REPO)}: asset-library {shlex.join(argv)} does not parse"
            )


def test_version_and_the_bare_command_list_what_it_is(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out.strip() == f"asset-library {project['version']}"
    assert main([]) == 0
    listing = capsys.readouterr().out
    for command in ("ingest", "status", "lookup", "similar", "duplicates", "sql", "serve"):
        assert re.search(rf"^\s+{command}\b", listing, re.MULTILINE), command


def test_sql_help_lists_each_macro_with_its_arguments(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["sql", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for name, (params, _) in MACROS.items():
        assert f"  {name}({params})\n" in text, name


def test_the_license_is_the_one_pyproject_declares():
    assert (
        tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
    )
    text = (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) == 202
