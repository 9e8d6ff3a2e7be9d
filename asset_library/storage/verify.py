"""Checking stored images against their keys: a library's objects in bulk (`verify_objects`),
one image as it is read (`read_image`), and the record of what readers found damaged
(`DamageRecord`), so a writer repairs it.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from asset_library.ids import is_md5_key
from asset_library.layout import temp_path_for
from asset_library.storage.base import ObjectProblem, ObjectStore, object_key
from asset_library.storage.errors import DamagedObjectError, ObjectNotFoundError


def verify_objects(
    store: ObjectStore,
    items: Iterable[tuple[str, int]],
    content_sample: int = 100,
    *,
    threads: int = 16,
    rng: random.Random | None = None,
    suspects: Collection[str] = frozenset(),
) -> list[ObjectProblem]:
    """The images among `items` (md5, size in bytes) whose stored object is missing or damaged.

    Every object gets a HEAD (or stat): missing, or a size other than the image's, is a
    problem. Reading bytes costs a GET each, so only a random sample of `content_sample`
    objects is read and hashed, plus every object whose store-reported MD5 (an S3 single-part
    ETag) disagrees and every md5 in `suspects` (a reader found it damaged): a store's report
    alone is not trusted, the bytes decide.
    """
    items = list(items)
    with ThreadPoolExecutor(threads) as pool:
        stats = list(pool.map(lambda item: store.stat(object_key(item[0])), items))
    problems: list[ObjectProblem] = []
    to_confirm: list[tuple[str, int]] = []
    intact: list[tuple[str, int]] = []
    for (md5, size), found in zip(items, stats, strict=True):
        if found is None:
            where = store.uri(object_key(md5))
            problems.append(ObjectProblem(md5, "missing", f"no object at {where}"))
        elif found.size != size:
            problems.append(
                ObjectProblem(md5, "size", f"object has {found.size:,} bytes, image has {size:,}")
            )
        elif md5 in suspects or (found.claimed_md5 is not None and found.claimed_md5 != md5):
            to_confirm.append((md5, size))
        else:
            intact.append((md5, size))
    sample = (rng or random).sample(intact, min(len(intact), max(0, content_sample)))

    def content_md5(md5: str) -> str | None:
        try:
            return hashlib.md5(store.get(object_key(md5))).hexdigest()
        except ObjectNotFoundError:
            return None

    to_read = to_confirm + sample
    with ThreadPoolExecutor(threads) as pool:
        digests = list(pool.map(lambda item: content_md5(item[0]), to_read))
    for (md5, _), digest in zip(to_read, digests, strict=True):
        if digest is None:
            problems.append(ObjectProblem(md5, "missing", "object removed while being checked"))
        elif digest != md5:
            problems.append(ObjectProblem(md5, "content", f"object's bytes have md5 {digest}"))
    return problems


def read_image(store: ObjectStore, md5: str) -> bytes:
    """The stored bytes of the image ``md5``, checked against the key as they are read:
    :class:`DamagedObjectError`, naming the object, when they are not that image's bytes."""
    key = object_key(md5)
    data = store.get(key)
    digest = hashlib.md5(data).hexdigest()
    if digest != md5:
        raise DamagedObjectError(
            f"the stored object {store.uri(key)} is damaged: its {len(data):,} bytes have md5 "
            f"{digest}, not {md5}; ingest the image's source again to repair it",
            md5=md5,
        )
    return data


class DamageRecord:
    """The md5s whose stored object a reader found damaged, one file each in ``folder``, so
    a writer's repair does not need the reader's process: ``uploads_present`` reads these
    objects' bytes whatever its sample, an ingest re-writes them though the key is present,
    and an object found intact again leaves the record."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def add(self, error: DamagedObjectError) -> None:
        path = self.folder / error.md5
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(path)
        tmp.write_text(str(error) + "\n")
        os.replace(tmp, path)

    def md5s(self) -> set[str]:
        if not self.folder.is_dir():
            return set()
        return {p.name for p in self.folder.iterdir() if is_md5_key(p.name)}

    def clear(self, md5s: Iterable[str]) -> None:
        for md5 in md5s:
            (self.folder / md5).unlink(missing_ok=True)
