"""The fingerprint pool: fingerprinting across decoder processes, streamed, in input order,
with bounded memory.

Decoding is CPU-bound, so the work is spread over processes (one per core by default). Items
are submitted in small chunks and at most a few chunks per worker are in flight, so a stream of
any length is consumed lazily and memory does not grow with it.

A worker process ignores SIGINT (Ctrl-C reaches the whole process group; the parent decides
when to stop and cancels what is queued), ends when its parent ends, and sends its fd 2 to a
private file around each decode: C libraries such as libtiff write their complaints there, which
would otherwise land in the terminal of whoever runs the ingest. A rejected image's message
keeps what they said.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

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


class NativeStderr:
    """This process's fd 2, redirected to a private file while C code runs.

    Per image it costs two ``dup2`` calls and an ``fstat`` (a few microseconds against
    milliseconds of decoding); the file is emptied after each image, so it stays small.
    """

    #: Most bytes of one image's messages that are kept; a hostile file can make libtiff
    #: repeat itself for megabytes.
    LIMIT = 4096

    def __init__(self) -> None:
        self._file: BinaryIO = tempfile.TemporaryFile()  # noqa: SIM115 (lives with the process)
        self._terminal = os.dup(2)

    def run(self, item: Item, mode: Mode, max_pixels: int) -> Fingerprint:
        """Fingerprint ``item`` with fd 2 captured; a rejection's message keeps what was said."""
        sys.stderr.flush()
        os.dup2(self._file.fileno(), 2)
        try:
            fp = fingerprint_item(item, mode, max_pixels)
        finally:
            sys.stderr.flush()
            os.dup2(self._terminal, 2)
        said = self._drain()
        if said and not fp.ok:
            fp = replace(fp, message=f"{fp.message}; the decoder reported: {said}")
        return fp

    def _drain(self) -> str:
        fd = self._file.fileno()
        size = os.fstat(fd).st_size
        if not size:
            return ""
        raw = os.pread(fd, min(size, self.LIMIT), 0)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)  # fd 2 shares this offset: the next write starts at 0
        lines = [line.strip() for line in raw.decode("utf-8", "replace").splitlines()]
        return "; ".join(dict.fromkeys(line for line in lines if line))[:500]


_native_stderr: NativeStderr | None = None


def _init_worker() -> None:
    """Set up a worker process: Ctrl-C is the parent's to handle, fd 2 is captured, and the
    worker ends with its parent (a pool's worker otherwise waits for work forever once its
    parent is killed with SIGKILL)."""
    global _native_stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _native_stderr = NativeStderr()
    threading.Thread(target=_exit_with_parent, name="exit-with-parent", daemon=True).start()


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()  # returns once the parent process has ended, however it ended
        os._exit(1)


def _fingerprint_chunk(items: list[Item], mode: Mode, max_pixels: int) -> list[Fingerprint]:
    if _native_stderr is None:  # in the calling process (workers=0): its fd 2 is not ours
        return [fingerprint_item(item, mode, max_pixels) for item in items]
    return [_native_stderr.run(item, mode, max_pixels) for item in items]


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
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
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
