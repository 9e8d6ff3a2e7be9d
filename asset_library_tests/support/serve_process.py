"""``asset-library serve`` as a real process: a replica of the service, on loopback.

Each replica runs with a machine of its own, as far as one host allows: its own HOME, working
folder and cache folder (all fresh and empty), so an answer that needed a stray local file
would fail. It is stopped by its own process id.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServeReplica:
    """One ``asset-library serve`` process; ``machine`` is a fresh folder that holds its HOME,
    working folder and cache folder."""

    def __init__(self, library: str, machine: Path, env: Mapping[str, str] | None = None) -> None:
        self.library = library
        self.machine = machine
        self.port = free_port()
        self.home, self.work, self.cache = (machine / n for n in ("home", "work", "cache"))
        for folder in (self.home, self.work, self.cache):
            folder.mkdir(parents=True, exist_ok=True)
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith(("ASSET_LIBRARY_", "DAGSTER_"))
        }
        self.env = {
            **inherited,
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.cache),
            "ASSET_LIBRARY_CACHE": str(self.cache),
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.log = machine / "serve.log"

    def start(self) -> ServeReplica:
        command = [
            sys.executable, "-m", "asset_library.cli", "serve", "--library", self.library,
            "--port", str(self.port), "--cache-dir", str(self.cache / "thumbnails"),
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.work, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}: {self.tail()}")
            try:
                if self.get("/stats")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"serve not ready within {READY_TIMEOUT_S:.0f} s: {self.tail()}")

    def get(self, path: str) -> tuple[int, Any]:
        """(status, JSON body or None) of ``GET path``."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        kind = response.getheader("content-type") or ""
        return response.status, json.loads(body) if kind.startswith("application/json") else None

    def tail(self, size: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else "(no log)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`: this process only, by its id."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def __enter__(self) -> ServeReplica:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
