"""asset-library: an image asset library on Dagster.

``from asset_library import Library`` opens a library for lookups, queries and search. The
import is lazy so that worker processes, which only fingerprint, stay light to start.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asset_library.library import Library

__all__ = ["Library"]


def __getattr__(name: str) -> Any:
    if name == "Library":
        from asset_library.library import Library

        return Library
    raise AttributeError(f"module 'asset_library' has no attribute {name!r}")
