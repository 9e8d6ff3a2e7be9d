"""A library's durable files on S3: what a machine uploads after writing a file and downloads
before reading one, while the files themselves are read and written in its local cache folder.

:class:`asset_library.layout.LibraryLayout` is the one user: it maps a file of its cache folder
to the key of the same relative path under the library's ``s3://bucket/prefix``. Downloads are
conditional on the ETag last fetched (kept in ``<cache>/.etags/``, so every process of the
machine shares it): an unchanged file costs one request answered 304, never its bytes, and a
local copy whose bytes no longer match that ETag (damaged since) is fetched whole again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from asset_library.storage.base import file_md5
from asset_library.storage.errors import ObjectStoreError
from asset_library.storage.s3_store import error_code, parse_s3_uri, s3_client_from_env

#: Where the ETag of each fetched file is kept, beside the files, in the cache folder.
ETAGS = ".etags"


class ConflictError(ObjectStoreError):
    """A conditional write lost: the key exists (``if_absent``) or changed (``if_match``)."""


@dataclass(frozen=True)
class Remote:
    """The files of one library under ``url`` (``s3://bucket/prefix``), mirrored in ``cache``."""

    url: str
    cache: Path

    @cached_property
    def bucket(self) -> str:
        return parse_s3_uri(self.url)[0]

    @cached_property
    def prefix(self) -> str:
        prefix = parse_s3_uri(self.url)[1].strip("/")
        return prefix + "/" if prefix else ""

    @cached_property
    def client(self) -> Any:
        return s3_client_from_env()

    def key(self, path: Path) -> str:
        """The key of a file of the cache folder."""
        return self.prefix + path.relative_to(self.cache).as_posix()

    def _etag_path(self, path: Path) -> Path:
        return self.cache / ETAGS / path.relative_to(self.cache)

    def _etag(self, path: Path) -> str | None:
        try:
            return self._etag_path(path).read_text() or None
        except OSError:
            return None

    def _remember(self, path: Path, etag: str | None) -> None:
        from asset_library.layout import atomic_write_text

        marker = self._etag_path(path)
        if etag is None:
            marker.unlink(missing_ok=True)
        else:
            atomic_write_text(marker, etag)

    def fetch(self, path: Path, *, immutable: bool = False) -> bool:
        """Bring ``path`` level with its key: downloaded if it changed since the last fetch
        (an immutable file: only if it is missing here), removed here if the key is gone.
        Whether the file exists."""
        if immutable and path.exists():
            return True
        from botocore.exceptions import BotoCoreError, ClientError

        from asset_library.layout import atomic_path

        key = self.key(path)
        etag = self._etag(path) if path.exists() else None
        if etag is not None and not _holds(path, etag):
            etag = None  # the local copy was damaged since it was fetched: fetch it whole
        condition = {"IfNoneMatch": etag} if etag else {}
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key, **condition)
        except ClientError as error:
            code = error_code(error)
            if code in {"304", "NotModified"}:
                return True
            if code in {"404", "NoSuchKey", "NotFound"}:
                path.unlink(missing_ok=True)
                self._remember(path, None)
                return False
            raise self._failed("get", key, error) from error
        except BotoCoreError as error:
            raise self._failed("get", key, error) from error
        with atomic_path(path) as tmp, tmp.open("wb") as out, response["Body"] as body:
            for chunk in iter(lambda: body.read(1 << 20), b""):
                out.write(chunk)
        self._remember(path, response.get("ETag"))
        return True

    def publish(
        self,
        path: Path,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
        source: Path | None = None,
    ) -> None:
        """Upload ``path`` to its key (whole: S3 replaces a key atomically). ``if_absent``:
        only if no object is there; ``if_match``: only if the object is still that version
        (an ETag; a key deleted since fails too); :class:`ConflictError` if the condition
        fails. ``source``: the bytes to upload, when they are not yet at ``path`` (a file the
        caller moves there once the home took it)."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.key(path)
        condition: dict[str, str] = {}
        lost = {"412", "PreconditionFailed", "ConditionalRequestConflict"}
        if if_absent:
            condition["IfNoneMatch"] = "*"
        elif if_match is not None:
            condition["IfMatch"] = if_match
            lost |= {"404", "NoSuchKey", "NotFound"}
        data = (source or path).read_bytes()
        try:
            response = self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **condition)
        except ClientError as error:
            if error_code(error) in lost:
                raise ConflictError(
                    f"s3://{self.bucket}/{key} was written by another writer meanwhile",
                    code="PreconditionFailed",
                ) from None
            raise self._failed("put", key, error) from error
        except BotoCoreError as error:
            raise self._failed("put", key, error) from error
        self._remember(path, response.get("ETag") or f'"{hashlib.md5(data).hexdigest()}"')

    def etag(self, path: Path) -> str | None:
        """The ETag of the copy fetched or published last (``None``: none known)."""
        return self._etag(path) if path.exists() else None

    def listing(self, folder: Path) -> dict[Path, int]:
        """The files under ``folder``'s key prefix, as paths of the cache folder, and sizes."""
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = self.key(folder).rstrip("/") + "/"
        found: dict[Path, int] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    relative = item["Key"][len(self.prefix) :]
                    found[self.cache / relative] = int(item["Size"])
        except (ClientError, BotoCoreError) as error:
            raise self._failed("list", prefix, error) from error
        return found

    def delete(self, paths: list[Path]) -> None:
        """Remove these files' keys (a missing key is no error)."""
        from botocore.exceptions import BotoCoreError, ClientError

        for start in range(0, len(paths), 1000):
            chunk = [{"Key": self.key(p)} for p in paths[start : start + 1000]]
            try:
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True}
                )
            except (ClientError, BotoCoreError) as error:
                raise self._failed("delete", chunk[0]["Key"], error) from error

    def is_empty(self) -> bool:
        """Whether nothing at all is stored under the library's prefix."""
        response = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        return not response.get("KeyCount")

    def _failed(self, op: str, key: str, error: Exception) -> ObjectStoreError:
        return ObjectStoreError(
            f"S3 {op} of s3://{self.bucket}/{key} failed: {error_code(error)}: {error}",
            code=error_code(error),
        )


def _holds(path: Path, etag: str) -> bool:
    """Whether the file's bytes are still those its ETag names (when the ETag is an MD5: a
    single-part upload's; any other ETag is taken at its word)."""
    claimed = etag.strip('"').lower()
    if len(claimed) != 32 or any(c not in "0123456789abcdef" for c in claimed):
        return True
    return file_md5(path) == claimed


def walk(folder: Path) -> Iterator[Path]:
    """Every file under ``folder``, skipping files being written (hidden names)."""
    if not folder.is_dir():
        return
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name
