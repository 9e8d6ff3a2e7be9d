"""The processes that run ingests: who they are, and how they take Ctrl-C.

A run started from a terminal has no daemon watching it: if its process is killed, only its
identity (host, pid and the pid's start time, so a reused pid is not mistaken for it) tells the
next command that the run is dead. Ctrl-C is seen by a watch on the interpreter's signal wakeup
fd, which the interpreter writes for every signal whichever Python handler is installed: Dagster
takes SIGINT over during a run and may swallow it between steps.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

#: Signals that stop an ingest from a terminal: Ctrl-C, and SIGTERM, which Dagster maps to the
#: SIGINT handler while it runs.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def process_token(pid: int | None = None) -> str:
    """``host/pid/start`` of a process (this one by default): unique for as long as it lives."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}/{pid}/{_start_time(pid) or ''}"


def process_is_gone(token: str) -> bool:
    """True only when the process named by ``token`` is known to have ended.

    A process on another host cannot be checked from here, so it is never called gone.
    """
    host, _, rest = token.partition("/")
    pid_text, _, start = rest.partition("/")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by someone else
    now = _start_time(pid)
    return bool(start and now and now != start)  # the pid was reused by a newer process


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None where unknown."""
    try:
        stat = open(f"/proc/{pid}/stat", "rb").read()  # noqa: SIM115 (tiny, read at once)
    except OSError:
        return None
    # Field 22, counted after the command name, which is in parentheses and may hold spaces.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


class StopWatch:
    """Whether a stop signal arrived since the watch began, whoever handled it.

    Dagster's handler turns SIGINT in a step into a failed step and carries on with the next
    shard, or drops it when it lands between steps; the wakeup fd still records it.
    """

    def __init__(self) -> None:
        self._received: set[int] = set()
        self._read_fd: int | None = None
        self._write_fd: int | None = None
        self._previous_fd = -1

    def __enter__(self) -> StopWatch:
        if threading.current_thread() is threading.main_thread():
            self._read_fd, self._write_fd = os.pipe()
            os.set_blocking(self._read_fd, False)
            os.set_blocking(self._write_fd, False)
            self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._read_fd is not None and self._write_fd is not None:
            self.received()
            signal.set_wakeup_fd(self._previous_fd)
            os.close(self._read_fd)
            os.close(self._write_fd)
            self._read_fd = self._write_fd = None

    def received(self) -> int | None:
        """The first stop signal seen so far (its number), or None."""
        if self._read_fd is not None:
            while True:
                try:
                    data = os.read(self._read_fd, 512)
                except BlockingIOError:
                    break
                if not data:
                    break
                self._received.update(n for n in data if n in STOP_SIGNALS)
        return min(self._received) if self._received else None


@contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the usual handler.

    For a write of several files that must land together: an interrupt waits for the last one.
    Outside the main thread signals are not ours to handle, and the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(number: int, _frame: FrameType | None) -> None:
        held.append(number)

    previous = {number: signal.signal(number, hold) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            if handler is not None:  # None: installed outside Python, nothing to restore
                signal.signal(number, handler)
        if held:
            signal.raise_signal(held[0])
