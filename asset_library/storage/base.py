"""The interface every object store implements (`ObjectStore`), what its calls report, and the
key rules the stores share: an image's key comes from its MD5 (`object_key`), so a key names
exactly one body, and a key is one S3 and a folder treat alike (`check_key`).
"""

from __future__ import annotations

import abc
import enum
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from asset_library.ids import is_md5_key


class PutResult(enum.Enum):
    """What `put_if_absent` did. True when this call wrote bytes (stored or repaired)."""

    STORED = "stored"  # the key was free: this call stored the body
    PRESENT = "present"  # an intact object was already there: nothing written
    REPAIRED = "repaired"  # a damaged object was there: this call replaced it

    def __bool__(self) -> bool:
        return self is not PutResult.PRESENT


@dataclass(frozen=True)
class ObjectStat:
    """What a store says about an object without reading its bytes.

    `claimed_md5` is the MD5 the store reports for the body (an S3 single-part ETag), or None
    when it reports none it means as one (local files, multipart or SSE-KMS/SSE-C ETags).
    Stores can be wrong about it, so a mismatch is confirmed by reading before acting on it.
    """

    size: int
    claimed_md5: str | None = None


@dataclass(frozen=True)
class ObjectProblem:
    """A stored image whose object is missing or does not hold the image's bytes."""

    md5: str
    kind: str  # "missing", "size" or "content"
    detail: str

    def __str__(self) -> str:
        return f"{self.md5}: {self.detail}"


def object_key(md5: str) -> str:
    """The storage key of an image: `images/<md5[0:2]>/<md5[2:4]>/<md5>`.

    Two levels of fan-out keep local folders small and spread S3 prefixes.
    """
    if not isinstance(md5, str) or not is_md5_key(md5):
        raise ValueError(f"not an MD5 (32 lower-case hex characters): {md5!r}")
    return f"images/{md5[0:2]}/{md5[2:4]}/{md5}"


def file_md5(path: Path) -> str:
    """The MD5 (hex) of a file's bytes, read in chunks."""
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "md5").hexdigest()


def check_key(key: str) -> str:
    """Refuse keys that S3 and a file system would not treat alike.

    S3 servers differ on `a//b`, a leading `/`, a trailing `/` and `.`/`..` segments, and a
    folder cannot hold them safely; segments starting with `.` are kept for temporary files.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"bad object key: {key!r}")
    for segment in key.split("/"):
        if not segment or segment.startswith(".") or "\\" in segment or "\x00" in segment:
            raise ValueError(f"bad object key: {key!r}")
    return key


def check_md5(md5_hex: str, key: str) -> None:
    """Refuse a `put_if_absent` digest that is not an MD5, or that the key's md5 contradicts."""
    if not isinstance(md5_hex, str) or not is_md5_key(md5_hex):
        raise ValueError(f"bad md5_hex {md5_hex!r} for key {key!r}")
    named = key.rpartition("/")[2]
    if is_md5_key(named) and named != md5_hex:
        # The object would be judged against the wrong digest and "repaired" with other bytes.
        raise ValueError(f"key {key!r} names md5 {named}, but the body's md5 is {md5_hex}")


class ObjectStore(abc.ABC):
    """Write-once storage of immutable blobs by key."""

    @abc.abstractmethod
    def put_if_absent(
        self, key: str, data: bytes, md5_hex: str, *, suspect: bool = False
    ) -> PutResult:
        """Store `data` under `key` unless an intact object is there; say what was done.

        `md5_hex` is the expected MD5 of `data`; a mismatch raises `DigestMismatchError` (a
        `ValueError`) and stores nothing. An existing object is replaced only when it is
        damaged: its size differs from `data`, or its content MD5 (when the store can tell
        cheaply) differs from `md5_hex`. With `suspect` (a reader found the object damaged)
        the store's own report is not trusted: the stored bytes are read and hashed. A racing
        writer of the same key writes the same bytes.
        """

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectStat | None:
        """Size (and claimed MD5) of the stored object, or None if there is none."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""
        return self.stat(key) is not None

    def head_size(self, key: str) -> int | None:
        """The stored object's size in bytes, or None if there is none."""
        found = self.stat(key)
        return None if found is None else found.size

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; `ObjectNotFoundError` if there is none."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error (deletes are idempotent)."""

    @abc.abstractmethod
    def iter_keys(self, prefix: str = "images/") -> Iterator[str]:
        """Keys starting with `prefix`, lazily, in key order, fetched page by page."""

    @abc.abstractmethod
    def uri(self, key: str) -> str:
        """Where the object lives, for people and for other tools (`s3://...` or a path)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line naming the store, for logs and run metadata."""
