"""The library over HTTP: a read-only JSON API and a gallery page (``asset-library serve``)."""

from asset_library.serve.app import create_app, serve
from asset_library.serve.settings import ServeRefused, ServeSettings

__all__ = ["ServeRefused", "ServeSettings", "create_app", "serve"]
