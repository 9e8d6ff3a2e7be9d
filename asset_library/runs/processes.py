"""The processes that run ingests: who they are, and how they take Ctrl-C.

A run started from a terminal has no daemon watching it: if its process is killed, only its
identity (host, pid and the pid's start time, so a reused pid is not mistaken for it) tells the
next command that the run is dead. A write of several files that must land together holds stop
signals until its end.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

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
    fields = _stat_fields(pid)
    if fields and fields[0] == b"Z":
        return True  # ended; a zombie whose parent (killed too) was never waited for
    now = fields[19].decode() if fields and len(fields) > 19 else None
    return bool(start and now and now != start)  # the pid was reused by a newer process


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None where unknown."""
    fields = _stat_fields(pid)
    return fields[19].decode() if fields and len(fields) > 19 else None


def _stat_fields(pid: int) -> list[bytes] | None:
    """``/proc/<pid>/stat`` from its state on (field 3), or None where there is none (not Linux,
    or the process is gone)."""
    try:
        stat = open(f"/proc/{pid}/stat", "rb").read()  # noqa: SIM115 (tiny, read at once)
    except OSError:
        return None
    # Counted after the command name, which is in parentheses and may hold spaces.
    return stat[stat.rfind(b")") + 2 :].split()


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
