"""What a running service is bound to: its library, its cache, its limits and its token."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from asset_library.layout import SETTINGS_FILE, LibraryLayout, cache_home
from asset_library.serve.uploads import DEFAULT_PIXEL_BUDGET

#: The bearer token every request must carry; required to listen beyond loopback.
TOKEN_ENV = "ASSET_LIBRARY_TOKEN"
#: The largest request body /similar accepts, in MiB (the multipart envelope included).
MAX_UPLOAD_ENV = "ASSET_LIBRARY_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 20.0


class ServeRefused(ValueError):
    """The service would be unsafe or unable to run as asked; the message says why."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def default_cache_dir(library: str | Path, environ: Mapping[str, str] = os.environ) -> Path:
    """A per-user cache folder of one library (a folder or an ``s3://`` home): in this
    machine's cache folder (:func:`cache_home`), ``<name>-<hash>``."""
    digest = hashlib.sha256(str(library).encode()).hexdigest()[:12]
    name = str(library).rstrip("/").rsplit("/", 1)[-1]
    return cache_home(environ) / f"{name}-{digest}"


@dataclass(frozen=True)
class ServeSettings:
    """One service's settings. The cache (thumbnails) never lives inside the library, which
    the service only reads."""

    #: The library's home: its folder, or ``s3://bucket/prefix``.
    library: str
    cache_dir: Path
    token: str | None = None
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2**20)
    #: Decodes at once (uploads, searches by md5 with ``transforms``, thumbnails), within
    #: ``decode_pixels`` pixels together; more wait up to ``upload_wait_s``, then get a 503.
    upload_workers: int = 2
    upload_wait_s: float = 10.0
    decode_pixels: int = DEFAULT_PIXEL_BUDGET
    #: Library handles (each its own DuckDB connection) shared by the requests.
    readers: int = 4
    thumb_size: int = 256

    @classmethod
    def resolve(
        cls,
        library: str | os.PathLike[str] | None,
        *,
        host: str = "127.0.0.1",
        cache_dir: str | os.PathLike[str] | None = None,
        max_upload_mb: float | None = None,
        upload_workers: int = 2,
        decode_wait_s: float = 10.0,
        environ: Mapping[str, str] = os.environ,
    ) -> ServeSettings:
        """Settings from the command line and the environment; :class:`ServeRefused` when the
        host is not loopback and no token is set, or the cache would sit inside the library."""
        layout = LibraryLayout.at(library)
        if not layout.fetch(layout.settings_path):
            raise ServeRefused(f"no asset library at {layout.location} (no {SETTINGS_FILE})")
        root = layout.root
        token = environ.get(TOKEN_ENV) or None
        if not is_loopback(host) and token is None:
            raise ServeRefused(
                f"refusing to listen on {host}: beyond loopback every request must carry a "
                f"token; set {TOKEN_ENV} (clients send 'Authorization: Bearer <token>')"
            )
        cache = (
            Path(cache_dir).expanduser().resolve()
            if cache_dir
            else default_cache_dir(layout.location, environ)
        )
        if cache.is_relative_to(root):
            raise ServeRefused(f"the cache folder {cache} is inside the library {root}")
        if max_upload_mb is None:
            text = environ.get(MAX_UPLOAD_ENV) or str(DEFAULT_MAX_UPLOAD_MB)
            try:
                max_upload_mb = float(text)
            except ValueError:
                raise ServeRefused(f"{MAX_UPLOAD_ENV}={text!r} is not a number of MiB") from None
        if not max_upload_mb > 0:
            raise ServeRefused(f"the upload limit must be positive, not {max_upload_mb} MiB")
        if upload_workers < 1:
            raise ServeRefused(f"upload workers must be at least 1, not {upload_workers}")
        if not decode_wait_s > 0:
            raise ServeRefused(f"the decode wait must be positive, not {decode_wait_s} s")
        return cls(
            library=layout.location,
            cache_dir=cache,
            token=token,
            max_upload_bytes=int(max_upload_mb * 2**20),
            upload_workers=upload_workers,
            upload_wait_s=decode_wait_s,
        )
