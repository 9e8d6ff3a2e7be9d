"""Write-once, content-addressed object storage for image bytes.

Images are stored under a key derived from their MD5 (`object_key`), so a key names exactly one
body: a store never needs to overwrite, and "the key exists" means "the image is stored". Two
back ends share one interface:

- `LocalObjectStore`, a folder: the embedded default, no server needed;
- `S3ObjectStore`, any S3 API (AWS, SeaweedFS, MinIO...) through a boto3 client.

Both verify integrity on write (the local store hashes the body; S3 sends `Content-MD5`, so the
server refuses a corrupted body with `BadDigest`) and both are safe against concurrent writers of
the same key (a hard link on disk, `If-None-Match: *` on S3): exactly one writer wins.

This module deliberately imports no Dagster, so workers and scripts can use it on their own.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from asset_library.ids import is_md5

__all__ = [
    "DigestMismatchError",
    "LocalObjectStore",
    "ObjectNotFoundError",
    "ObjectStore",
    "ObjectStoreError",
    "S3ObjectStore",
    "check_key",
    "object_key",
    "open_store",
    "parse_s3_uri",
    "s3_client_from_env",
]

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
DEFAULT_REGION = "us-east-1"


class ObjectStoreError(Exception):
    """A store operation failed for a reason other than "already exists" or "not found".

    `code` is the S3 error code (or HTTP status) when there is one, so callers can branch on it;
    the message always names the object (bucket and key, or path).
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class DigestMismatchError(ObjectStoreError, ValueError):
    """The body does not match its claimed MD5: nothing was stored.

    A `ValueError` too, so callers can treat the local check and the server's `BadDigest` alike.
    """


class ObjectNotFoundError(ObjectStoreError, KeyError):
    """`get` of a key that is not in the store (a `KeyError`, as for a mapping)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def object_key(md5: str) -> str:
    """The storage key of an image: `images/<md5[0:2]>/<md5[2:4]>/<md5>`.

    Two levels of fan-out keep local folders small and spread S3 prefixes.
    """
    if not isinstance(md5, str) or not _is_lower_md5(md5):
        raise ValueError(f"not an MD5 (32 lower-case hex characters): {md5!r}")
    return f"images/{md5[0:2]}/{md5[2:4]}/{md5}"


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


def _is_lower_md5(text: object) -> bool:
    return is_md5(text) and text == text.lower()  # type: ignore[union-attr]


def _check_md5(md5_hex: str, key: str) -> None:
    if not isinstance(md5_hex, str) or not _is_lower_md5(md5_hex):
        raise ValueError(f"bad md5_hex {md5_hex!r} for key {key!r}")


class ObjectStore(abc.ABC):
    """Write-once storage of immutable blobs by key."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes, md5_hex: str) -> bool:
        """Store `data` under `key` unless the key exists; True if this call wrote it.

        `md5_hex` is the expected MD5 of `data`; a mismatch raises `DigestMismatchError` (a
        `ValueError`) and stores nothing. An existing object is never replaced.
        """

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    @abc.abstractmethod
    def head_size(self, key: str) -> int | None:
        """The stored object's size in bytes, or None if there is none."""

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


class LocalObjectStore(ObjectStore):
    """Objects as files under a folder: the default when no object storage is configured.

    A write goes to a temporary file in the target folder, then is published with `os.link`,
    which fails if the name exists: readers never see a partial file and the first writer wins.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put_if_absent(self, key: str, data: bytes, md5_hex: str) -> bool:
        _check_md5(md5_hex, key)
        path = self._path(key)
        actual = hashlib.md5(data).hexdigest()
        if actual != md5_hex:
            raise DigestMismatchError(
                f"md5 mismatch for key {key!r}: expected {md5_hex}, body has {actual}",
                code="BadDigest",
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def head_size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

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


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    error = response.get("Error") or {}
    code = error.get("Code")
    if code:
        return str(code)
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return str(status) if status else type(exc).__name__


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None) or {}
    return (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")


_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


class S3ObjectStore(ObjectStore):
    """Objects in an S3 bucket, optionally under a key prefix.

    Thread-safe: boto3 clients are, and the store keeps no other state. Give the client a
    connection pool at least as large as the number of threads using it.
    """

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        if not bucket:
            raise ValueError("S3ObjectStore needs a bucket name")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _fail(self, op: str, full_key: str, exc: Exception) -> ObjectStoreError:
        code = _error_code(exc)
        return ObjectStoreError(
            f"S3 {op} of s3://{self.bucket}/{full_key} failed: {code}: {exc}", code=code
        )

    def put_if_absent(self, key: str, data: bytes, md5_hex: str) -> bool:
        """Upload with `Content-MD5` (the server checks the body) and `If-None-Match: *`.

        A 412 means another writer got there first: the key exists, so return False. If a
        write succeeds but its response is lost and botocore retries, the retry sees 412 too:
        False then means "stored, maybe by this call".
        """
        from botocore.exceptions import BotoCoreError, ClientError

        _check_md5(md5_hex, key)
        full = self._full(key)
        content_md5 = base64.b64encode(bytes.fromhex(md5_hex)).decode("ascii")
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=data,
                ContentMD5=content_md5,
                IfNoneMatch="*",
                ContentType="application/octet-stream",
            )
        except ClientError as exc:
            code = _error_code(exc)
            if code == "PreconditionFailed" or _status(exc) == 412:
                return False
            if code in {"BadDigest", "InvalidDigest"}:
                raise DigestMismatchError(
                    f"S3 refused s3://{self.bucket}/{full}: {code} "
                    f"(body does not match md5 {md5_hex})",
                    code=code,
                ) from exc
            raise self._fail("put", full, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("put", full, exc) from exc
        return True

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(key)
        try:
            return self.client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return None
            raise self._fail("head", full, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("head", full, exc) from exc

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def head_size(self, key: str) -> int | None:
        head = self._head(key)
        return None if head is None else int(head["ContentLength"])

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            with response["Body"] as body:
                return body.read()
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                raise ObjectNotFoundError(
                    f"no object s3://{self.bucket}/{full}", code="NoSuchKey"
                ) from None
            raise self._fail("get", full, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("get", full, exc) from exc

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except (ClientError, BotoCoreError) as exc:
            if _error_code(exc) in _NOT_FOUND:
                return
            raise self._fail("delete", full, exc) from exc

    def iter_keys(self, prefix: str = "images/") -> Iterator[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        full_prefix = self.prefix + prefix
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", ()):
                    yield item["Key"][len(self.prefix) :]
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("list", full_prefix, exc) from exc

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def describe(self) -> str:
        endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        where = f" at {endpoint}" if endpoint else ""
        return f"S3 s3://{self.bucket}/{self.prefix}{where}"


def s3_client_from_env(
    endpoint_url: str | None = None,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    max_pool_connections: int = 32,
    max_attempts: int = 5,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
) -> Any:
    """A boto3 S3 client configured from arguments, else the environment.

    Reads `S3_ENDPOINT_URL` (or `AWS_ENDPOINT_URL`), `AWS_ACCESS_KEY_ID`,
    `AWS_SECRET_ACCESS_KEY` and `AWS_REGION`/`AWS_DEFAULT_REGION` (default us-east-1). Uses
    path-style addressing (self-hosted servers rarely have wildcard DNS), a pool big enough
    for a thread pool of uploaders, and standard-mode retries.
    """
    import boto3
    from botocore.config import Config

    env = os.environ
    endpoint_url = endpoint_url or env.get("S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL")
    access_key = access_key or env.get("AWS_ACCESS_KEY_ID")
    secret_key = secret_key or env.get("AWS_SECRET_ACCESS_KEY")
    region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    config = Config(
        s3={"addressing_style": "path"},
        max_pool_connections=max_pool_connections,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    # A private session: the default one is shared module state and not thread-safe to build.
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint_url or None,
        aws_access_key_id=access_key or None,
        aws_secret_access_key=secret_key or None,
        region_name=region,
        config=config,
    )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/key/or/prefix` into (bucket, "key/or/prefix"); the key may be empty."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"bad bucket name in S3 URI: {uri!r}")
    return bucket, key


def open_store(location: str | os.PathLike[str], client: Any = None) -> ObjectStore:
    """The store a location names: `s3://bucket/prefix` for S3, anything else a folder.

    Without `client`, an S3 location gets one from `s3_client_from_env()`.
    """
    text = os.fspath(location)
    if text.startswith("s3://"):
        bucket, prefix = parse_s3_uri(text)
        return S3ObjectStore(client or s3_client_from_env(), bucket, prefix)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return LocalObjectStore(text)
