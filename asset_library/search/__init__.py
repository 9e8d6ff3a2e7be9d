"""Exact near-duplicate search over 64-bit perceptual hashes.

``codec``: hex <-> uint64, the one conversion for the whole project. ``cost``: how many bands a
segment has and how far each is probed (the pigeonhole argument that makes recall exact).
``segment``: one shard's arrays, built, queried and stored. ``selfjoin``: all pairs within a
radius in one segment. ``index``: :class:`HammingIndex`, named segments queried together.
``groups``: near-duplicate clusters from pairs.
"""

from asset_library.search.codec import hex_to_uint64, uint64_to_hex
from asset_library.search.groups import connected_groups
from asset_library.search.index import HammingIndex

__all__ = ["HammingIndex", "connected_groups", "hex_to_uint64", "uint64_to_hex"]
