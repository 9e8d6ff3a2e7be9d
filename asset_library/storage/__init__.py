"""Write-once, content-addressed object storage for image bytes.

Images are stored under a key derived from their MD5 (`object_key`), so a key names exactly one
body: a store never overwrites an intact object, and "the key holds its body" means "the image is
stored". An object that was damaged after it was written (truncated, overwritten) no longer
matches its key: `put_if_absent` of the right bytes replaces it, and `verify_objects` finds it.
Two back ends share one interface:

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
import enum
import hashlib
import os
import random
import re
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asset_library.ids import is_md5_key
from asset_library.layout import LibraryLayout, rename_durably, temp_path_for
from asset_library.s3 import SCHEME, is_s3, s3_settings

__all__ = [
    "DamageRecord",
    "DamagedObjectError",
    "DigestMismatchError",
    "LocalObjectStore",
    "ObjectNotFoundError",
    "ObjectProblem",
    "ObjectStat",
    "ObjectStore",
    "ObjectStoreError",
    "PutResult",
    "S3ObjectStore",
    "StoreMismatchError",
    "bind_store",
    "check_key",
    "object_key",
    "open_store",
    "parse_s3_uri",
    "read_image",
    "s3_client_from_env",
    "store_location",
    "verify_objects",
]

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


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


class DamagedObjectError(ObjectStoreError):
    """A stored object whose bytes are not the image its key names: never served as it."""

    def __init__(self, message: str, *, md5: str) -> None:
        super().__init__(message, code="Damaged")
        self.md5 = md5


class ObjectNotFoundError(ObjectStoreError, KeyError):
    """`get` of a key that is not in the store (a `KeyError`, as for a mapping)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class StoreMismatchError(ObjectStoreError, ValueError):
    """A run is configured for another object store than the one its library records."""


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


def _check_md5(md5_hex: str, key: str) -> None:
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
        _check_md5(md5_hex, key)
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
        _check_md5(md5_hex, key)
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
            if _error_code(exc) in _NOT_FOUND:
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


def _stat_of(head: dict[str, Any]) -> ObjectStat:
    """Size and, when the ETag is one, the MD5 from a HEAD response.

    A multipart ETag ends in `-<parts>`; SSE-KMS and SSE-C ETags are not the MD5 of the body.
    """
    etag = str(head.get("ETag") or "").strip('"').lower()
    encrypted = head.get("ServerSideEncryption") == "aws:kms" or head.get("SSECustomerAlgorithm")
    claimed = etag if is_md5_key(etag) and not encrypted else None
    return ObjectStat(int(head["ContentLength"]), claimed)


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


def store_location(location: str | os.PathLike[str]) -> str:
    """A store location in one spelling, so two can be compared: `s3://bucket/prefix` (no
    trailing slash) or an absolute folder path."""
    text = os.fspath(location)
    if is_s3(text):
        bucket, prefix = parse_s3_uri(text)
        prefix = prefix.strip("/")
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    if text.startswith("file://"):
        text = text[len("file://") :]
    return str(Path(text).expanduser().resolve())


def bind_store(layout: LibraryLayout, location: str | os.PathLike[str], *, record: bool) -> str:
    """Check that `location` is the object store the library records; with `record`, record it
    if the library has none yet. Returns the location in the form `store_location` gives.

    Raises `StoreMismatchError` before anything is written when the library records another
    store: a typo in a bucket name must not scatter a library's bytes over two stores.
    """
    wanted = store_location(location)
    recorded = layout.recorded_objects()
    if recorded is None:
        if record:
            layout.record_objects(wanted)
        return wanted
    recorded = store_location(recorded)
    if recorded != wanted:
        raise StoreMismatchError(
            f"library {layout.root} keeps its images in {recorded}, but this run is configured "
            f"for {wanted} (ASSET_LIBRARY_OBJECTS); nothing was stored. Unset "
            "ASSET_LIBRARY_OBJECTS to use the library's store, or, to move the library on "
            f'purpose, copy its objects to the new store and set "objects" in '
            f"{layout.settings_path} to it.",
            code="StoreMismatch",
        )
    return wanted


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


def open_store(location: str | os.PathLike[str], client: Any = None) -> ObjectStore:
    """The store a location names: `s3://bucket/prefix` for S3, anything else a folder.

    Without `client`, an S3 location gets one from `s3_client_from_env()`.
    """
    text = os.fspath(location)
    if is_s3(text):
        bucket, prefix = parse_s3_uri(text)
        return S3ObjectStore(client or s3_client_from_env(), bucket, prefix)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return LocalObjectStore(text)
