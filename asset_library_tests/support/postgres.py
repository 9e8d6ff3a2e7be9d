"""A real PostgreSQL 15 for tests: the system's server binaries on a free loopback port.

`initdb` and `postgres` refuse to run as root, and CI runs the tests as root: the server then
runs as `nobody`, in a data folder that user owns. Password authentication (scram-sha-256) is
on, as in production, so the instance's credentials really travel through its `env:` fields.
The binaries come from the `postgresql-15` system package (`make install` adds it if missing).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from asset_library_tests.support.seaweedfs import free_ports

PG_BIN = Path(os.environ.get("ASSET_LIBRARY_PG_BIN", "/usr/lib/postgresql/15/bin"))
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
USER = "dagster"
DATABASE = "dagster"


def _run_as() -> dict[str, Any]:
    """Popen arguments that drop root to `nobody`; nothing for an ordinary user."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


class PostgresServer:
    """One `postgres` process with its data in a private temporary folder."""

    def __init__(self) -> None:
        for tool in ("initdb", "postgres"):
            if not (PG_BIN / tool).is_file():
                raise RuntimeError(
                    f"PostgreSQL 15 not found: no {PG_BIN / tool} (install postgresql-15, "
                    "e.g. `make install`, or point ASSET_LIBRARY_PG_BIN at its bin folder)"
                )
        self.base_dir = Path(tempfile.mkdtemp(prefix="asset-library-pg-"))
        self.data_dir = self.base_dir / "data"
        self.password = secrets.token_urlsafe(18)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.base_dir / "postgres.log"

    def env(self) -> dict[str, str]:
        """The variables the deploy/ profiles read their credentials from."""
        return {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USER": USER,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": DATABASE,
        }

    def new_database(self, name: str) -> str:
        """A fresh database (dropped first if present); its URL, without the password (the
        store's setting takes it from ``ASSET_LIBRARY_SERVING_STORE_PASSWORD``)."""
        with contextlib.closing(self.connect("postgres")) as connection:
            connection.autocommit = True
            cursor = connection.cursor()
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
            cursor.execute(f"CREATE DATABASE {name}")
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def connect(self, database: str = DATABASE) -> Any:
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1", port=self.port, user=USER, password=self.password, dbname=database
        )

    def start(self) -> PostgresServer:
        atexit.register(self.stop)  # a server must not outlive the tests
        drop = _run_as()
        if drop:
            os.chown(self.base_dir, drop["user"], drop["group"])
        password_file = self.base_dir / "password"
        password_file.write_text(self.password)
        if drop:
            os.chown(password_file, drop["user"], drop["group"])
        password_file.chmod(0o600)
        subprocess.run(
            [
                str(PG_BIN / "initdb"),
                f"--pgdata={self.data_dir}",
                f"--username={USER}",
                f"--pwfile={password_file}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            **drop,
        )
        password_file.unlink()
        [self.port] = free_ports(1)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(PG_BIN / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self.data_dir}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=200",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **drop,
            )
        self._wait_ready()
        with contextlib.closing(self.connect("postgres")) as connection:
            connection.autocommit = True
            connection.cursor().execute(f"CREATE DATABASE {DATABASE}")
        return self

    def _wait_ready(self) -> None:
        import psycopg2

        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log_path.read_text()[-2000:]}")
            try:
                self.connect("postgres").close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres not ready after {READY_TIMEOUT_S:.0f} s on port {self.port}: "
                        f"{self.log_path.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.2)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL if it hangs; then the data folder goes."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.base_dir, ignore_errors=True)
