"""Fingerprinting across worker processes, streamed, in input order, with bounded memory.

Decoding is CPU-bound, so the work is spread over processes (one per core by default). Items
are submitted in small chunks and at most a few chunks per worker are in flight, so a stream of
any length is consumed lazily and memory does not grow with it.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from asset_library.ingest.fingerprint import (
    DEFAULT_MAX_PIXELS,
    Fingerprint,
    Mode,
    fingerprint,
    rejected_unreadable,
)

Item = bytes | str | os.PathLike[str]


def default_workers() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def fingerprint_item(
    item: Item, mode: Mode = "fast", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Fingerprint:
    """Fingerprint bytes, or a file read here, so that bytes never cross a process boundary."""
    if isinstance(item, bytes | bytearray | memoryview):
        return fingerprint(bytes(item), mode=mode, max_pixels=max_pixels)
    try:
        data = Path(item).read_bytes()
    except OSError as error:
        return rejected_unreadable(f"{item}: {error.strerror or error}")
    return fingerprint(data, mode=mode, max_pixels=max_pixels)


def _fingerprint_chunk(items: list[Item], mode: Mode, max_pixels: int) -> list[Fingerprint]:
    return [fingerprint_item(item, mode, max_pixels) for item in items]


class FingerprintPool:
    """A pool of fingerprinting processes; ``workers=0`` fingerprints in the calling process."""

    def __init__(
        self,
        workers: int | None = None,
        *,
        mode: Mode = "fast",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.workers = default_workers() if workers is None else workers
        self.mode: Mode = mode
        self.max_pixels = max_pixels
        self._executor: ProcessPoolExecutor | None = None
        if self.workers > 0:
            # spawn, not fork: the caller may be a threaded Dagster or gRPC process.
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn")
            )

    def __enter__(self) -> FingerprintPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def submit_chunk(self, items: list[Item]) -> Future[list[Fingerprint]]:
        """Fingerprint a list of items in one worker; the future holds results in order."""
        if self._executor is None:
            future: Future[list[Fingerprint]] = Future()
            future.set_result(_fingerprint_chunk(items, self.mode, self.max_pixels))
            return future
        return self._executor.submit(_fingerprint_chunk, items, self.mode, self.max_pixels)

    def map(self, items: Iterable[Item], *, chunksize: int = 4) -> Iterator[Fingerprint]:
        """Fingerprints of ``items`` in input order, consuming the input lazily."""
        window = max(4, 8 * max(1, self.workers))  # keeps every worker fed
        pending: deque[Future[list[Fingerprint]]] = deque()
        chunk: list[Item] = []
        for item in items:
            chunk.append(item)
            if len(chunk) == chunksize:
                pending.append(self.submit_chunk(chunk))
                chunk = []
                while len(pending) >= window:
                    yield from pending.popleft().result()
        if chunk:
            pending.append(self.submit_chunk(chunk))
        while pending:
            yield from pending.popleft().result()


def fingerprint_many(
    items: Iterable[Item],
    *,
    workers: int | None = None,
    mode: Mode = "fast",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    chunksize: int = 4,
) -> Iterator[Fingerprint]:
    """Fingerprint byte blobs or file paths across worker processes; results in input order."""
    with FingerprintPool(workers, mode=mode, max_pixels=max_pixels) as pool:
        yield from pool.map(items, chunksize=chunksize)
