"""How a running ingest shows itself in a terminal: finished lines, and the shards under way.

On a terminal the shards under way are redrawn in place, one line each, below the finished
lines. Elsewhere (a log, a pipe) a running shard gets a line at each tenth of its images, and
one a minute in between, so a log stays readable and a long shard still shows it is alive.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from asset_library.runs.orchestrate import RunningShard

#: ANSI: cursor up one line, and erase the line.
_UP, _ERASE = "\x1b[1A", "\x1b[2K"


class ProgressView:
    """Print an ingest's lines and its running shards on ``out``."""

    def __init__(self, out: TextIO = sys.stdout, *, tty: bool | None = None, every: float = 60.0):
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.every = every
        self._drawn = 0  # live lines on screen (terminal)
        self._said: dict[tuple[str, int], tuple[float, int]] = {}  # when, which tenth

    def line(self, text: str) -> None:
        """A finished line: it stays."""
        self._erase()
        print(text, file=self.out, flush=True)

    def running(self, shards: list[RunningShard]) -> None:
        if self.tty:
            self._erase()
            for state in shards:
                print(describe(state), file=self.out)
            self._drawn = len(shards)
            self.out.flush()
            return
        now = time.monotonic()
        for state in shards:
            key = (state.shard, state.attempt)
            tenth = _tenth(state)
            said_at, said_tenth = self._said.get(key, (state.started, 0))
            since = now - said_at
            if (tenth > said_tenth and since >= 1.0) or since >= self.every:
                print(describe(state), file=self.out, flush=True)
                self._said[key] = (now, tenth)

    def close(self) -> None:
        self._erase()

    def _erase(self) -> None:
        if self._drawn:
            self.out.write((_UP + _ERASE) * self._drawn)
            self.out.flush()
            self._drawn = 0


def describe(state: RunningShard) -> str:
    """``  shard  done/total images (pct)  rate  ETA``, or how long it has been starting."""
    attempt = f" (attempt {state.attempt})" if state.attempt > 1 else ""
    progress = state.progress
    if progress is None:
        waited = time.monotonic() - state.started
        return f"      {state.shard}{attempt}: starting ({waited:.0f} s)"
    percent = 100 * progress.done / progress.total if progress.total else 100.0
    eta = progress.eta_seconds
    then = (
        "finishing (checks, lake tables)"
        if progress.done >= progress.total
        else f"ETA {format_seconds(eta)}"
        if eta is not None
        else "ETA unknown"
    )
    return (
        f"      {state.shard}{attempt}: {progress.done:,}/{progress.total:,} images "
        f"({percent:.0f}%), {progress.images_per_second:.1f} img/s, {then}"
    )


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _tenth(state: RunningShard) -> int:
    progress = state.progress
    if progress is None or not progress.total:
        return 0
    return 10 * progress.done // progress.total
