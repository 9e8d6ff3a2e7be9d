"""A running shard's progress, as a small file the shard rewrites and anyone may read.

The shard's run may be in another process (or under a daemon), so progress travels through the
library's folder: an atomic JSON file per shard, cheap to write every few images and never seen
half-written.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from asset_library.layout import atomic_write_text


@dataclass(frozen=True)
class ShardProgress:
    """Images done of the shard's total, and the rate so far."""

    done: int
    total: int
    images_per_second: float
    #: When it was written (seconds since the epoch).
    at: float = 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far; None before there is a rate."""
        if self.images_per_second <= 0:
            return None
        return max(0, self.total - self.done) / self.images_per_second


def write_progress(path: Path, done: int, total: int, images_per_second: float) -> None:
    progress = ShardProgress(done, total, round(images_per_second, 2), round(time.time(), 3))
    atomic_write_text(path, json.dumps(asdict(progress)))


def read_progress(path: Path) -> ShardProgress | None:
    """The last progress written, or None when there is none (not started, or cleared)."""
    try:
        return ShardProgress(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
