"""The errors every object store raises, so callers branch on one set whatever the back end."""

from __future__ import annotations


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
