"""What a batch may read: regular files under its own root, or under roots the operator allows.

A batch's root is its folder, or the folder of its local manifest. Anything else on the machine
(an absolute path, a ``../`` path, a symlink resolving elsewhere, any local path in an S3
manifest) is refused unless ``ASSET_LIBRARY_ALLOWED_ROOTS`` names a folder holding it. The roots
are fixed when the batch is planned and recorded in its plan, and checked again when a shard
reads, before the file is opened: a refusal is a reject row (``outside_batch``) that records
nothing of the file. FIFOs, devices and files over the size limit are never read either
(``not_a_file``, ``too_large``), so a shard neither hangs nor fills its memory.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asset_library.s3 import is_s3
from asset_library.storage import parse_s3_uri

ALLOWED_ROOTS_ENV = "ASSET_LIBRARY_ALLOWED_ROOTS"
MAX_IMAGE_BYTES_ENV = "ASSET_LIBRARY_MAX_IMAGE_BYTES"
DEFAULT_MAX_IMAGE_BYTES = 512 * 1024 * 1024
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class SourceReadError(Exception):
    """The bytes behind a URI could not be read; ``reason`` is a short code for the reject row."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def allowed_roots_from(environ: Mapping[str, str]) -> list[str]:
    """The operator's extra roots: ``ASSET_LIBRARY_ALLOWED_ROOTS``, os.pathsep-separated."""
    text = environ.get(ALLOWED_ROOTS_ENV, "")
    return [resolved(part) for part in text.split(os.pathsep) if part.strip()]


def max_image_bytes_from(environ: Mapping[str, str]) -> int:
    """The largest image a shard reads: ``ASSET_LIBRARY_MAX_IMAGE_BYTES`` (default 512 MiB)."""
    text = environ.get(MAX_IMAGE_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_BYTES
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{MAX_IMAGE_BYTES_ENV}={text!r}: expected a positive number of bytes")
    return int(text)


def resolved(path: str | Path) -> str:
    """A local path made absolute with ``..`` and symlinks resolved: how sources are recorded."""
    return os.path.realpath(os.path.expanduser(path))


def batch_roots(source: str, operator_roots: Iterable[str] = ()) -> list[str]:
    """The folders a batch may read: its own root (none for S3 sources), then the operator's."""
    own: list[str] = []
    if not is_s3(source):
        path = resolved(source)
        own.append(path if os.path.isdir(path) else os.path.dirname(path))
    return list(dict.fromkeys([*own, *operator_roots]))


@dataclass(frozen=True)
class ReadPolicy:
    """Where a shard may read local files, and how large an image may be."""

    roots: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def allows(self, path: str) -> bool:
        """Whether an absolute, resolved path lies under one of the roots."""
        return any(
            path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots
        )

    def refusal(self, path: str) -> str | None:
        """Why a local path may not be read (``None`` if it may), without touching the file."""
        if not os.path.isabs(path):
            return f"{path}: a relative path with no batch folder to resolve it in"
        if os.path.realpath(path) != path:
            return f"{path}: the path changed (a link) since the batch was planned"
        if not self.allows(path):
            return (
                f"{path}: outside the batch's folder; allow it with {ALLOWED_ROOTS_ENV} "
                "if it is meant to be read"
            )
        return None

    def read_local(self, path: str) -> bytes:
        """A regular file's bytes, checked before it is opened."""
        refusal = self.refusal(path)
        if refusal:
            raise SourceReadError("outside_batch", refusal)
        try:
            _check_regular(path, os.lstat(path), self.max_bytes)
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise SourceReadError("missing", f"{path}: no such file") from None
        except NotADirectoryError:
            raise SourceReadError("missing", f"{path}: no such file (a parent is a file)") from None
        except PermissionError:
            raise SourceReadError("denied", f"{path}: permission denied") from None
        except OSError as error:
            raise SourceReadError("unreadable", f"{path}: {error.strerror or error}") from None
        with os.fdopen(fd, "rb") as handle:
            _check_regular(path, os.fstat(handle.fileno()), self.max_bytes)
            data = handle.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise SourceReadError("too_large", f"{path}: larger than {self.max_bytes:,} bytes")
        return data

    def read_s3(self, uri: str, s3_client: Any) -> bytes:
        """An object's bytes. Missing or forbidden objects are the data's fault; a store that is
        down is not, so connection errors propagate and fail the shard, to be re-run."""
        from botocore.exceptions import ClientError

        bucket, key = parse_s3_uri(uri)
        try:
            response = s3_client.get_object(Bucket=bucket, Key=key)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}:
                raise SourceReadError("missing", f"{uri}: no such object ({code})") from None
            if code in {"AccessDenied", "403"}:
                raise SourceReadError("denied", f"{uri}: access denied ({code})") from None
            raise
        body = response["Body"]
        try:
            if int(response.get("ContentLength") or 0) > self.max_bytes:
                raise SourceReadError("too_large", f"{uri}: larger than {self.max_bytes:,} bytes")
            data = body.read(self.max_bytes + 1)
        finally:
            body.close()
        if len(data) > self.max_bytes:
            raise SourceReadError("too_large", f"{uri}: larger than {self.max_bytes:,} bytes")
        return data


def _check_regular(path: str, status: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise SourceReadError("not_a_file", f"{path}: not a regular file (a FIFO, device or link)")
    if status.st_size > max_bytes:
        raise SourceReadError(
            "too_large", f"{path}: {status.st_size:,} bytes, more than {max_bytes:,}"
        )
