"""S3: the one reader of S3 settings from the environment, and the one test for an S3 URI.

The object store's boto3 client, the Dagster S3 resource and the lake's delta-rs storage options
all take their endpoint, keys and region from here, so they cannot disagree on a default.
Light on purpose (no boto3): the command line and the library layout import it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

SCHEME = "s3://"

#: The region when the environment names none (the one dagster-aws and boto3 fall back to).
DEFAULT_REGION = "us-east-1"

#: Variables that hold credentials: read from the environment when a run starts, never written
#: into a run's config or anything the Dagster UI shows.
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` names an S3 location (``s3://bucket/prefix``) rather than a folder."""
    return os.fspath(uri).startswith(SCHEME)


@dataclass(frozen=True)
class S3Settings:
    """The S3 variables of one environment; ``None`` where a variable is unset or empty."""

    endpoint_url: str | None
    access_key: str | None
    secret_key: str | None
    session_token: str | None
    region: str

    @property
    def allow_http(self) -> bool:
        """A plain-HTTP endpoint (a self-hosted server on a private network) must be allowed
        explicitly by delta-rs."""
        return bool(self.endpoint_url and self.endpoint_url.startswith("http://"))

    @property
    def secrets(self) -> dict[str, str | None]:
        """Each credential variable (:data:`SECRET_VARIABLES`) and its value."""
        values = (self.access_key, self.secret_key, self.session_token)
        return dict(zip(SECRET_VARIABLES, values, strict=True))


def s3_settings(environ: Mapping[str, str] | None = None) -> S3Settings:
    """The settings from ``environ`` (default: this process's environment).

    ``S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL``), ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, and ``AWS_REGION`` (or
    ``AWS_DEFAULT_REGION``, else :data:`DEFAULT_REGION`): the variables of dagster-aws's
    ``S3Resource``.
    """
    env = os.environ if environ is None else environ
    return S3Settings(
        endpoint_url=env.get("S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL") or None,
        access_key=env.get("AWS_ACCESS_KEY_ID") or None,
        secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
        session_token=env.get("AWS_SESSION_TOKEN") or None,
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
    )


def delta_storage_options(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """delta-rs storage options for an S3 lake, from the same settings."""
    settings = s3_settings(environ)
    options: dict[str, str] = {}
    if settings.endpoint_url:
        options["AWS_ENDPOINT_URL"] = settings.endpoint_url
        if settings.allow_http:
            options["AWS_ALLOW_HTTP"] = "true"
    for name, value in settings.secrets.items():
        if value:
            options[name] = value
    options["AWS_REGION"] = settings.region
    # Commits use S3's conditional PUT (If-None-Match), which AWS and SeaweedFS honour: no lock
    # table and no unsafe rename are needed.
    options["conditional_put"] = "etag"
    return options
