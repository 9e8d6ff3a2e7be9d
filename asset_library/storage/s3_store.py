"""The object store on any S3 API (AWS, SeaweedFS, MinIO...) through a boto3 client, and the
client and `s3://` URIs it is opened from.

The S3 settings themselves are read in :mod:`asset_library.s3`, the one reader of them; boto3
and botocore are imported only when an S3 store is used.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from typing import Any

from asset_library.ids import is_md5_key
from asset_library.s3 import SCHEME, is_s3, s3_settings
from asset_library.storage.base import ObjectStat, ObjectStore, PutResult, check_key, check_md5
from asset_library.storage.errors import (
    DigestMismatchError,
    ObjectNotFoundError,
    ObjectStoreError,
)

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def error_code(exc: Exception) -> str:
    """An S3 error's code (``NoSuchKey``, ``412``...), else its HTTP status, else its type."""
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
        code = error_code(exc)
        return ObjectStoreError(
            f"S3 {op} of s3://{self.bucket}/{full_key} failed: {code}: {exc}", code=code
        )

    def put_if_absent(
        self, key: str, data: bytes, md5_hex: str, *, suspect: bool = False
    ) -> PutResult:
        """Upload with `Content-MD5` (the server checks the body) and `If-None-Match: *`.

        A 412 means the key exists: a HEAD then tells whether the object is intact (its size,
        and its ETag when that is a single-part MD5; an ETag that disagrees is confirmed by a
        GET before anything is replaced). A damaged object is replaced by a PUT with
        `If-Match` on its ETag, so only the damaged version is overwritten. If a write succeeds
        but its response is lost and botocore retries, the retry sees 412 and an intact object:
        PRESENT then means "stored, maybe by this call".
        """
        check_md5(md5_hex, key)
        for _ in range(3):
            if self._put(key, data, md5_hex, IfNoneMatch="*"):
                return PutResult.STORED
            head = self._head(key)
            if head is None:
                continue  # deleted since the 412: try to store it again
            if self._holds(key, _stat_of(head), md5_hex, len(data), suspect=suspect):
                return PutResult.PRESENT
            if self._put(key, data, md5_hex, IfMatch=head["ETag"]):
                return PutResult.REPAIRED
            # Another writer changed the object since the HEAD: look again.
        raise ObjectStoreError(
            f"S3 put of {self.uri(key)}: the object kept changing under concurrent writers",
            code="PreconditionFailed",
        )

    def _put(self, key: str, data: bytes, md5_hex: str, **condition: str) -> bool:
        """One conditional PUT; False if the condition failed (412)."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(key)
        content_md5 = base64.b64encode(bytes.fromhex(md5_hex)).decode("ascii")
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=data,
                ContentMD5=content_md5,
                ContentType="application/octet-stream",
                **condition,
            )
        except ClientError as exc:
            code = error_code(exc)
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

    def _holds(
        self, key: str, found: ObjectStat, md5_hex: str, size: int, *, suspect: bool = False
    ) -> bool:
        """Whether the object is the body with this MD5: size, then ETag (unless `suspect`),
        confirmed by a GET."""
        if found.size != size:
            return False
        if not suspect and (found.claimed_md5 is None or found.claimed_md5 == md5_hex):
            return True
        try:
            return hashlib.md5(self.get(key)).hexdigest() == md5_hex
        except ObjectNotFoundError:
            return False

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(key)
        try:
            return self.client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            if error_code(exc) in _NOT_FOUND:
                return None
            raise self._fail("head", full, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("head", full, exc) from exc

    def stat(self, key: str) -> ObjectStat | None:
        head = self._head(key)
        return None if head is None else _stat_of(head)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            with response["Body"] as body:
                return body.read()
        except ClientError as exc:
            if error_code(exc) in _NOT_FOUND:
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
            if error_code(exc) in _NOT_FOUND:
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


def _stat_of(head: dict[str, Any]) -> ObjectStat:
    """Size and, when the ETag is one, the MD5 from a HEAD response.

    A multipart ETag ends in `-<parts>`; SSE-KMS and SSE-C ETags are not the MD5 of the body.
    """
    etag = str(head.get("ETag") or "").strip('"').lower()
    encrypted = head.get("ServerSideEncryption") == "aws:kms" or head.get("SSECustomerAlgorithm")
    claimed = etag if is_md5_key(etag) and not encrypted else None
    return ObjectStat(int(head["ContentLength"]), claimed)


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
    """A boto3 S3 client configured from arguments, else the environment
    (:func:`asset_library.s3.s3_settings`). Uses path-style addressing (self-hosted servers
    rarely have wildcard DNS), a pool big enough for a thread pool of uploaders, and
    standard-mode retries.
    """
    import boto3
    from botocore.config import Config

    settings = s3_settings()
    endpoint_url = endpoint_url or settings.endpoint_url
    access_key = access_key or settings.access_key
    secret_key = secret_key or settings.secret_key
    region = region or settings.region
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
    if not isinstance(uri, str) or not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(SCHEME) :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"bad bucket name in S3 URI: {uri!r}")
    return bucket, key
