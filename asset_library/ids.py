"""One home for the library's identifiers: md5 keys, buckets, batch ids and shard keys.

Every name that reaches a path, a partition key or a SQL statement is checked here first, so a
bad one fails with a message naming it instead of writing outside the library or breaking a
Dagster backfill (commas split partition lists; ``..`` is range syntax and a path escape).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime

DEFAULT_BUCKETS = 256
MAX_BUCKETS = 65536

_MD5 = re.compile(r"[0-9a-fA-F]{32}")
#: Batch ids: letters, digits, ``_``, ``-`` and ``.``, starting with a letter or digit, no
#: ``..``; at most 100 characters, so a shard key stays a short, safe file name.
_BATCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
#: A batch id's stem keeps at most this much of its name; a changed name adds a digest.
_STEM_CHARS = 60
_NAME_DIGEST_CHARS = 8
_SHARD_SEPARATOR = "-s"
_SHARD = re.compile(r"(?P<batch>.+)-s(?P<number>[0-9]{5,})")


class InvalidIdError(ValueError):
    """An identifier that is not of its kind's form; the message names it and the rule."""


def is_md5(text: object) -> bool:
    """Whether ``text`` is 32 hexadecimal digits (either case)."""
    return isinstance(text, str) and _MD5.fullmatch(text) is not None


def is_md5_key(text: object) -> bool:
    """Whether ``text`` is an md5 key as the library stores it: 32 lower-case hexadecimal
    digits (what :func:`check_md5` returns). Storage refuses any other spelling, so one image
    never has two object names."""
    return is_md5(text) and str(text) == str(text).lower()


def check_md5(text: object) -> str:
    """An md5 key, lower-cased; :class:`InvalidIdError` if it is not 32 hexadecimal digits."""
    if not is_md5(text):
        raise InvalidIdError(f"not an md5 key: {text!r} (expected 32 hexadecimal digits)")
    return str(text).lower()


def check_buckets(n_buckets: int) -> int:
    """A bucket count: a power of two from 1 to 65536."""
    if (
        not isinstance(n_buckets, int)
        or n_buckets < 1
        or n_buckets & (n_buckets - 1)
        or n_buckets > MAX_BUCKETS
    ):
        raise InvalidIdError(
            f"n_buckets must be a power of two from 1 to {MAX_BUCKETS}, not {n_buckets!r}"
        )
    return n_buckets


def bucket_of(md5: str, n_buckets: int = DEFAULT_BUCKETS) -> int:
    """The bucket of a key: the top log2(n_buckets) bits of its md5."""
    bits = n_buckets.bit_length() - 1
    return int(md5[:8], 16) >> (32 - bits) if bits else 0


def check_batch_id(batch: object) -> str:
    """A batch id safe as a partition key, a file name and a path segment."""
    if not isinstance(batch, str) or not _BATCH.fullmatch(batch) or ".." in batch:
        raise InvalidIdError(
            f"invalid batch id {batch!r}: use 1-100 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without '..' (no '/', ',' or spaces)"
        )
    return batch


def batch_id_for(name: str, when: datetime | None = None) -> str:
    """A readable batch id from a source name, different for different names.

    The stem is the name's last component when that is already a plain id (letters, digits and
    ``_``, at most 60 characters): ``photos_001``. Any other name is cleaned (manifest suffix
    dropped, other characters made ``_``, cut at 60) and carries the first 8 hex digits of its
    sha256, since cleaning maps many names to one: ``photos-2024``, ``photos 2024`` and
    ``photos_2024`` stay three batches, as do ``pics.csv`` and ``pics.jsonl``.

    Without ``when`` the id is the stem alone: the landing zone ingests a name once. With
    ``when`` it also carries the time and a short random suffix
    (``photos_20261123T204311_3fa9``), so two batches of same-named folders started in the same
    second still get different ids.
    """
    original = _last_component(name)
    stem = _cleaned(original)
    if stem != original:
        stem = f"{stem}_{hashlib.sha256(original.encode()).hexdigest()[:_NAME_DIGEST_CHARS]}"
    if when is None:
        return check_batch_id(stem)
    return check_batch_id(f"{stem}_{when.astimezone(UTC):%Y%m%dT%H%M%S}_{secrets.token_hex(2)}")


def legacy_batch_id(name: str) -> str:
    """The id versions before name digests gave a landed name (many names shared one): kept
    to find the landed batches they never ingested."""
    return check_batch_id(_cleaned(_last_component(name)))


def _last_component(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _cleaned(name: str) -> str:
    """``name`` without a manifest suffix, other characters made ``_``, cut to the stem size."""
    stem = re.sub(r"\.(csv|parquet|jsonl|ndjson)$", "", name)
    return re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_")[:_STEM_CHARS] or "batch"


def shard_key(batch: str, number: int) -> str:
    """The shard's partition key, e.g. ``photos_20261123T204311-s00003``."""
    return f"{batch}{_SHARD_SEPARATOR}{number:05d}"


def check_shard_key(shard: object) -> str:
    """A shard key: a valid batch id, ``-s`` and a number of at least five digits."""
    match = _SHARD.fullmatch(shard) if isinstance(shard, str) else None
    if match is None:
        raise InvalidIdError(f"invalid shard key {shard!r}: expected <batch>-s<00000>")
    check_batch_id(match["batch"])
    return str(shard)


def batch_of(shard: str) -> str:
    """The batch a shard key belongs to."""
    return shard.rsplit(_SHARD_SEPARATOR, 1)[0]
