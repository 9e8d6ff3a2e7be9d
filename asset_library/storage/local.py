"""The object store in a folder: the embedded default, no server needed."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from asset_library.layout import rename_durably, temp_path_for
from asset_library.storage.base import ObjectStat, ObjectStore, PutResult, check_key, check_md5
from asset_library.storage.errors import DigestMismatchError, ObjectNotFoundError


class LocalObjectStore(ObjectStore):
    """Objects as files under a folder: the default when no object storage is configured.

    A write goes to a temporary file in the target folder, then is published with `os.link`,
    which fails if the name exists: readers never see a partial file and the first writer wins.
    A damaged object is replaced by a rename, atomic and durable too (`rename_durably`). Files
    get the process umask's permissions (0o666 & ~umask), like any other file the process
    creates.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put_if_absent(
        self, key: str, data: bytes, md5_hex: str, *, suspect: bool = False
    ) -> PutResult:
        check_md5(md5_hex, key)
        path = self._path(key)
        actual = hashlib.md5(data).hexdigest()
        if actual != md5_hex:
            raise DigestMismatchError(
                f"md5 mismatch for key {key!r}: expected {md5_hex}, body has {actual}",
                code="BadDigest",
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(path)
        # os.open applies the umask to 0o666; mkstemp would make every object 0o600.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            try:
                os.link(tmp, path)
                return PutResult.STORED
            except FileExistsError:
                if self._holds(path, md5_hex, len(data)):
                    return PutResult.PRESENT
                rename_durably(tmp, path)
                return PutResult.REPAIRED
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _holds(path: Path, md5_hex: str, size: int) -> bool:
        """Whether the file at `path` is exactly the body with this MD5 and size."""
        try:
            if path.stat().st_size != size:
                return False
            with path.open("rb") as handle:
                return hashlib.file_digest(handle, "md5").hexdigest() == md5_hex
        except (FileNotFoundError, IsADirectoryError):
            return False

    def stat(self, key: str) -> ObjectStat | None:
        path = self._path(key)
        try:
            found = path.stat()
        except FileNotFoundError:
            return None
        return ObjectStat(found.st_size) if path.is_file() else None

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"no object {key!r} at {path}", code="NoSuchKey") from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def iter_keys(self, prefix: str = "images/") -> Iterator[str]:
        # Start the walk at the deepest folder the prefix names, then filter by the rest.
        folder = prefix.rpartition("/")[0]
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            for name in sorted(filenames):
                if name.startswith("."):
                    continue  # temporary files of writes in progress
                key = base + name
                if key.startswith(prefix):
                    yield key

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def describe(self) -> str:
        return f"local folder {self.root}"
