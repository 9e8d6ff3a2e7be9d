"""The similarity index's files, as its ``segments.json`` names them: which files those are,
fetching them from an ``s3://`` home, uploading a sync's new ones and deleting the ones no
longer named (:mod:`asset_library.similarity` is the one user).

``segments.json`` names every other file of the index, directly (each segment's keys file, each
hash kind's manifest) or through the manifests it names (their segment folders). Names are
paths relative to the index folder. Only named files are fetched, and only files a replaced
``segments.json`` named are deleted: a file at the home that nothing names yet is another
machine's upload in flight, and stays.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from asset_library.layout import LibraryLayout
from asset_library.search.index import MANIFEST, saved_dirs

#: The groups file, beside the index it is computed from (replaced in place; named by nothing).
GROUPS_FILE = "near_duplicates.parquet"
#: The first wait (seconds) after a lost publish; doubled each time, jittered.
BACKOFF_S = 0.1


def read_saved(path: Path) -> dict[str, Any]:
    """``segments.json`` as saved, or ``{}`` where it is missing or unreadable (the index's
    load then says why)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def relative_name(text: object) -> str:
    """A name ``segments.json`` gives, checked: a relative path inside the index folder, in
    one spelling (``ValueError`` naming anything else)."""
    name = str(text)
    parts = name.split("/")
    if "\\" in name or any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        raise ValueError(f"{text!r} is not a path inside the index folder")
    return name


def manifest_names(saved: Mapping[str, Any], kinds: Iterable[str]) -> dict[str, str]:
    """Each hash kind's manifest: as ``segments.json`` names it, or (an index saved before
    names were unique) its ``<kind>/manifest.json``."""
    named = saved.get("manifests")
    if named is None:
        return {kind: f"{kind}/{MANIFEST}" for kind in kinds}
    if not isinstance(named, dict) or set(named) != set(kinds):
        raise ValueError(f"manifests {named!r}: not one per hash kind ({', '.join(kinds)})")
    return {kind: relative_name(named[kind]) for kind in kinds}


def keys_name(segment: str, meta: Mapping[str, Any]) -> str:
    """A segment's keys file: as ``segments.json`` names it, or ``keys/<segment>.npy``."""
    return relative_name(meta.get("keys") or f"keys/{segment}.npy")


def named_files(directory: Path, saved: Mapping[str, Any], kinds: Iterable[str]) -> set[str]:
    """What ``saved`` (a ``segments.json``) names, as paths relative to ``directory``: keys
    files and manifests, and the segment folders the manifests in ``directory`` name. As much
    as can be read: a name that is not a path inside the folder, or a manifest that cannot be
    read, is left out (loading the index reports it)."""
    named: set[str] = set()
    segments = saved.get("segments")
    for segment, meta in segments.items() if isinstance(segments, dict) else ():
        try:
            named.add(keys_name(str(segment), meta))
        except (ValueError, AttributeError):
            continue
    try:
        manifests = manifest_names(saved, kinds) if saved else {}
    except ValueError:
        manifests = {}
    for manifest in manifests.values():
        named.add(manifest)
        folder = PurePosixPath(manifest).parent
        try:
            dirs = saved_dirs(directory / folder, PurePosixPath(manifest).name)
        except (OSError, ValueError):
            continue
        named.update((folder / name).as_posix() for name in dirs)
    return named


def is_named(relative: str, named: set[str]) -> bool:
    """Whether a file (a path relative to the index folder) is named: itself, or a folder it
    is in."""
    path = PurePosixPath(relative)
    return relative in named or any(parent.as_posix() in named for parent in path.parents)


def pull_index(layout: LibraryLayout, kinds: Iterable[str]) -> None:
    """Bring this machine's copy of an S3 library's index level with its home (nothing for a
    folder library): ``segments.json`` and the groups file if they changed, and every file
    ``segments.json`` names that is missing here or of another size (they are written once;
    an index saved before names were unique: its manifests if they changed)."""
    remote = layout.remote
    if remote is None or not layout.fetch(layout.segments_manifest_path):
        return
    directory = layout.index_dir
    kinds = tuple(kinds)
    saved = read_saved(layout.segments_manifest_path)
    try:
        manifests = manifest_names(saved, kinds)
    except ValueError:
        return  # damaged: the load says so, and a sync rebuilds it
    for manifest in manifests.values():
        layout.fetch(directory / manifest, immutable=PurePosixPath(manifest).name != MANIFEST)
    named = named_files(directory, saved, kinds)
    for path, size in remote.listing(directory).items():
        relative = path.relative_to(directory).as_posix()
        if relative == GROUPS_FILE:
            layout.fetch(path)
        elif is_named(relative, named) and relative not in manifests.values():
            if path.exists() and path.stat().st_size != size:
                path.unlink()
            layout.fetch(path, immutable=True)


def files_under(directory: Path, relatives: Iterable[str]) -> list[Path]:
    """The files these names are (a folder: every file under it), as they are here."""
    from asset_library.storage.remote import walk

    found: list[Path] = []
    for relative in sorted(relatives):
        path = directory / relative
        found.extend(walk(path) if path.is_dir() else [path] if path.is_file() else [])
    return found


def delete_at_home(layout: LibraryLayout, relatives: set[str]) -> None:
    """Delete at an S3 home every file these names are (a folder: every file under it)."""
    if layout.remote is None or not relatives:
        return
    directory = layout.index_dir
    listed = layout.remote.listing(directory)
    gone = [p for p in listed if is_named(p.relative_to(directory).as_posix(), relatives)]
    if gone:
        layout.remote.delete(gone)


def drop_local(directory: Path, relatives: Iterable[str]) -> None:
    """Delete here the files and folders these names are."""
    for relative in relatives:
        path = directory / relative
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def backoff(attempt: int) -> float:
    """How long to wait after the ``attempt``-th lost publish (0 first): doubling from
    :data:`BACKOFF_S`, jittered to half or all of it so that two losers do not meet again."""
    return BACKOFF_S * (2**attempt) * random.uniform(0.5, 1.0)
