"""Process identity and stop signals, on real processes and real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asset_library.runs.processes import (
    process_is_gone,
    process_token,
    stop_signals_deferred,
)


def test_a_process_is_gone_once_it_has_ended_and_a_reused_pid_is_not_it():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        token = process_token(child.pid)
        assert not process_is_gone(token)
        host, pid, start = token.split("/")
        assert (int(pid), start.isdigit()) == (child.pid, True)
        # The same pid with another start time is a newer process that took the pid over.
        assert process_is_gone(f"{host}/{pid}/{int(start) + 1}")
        # Killed and not yet waited for: a zombie, as a run worker is when the CLI that
        # started it was killed too and nothing reaps it. It has ended.
        child.kill()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert process_is_gone(token)
    finally:
        child.kill()
        child.wait()
    assert process_is_gone(token)
    assert not process_is_gone(process_token())
    assert not process_is_gone(f"another-host/{child.pid}/1")  # cannot be checked from here


def test_stop_signals_wait_for_the_end_of_a_deferred_block():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with stop_signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            finished.append("the block ran to its end")
        finished.append("never reached")
    assert finished == ["the block ran to its end"]
