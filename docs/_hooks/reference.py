"""MkDocs hook: the reference parts of the docs, written from the code at every build.

A page asks for one with a line ``<!-- generated: NAME -->``; NAME is one of :data:`SECTIONS`.
An unknown name fails the build, so a page cannot ask for a reference that no longer exists.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
from collections.abc import Callable
from typing import Any

MARKER = re.compile(r"^<!-- generated: ([a-z_]+) -->$", re.MULTILINE)


def macros() -> str:
    """Each table macro of the catalog with its real argument names."""
    from asset_library.lake.catalog import MACRO_HELP, MACROS, macro_signature

    missing = sorted(set(MACROS) ^ set(MACRO_HELP))
    if missing:
        raise ValueError(f"table macros without a description, or described but gone: {missing}")
    rows = [f"| `{macro_signature(name)}` | {MACRO_HELP[name]} |" for name in MACROS]
    return "\n".join(["| macro | rows |", "| --- | --- |", *rows])


def cli() -> str:
    """``asset-library --help`` and each command's ``--help``, as the installed command prints
    them (at a fixed width, so the page does not depend on the terminal that builds it)."""
    from asset_library.cli import _parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = _parser()
        parts = ["### `asset-library`", "", "```text", parser.format_help().rstrip(), "```"]
        for action in parser._actions:  # argparse keeps its subcommands only here
            if isinstance(action, argparse._SubParsersAction):
                for name, command in action.choices.items():
                    text = command.format_help().rstrip()
                    parts += ["", f"### `{name}`", "", "```text", text, "```"]
        return "\n".join(parts)
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def http() -> str:
    """Every route of the JSON API, from the OpenAPI schema the service publishes."""
    from fastapi import FastAPI

    from asset_library.serve.app import router

    app = FastAPI()
    app.include_router(router)
    rows = ["| method | path | what | parameters |", "| --- | --- | --- | --- |"]
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            params = [
                f"`{p['name']}`" + ("" if p.get("required") else " (optional)")
                for p in operation.get("parameters", [])
            ]
            if path == "/query/{macro}":
                params.append("each argument of the macro by its name (above)")
            if "requestBody" in operation:
                params.append("multipart `image` (optional)")
            rows.append(
                f"| {method.upper()} | `{path}` | {operation.get('summary', '')} | "
                f"{', '.join(params)} |"
            )
    return "\n".join(rows)


def python() -> str:
    """The public methods of ``Library``: signature and docstring."""
    from asset_library.library import Library

    parts = [f"### `Library{_signature(Library)}`", "", _doc(Library)]
    for name, member in vars(Library).items():
        if name.startswith("_"):
            continue
        function = member.fget if isinstance(member, property) else member
        if not callable(function):
            continue
        shown = name if isinstance(member, property) else f"{name}{_signature(function)}"
        kind = "A property." if isinstance(member, property) else ""
        parts += ["", f"### `{shown}`", "", _doc(function) or kind]
    return "\n".join(parts)


def _signature(function: Any) -> str:
    """The signature as written: annotations unquoted, ``self`` left out."""
    text = str(inspect.signature(function))
    text = re.sub(r"(: |-> )'([^']*)'", r"\1\2", text)
    return text.replace("(self, ", "(").replace("(self)", "()")


def _doc(thing: Any) -> str:
    return inspect.cleandoc(thing.__doc__ or "").replace("``", "`")


SECTIONS: dict[str, Callable[[], str]] = {
    "macros": macros,
    "cli": cli,
    "http": http,
    "python": python,
}


def render(markdown: str) -> str:
    """``markdown`` with each marker replaced by its generated section."""

    def section(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in SECTIONS:
            raise ValueError(f"unknown generated section {name!r}: use one of {sorted(SECTIONS)}")
        return SECTIONS[name]()

    return MARKER.sub(section, markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return render(markdown)
