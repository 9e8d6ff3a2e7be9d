"""Dagster's long-running processes for tests: `dagster-daemon run` and `dagster-webserver`.

Each starts in its own process group (its code server and run workers are children) and stops
with SIGTERM to the group, then SIGKILL, so nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sysconfig
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asset_library_tests.support.seaweedfs import free_ports

STOP_TIMEOUT_S = 20.0
# Loopback requests must never go through an HTTP proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def script(name: str) -> str:
    """A console script of this venv (dagster-daemon, dagster-webserver, dagster)."""
    path = Path(sysconfig.get_path("scripts")) / name
    if not path.is_file():
        raise RuntimeError(f"{name} not found in {path.parent}: run `uv sync`")
    return str(path)


class DagsterProcess:
    """One process group, its output in a log file the test can show on failure."""

    def __init__(self, args: list[str], *, env: Mapping[str, str], cwd: Path, log: Path) -> None:
        self.log_path = log
        with log.open("wb") as handle:
            self.process = subprocess.Popen(
                args,
                env=dict(env),
                cwd=cwd,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.process.args[0]} exited {self.process.returncode}: {self.tail()}"
            )

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL to what is left after STOP_TIMEOUT_S."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(STOP_TIMEOUT_S)
        # the group's children (code server, run workers) may outlive its leader
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def start_daemon(env: Mapping[str, str], cwd: Path, log: Path) -> DagsterProcess:
    return DagsterProcess(
        [script("dagster-daemon"), "run", "-w", "workspace.yaml"], env=env, cwd=cwd, log=log
    )


class Webserver(DagsterProcess):
    """`dagster-webserver` on a free loopback port, with a GraphQL client."""

    def __init__(self, env: Mapping[str, str], cwd: Path, log: Path) -> None:
        [self.port] = free_ports(1)
        args = [script("dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1"]
        super().__init__([*args, "-p", str(self.port)], env=env, cwd=cwd, log=log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                with _NO_PROXY.open(f"{self.url}/server_info", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"webserver not ready after {timeout:.0f} s: {self.tail()}")
            time.sleep(1)

    def graphql(self, query: str, variables: Mapping[str, Any]) -> dict[str, Any]:
        """POST one GraphQL request; its `data`, or an error with the server's messages."""
        body = json.dumps({"query": query, "variables": dict(variables)}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with _NO_PROXY.open(request, timeout=60) as response:
            answer = json.loads(response.read())
        if answer.get("errors"):
            raise RuntimeError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]
