"""Move a folder library to an ``s3://bucket/prefix`` home: ``asset-library move-to``.

Everything durable is copied byte for byte under the same relative keys: the plans, trigger
records, keys files, the similarity index and the key cache, the image bytes when the library
keeps them inside itself (``objects/``) and the lake when it is inside too (a Delta table is
relocatable: its log names its files relative to the table). ``library.json`` is written last,
so a move cut short leaves no library at the target (``asset-library`` refuses it as "no asset
library"); the target must be empty, so nothing of another library is ever mixed in. What is
a cache (the CLI's Dagster instance, progress files, the serving store) stays behind. The folder
is left as it was: delete it once the moved library answers.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from asset_library.layout import LibraryLayout, resolve_home
from asset_library.s3 import is_s3
from asset_library.storage.remote import Remote, walk

#: The folders of a library that hold durable files (the rest of a folder library is caches).
DURABLE = (
    "plans",
    "triggers",
    "shards",
    "index",
    "image_keys",
    "damaged_objects",
    "objects",
    "lake",
)
_THREADS = 16


class MoveRefused(ValueError):
    """The move cannot start: the source is no folder library or the target is not empty."""


@dataclass
class Moved:
    target: str
    files: int = 0
    bytes: int = 0
    #: What the moved library keeps outside its home (a store or lake recorded elsewhere).
    kept_outside: list[str] = field(default_factory=list)


def move_to(layout: LibraryLayout, target: str) -> Moved:
    """Copy the folder library at ``layout`` to ``target`` (an empty ``s3://`` home)."""
    if layout.remote is not None:
        raise MoveRefused(f"{layout.location} is already at an S3 home; move-to moves a folder")
    home = resolve_home(target)
    if not is_s3(home):
        raise MoveRefused(f"move-to needs an s3://bucket[/prefix] target, not {target!r}")
    remote = Remote(home, layout.root)
    if not remote.is_empty():
        raise MoveRefused(f"{home} is not empty: a library moves only to an empty prefix")
    settings = layout.settings()
    moved = Moved(home)
    for name in ("objects", "lake"):
        recorded = settings.get(name)
        if recorded is not None and (is_s3(str(recorded)) or Path(str(recorded)).is_absolute()):
            moved.kept_outside.append(f"{name}: {recorded}")
    files = [
        path
        for folder in DURABLE
        for path in walk(layout.root / folder)
        if not path.name.endswith(".tmp")
    ]
    with ThreadPoolExecutor(_THREADS) as pool:
        for size in pool.map(lambda path: _upload(remote, path), files):
            moved.files += 1
            moved.bytes += size
    moved.bytes += _upload(remote, layout.settings_path)  # last: the library exists from here
    moved.files += 1
    return moved


def _upload(remote: Remote, path: Path) -> int:
    """One file to its key (boto3's managed transfer: multipart for big files)."""
    remote.client.upload_file(str(path), remote.bucket, remote.key(path))
    return path.stat().st_size
