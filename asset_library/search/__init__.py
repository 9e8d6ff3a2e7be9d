"""Exact near-duplicate search over 64-bit perceptual hashes.

``codec``: hex <-> uint64, the one conversion for the whole project. ``cost``: how many bands a
segment has and how far each is probed (the pigeonhole argument that makes recall exact).
``segment``: one shard's arrays, built, queried and stored. ``selfjoin``: all pairs within a
radius in one segment. ``index``: :class:`HammingIndex`, named segments queried together.
``groups``: near-duplicate clusters from pairs. ``thresholds``: the search's defaults.

The names below load on first use, so ``thresholds`` stays light enough for the command line's
help (no numpy).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asset_library.search.codec import hex_to_uint64, uint64_to_hex
    from asset_library.search.groups import connected_groups
    from asset_library.search.index import HammingIndex

#: Each public name and the module it lives in.
_HOMES = {
    "HammingIndex": "asset_library.search.index",
    "connected_groups": "asset_library.search.groups",
    "hex_to_uint64": "asset_library.search.codec",
    "uint64_to_hex": "asset_library.search.codec",
}

__all__ = ["HammingIndex", "connected_groups", "hex_to_uint64", "uint64_to_hex"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
