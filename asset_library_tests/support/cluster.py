"""A real Ray cluster for tests: a head and worker nodes on this machine, in a network
namespace that has nothing but loopback.

Ray binds every interface of its machine (and 0.0.0.0) whatever address it is given, so the
cluster, and the S3 server, Postgres and Dagster processes it talks to, run in a namespace of
their own: :func:`loopback_namespace` moves the calling thread into a new one, so every process
it starts is inside too, and moves it back on exit. Needs root (CI runs as root).

Each node is one ``ray start --block`` in its own session; it stops, or is killed to simulate a
lost machine, by its process tree (found from its pid), never by name: ``ray stop`` would end
every Ray process on the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from asset_library import Library
from asset_library.lake import SHARD_MARK, Lake
from asset_library.layout import LibraryLayout, NoLibraryError
from asset_library_tests.support.seaweedfs import free_ports

CLONE_NEWNET = 0x40000000
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
START_ATTEMPTS = 3
#: Ray's shared-memory object store per node: runs here pass nothing through it.
OBJECT_STORE_BYTES = 80 * 1024 * 1024


@contextlib.contextmanager
def loopback_namespace() -> Iterator[None]:
    """Run the calling thread, and every process it starts, in a new network namespace with
    only loopback up; back in the original namespace on exit."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise RuntimeError(
                f"cannot make a network namespace (unshare: {os.strerror(errno)}): "
                "the cluster test needs root"
            )
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
            yield
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:
                raise RuntimeError(f"setns back failed: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(original)


def interfaces() -> list[str]:
    """The network interfaces the calling thread sees (only ``lo`` inside the namespace)."""
    return sorted(name for _, name in socket.if_nameindex())


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc (parents before children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        found.append(current)
        queue += children.get(current, [])
    return found


def kill_tree(pid: int) -> list[int]:
    """Stop ``pid``'s whole tree at once (SIGSTOP first, so none of it can fork or react),
    then SIGKILL it: a machine that vanishes. Returns the pids killed."""
    tree = descendants(pid)
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGSTOP)
    tree = sorted(set(tree) | {p for member in tree for p in descendants(member)})
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    return tree


def ray_script() -> str:
    path = Path(sysconfig.get_path("scripts")) / "ray"
    if not path.is_file():
        raise RuntimeError(f"ray not found in {path.parent}: run `uv sync` (dev group)")
    return str(path)


class Machine:
    """What one machine has of its own: an empty HOME, working folder and cache folder
    (``ASSET_LIBRARY_CACHE``), under ``root``. Nothing else on disk is shared with another."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home, self.work, self.cache = (root / n for n in ("home", "work", "cache"))
        for folder in (self.home, self.work, self.cache):
            folder.mkdir(parents=True)

    def env(self) -> dict[str, str]:
        return {
            "HOME": str(self.home),
            "ASSET_LIBRARY_CACHE": str(self.cache),
            "PWD": str(self.work),
        }

    def files(self) -> list[str]:
        """What this machine holds now, relative to its root."""
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*"))


class NodeExited(RuntimeError):
    """A node's ``ray start`` ended."""


class RayNode:
    """One ``ray start --block`` process (the node's raylet and workers are its children)."""

    def __init__(self, args: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> None:
        self.log_path = log
        with log.open("wb") as handle:
            self.process = subprocess.Popen(
                [ray_script(), "start", "--block", *args],
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.node_id: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise NodeExited(f"ray node exited {self.process.returncode}: {self.tail()}")

    def kill(self) -> list[int]:
        """The node's machine lost: its whole process tree killed at once."""
        killed = kill_tree(self.pid)
        self.process.wait()
        return killed

    def stop(self) -> None:
        """SIGTERM to the tree, SIGKILL to what is left after STOP_TIMEOUT_S."""
        if self.process.poll() is not None:
            return
        tree = descendants(self.pid)
        for member in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(STOP_TIMEOUT_S)
        for member in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
        self.process.wait()


class RayCluster:
    """A head node and worker nodes, ``cpus`` each, on loopback ports of this namespace. Each
    node starts in its own working folder with its own variables on top of ``env`` (a machine
    of its own: its HOME, its cache folder)."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, *, cpus: int = 1) -> None:
        self.env = {
            **env,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Under `uv run`, Ray would start each job's worker with `uv run` in a zipped copy of
            # the working folder (minutes here); the nodes already run in the project's venv.
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            # How long `ray start` waits for its raylet to register (30 s by default).
            "RAY_raylet_start_wait_time_s": "120",
        }
        self.log_dir = log_dir
        self.cpus = cpus
        # Ray's sockets live under it: it must be short (AF_UNIX paths are at most 107 bytes).
        self.temp_dir = tempfile.mkdtemp(prefix="ray-")
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        #: Ports handed to the cluster's processes: a later pick must not repeat one (a node
        #: given the client server's port for its agent failed to start).
        self._ports = {self.gcs_port, self.dashboard_port, self.client_port}
        self.nodes: list[RayNode] = []

    @property
    def address(self) -> str:
        """The job server the run launcher submits to."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _common(self) -> list[str]:
        # Nodes on one machine must not share the agents' fixed default ports (a second node's
        # dashboard agent then runs without its HTTP server and its jobs never start).
        agent, agent_grpc, runtime_env, metrics = free_ports(4, avoid=self._ports)
        self._ports.update((agent, agent_grpc, runtime_env, metrics))
        return [
            "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--num-cpus={self.cpus}",
            "--num-gpus=0",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--disable-usage-stats",
        ]

    def start_head(self, machine: Machine) -> RayNode:
        args = [
            "--head",
            f"--port={self.gcs_port}",
            f"--ray-client-server-port={self.client_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.temp_dir}",
            *self._common(),
        ]
        return self._add(args, "head", machine)

    def start_worker(self, machine: Machine) -> RayNode:
        args = [f"--address=127.0.0.1:{self.gcs_port}", *self._common()]
        return self._add(args, f"worker-{len(self.nodes)}", machine)

    def _add(self, args: list[str], name: str, machine: Machine) -> RayNode:
        """Start a node and wait until the head lists it alive. A raylet gives its agents a
        fixed 15 s to start, which a busy machine can overrun: the node then exits, and is
        started again (up to START_ATTEMPTS times)."""
        known = {n.node_id for n in self.nodes if n.node_id}
        for attempt in range(1, START_ATTEMPTS + 1):
            env = {**self.env, **machine.env()}
            log = self.log_dir / f"ray-{name}-{attempt}.log"
            node = RayNode(args, env, machine.work, log)
            self.nodes.append(node)
            try:
                node.node_id = self._wait_new_node(node, known)
                return node
            except NodeExited:
                node.stop()
                if attempt == START_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def alive_nodes(self) -> list[Any]:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.address, timeout=10) if n.state == "ALIVE"]

    def _wait_new_node(self, node: RayNode, known: set[str]) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            node.check_alive()
            with contextlib.suppress(Exception):  # the dashboard is not up yet
                new = [n.node_id for n in self.alive_nodes() if n.node_id not in known]
                if new:
                    return new[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray node not up after {READY_TIMEOUT_S:.0f} s: {node.tail()}")
            time.sleep(1)

    def client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    def stop(self) -> None:
        """Workers first, then the head; each by its own process tree."""
        for node in reversed(self.nodes):
            node.stop()
        import shutil

        shutil.rmtree(self.temp_dir, ignore_errors=True)


def call_in_child(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a new Python process, its result sent back pickled.

    A process started from inside :func:`loopback_namespace` is wholly inside it; this one's
    other threads are not (delta-rs does its I/O on a runtime's threads, started at its first
    use), so what reads the namespace's S3 runs in a child. The child leaves by ``os._exit``
    once its answer is written, skipping the interpreter's teardown: a CI run saw such a child
    abort with ``terminate called without an active exception`` and no traceback, the mark of
    a C++ thread (DuckDB's or pyarrow's) still alive when the interpreter tears down, as
    delta-rs and polars users report at exit after reading Delta tables through pyarrow. Only
    at exit: this read, looped with a normal exit against an S3 lake whose shards were being
    rewritten and merged, aborted so in 2 of 168 reads, both after writing its answer."""
    code = (
        "import importlib, os, pickle, sys\n"
        "module, name, args = pickle.loads(sys.stdin.buffer.read())\n"
        "result = getattr(importlib.import_module(module), name)(*args)\n"
        "sys.stdout.buffer.write(pickle.dumps(result))\n"
        "sys.stdout.buffer.flush()\n"
        "os._exit(0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps((function.__module__, function.__name__, args)),
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{function.__name__} failed: {done.stderr.decode()[-3000:]}")
    return pickle.loads(done.stdout)


# What the checks read from a library (run through call_in_child inside the namespace), by its
# home: a folder or an s3:// URL. Read only: before the first run creates the library, it is empty.


def _lake(home: str | Path) -> Lake | None:
    try:
        return Lake.of(LibraryLayout.existing(home))
    except NoLibraryError:
        return None


#: The tables a shard run writes, one commit each (``write_shard``), the index last.
SHARD_TABLES = ("occurrences", "rejects", "attributes", "attribute_index")


def shard_commits(home: str | Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Each shard's commits by table, from the commits' shard mark: (Delta version, commit
    time in seconds since the epoch, from the commit's own ``timestamp``)."""
    lake = _lake(home)
    commits: dict[str, dict[str, list[tuple[int, float]]]] = {}
    if lake is None:
        return commits
    assert lake.is_s3, lake  # the lake the runs wrote, on S3
    for name in SHARD_TABLES:
        table = lake.open(name)
        for entry in table.history() if table is not None else []:
            if entry.get(SHARD_MARK):
                mark = (int(entry["version"]), int(entry["timestamp"]) / 1e3)
                commits.setdefault(entry[SHARD_MARK], {}).setdefault(name, []).append(mark)
    return commits


def rows_by_shard(home: str | Path) -> dict[tuple[str, str], int]:
    """Rows per (table, shard) of the tables a shard run writes its images to."""
    lake = _lake(home)
    counts: dict[tuple[str, str], int] = {}
    if lake is None:
        return counts
    for name in ("occurrences", "rejects"):
        table = lake.open(name)
        rows = [] if table is None else table.to_pyarrow_table(columns=["shard"])["shard"]
        for shard in rows.to_pylist() if table is not None else []:
            counts[name, shard] = counts.get((name, shard), 0) + 1
    return counts


def images_by_shard(home: str | Path) -> dict[str, int]:
    try:
        counted = Library(home).query("SELECT shard, count(*) AS n FROM images GROUP BY shard")
    except Exception:  # no catalog yet
        return {}
    return {row["shard"]: row["n"] for row in counted}


def lookups(home: str | Path, md5s: list[str], landing: str) -> dict[str, dict[str, Any]]:
    """Each image's lookup, less when it was ingested (two builds differ in it) and which store
    answered (an S3 lake is read directly; a folder library's serving store answers), with the
    batch's landing place (a folder or an S3 prefix) spelled ``<landing>``."""
    library = Library(home)
    found = {}
    for md5 in md5s:
        image = library.lookup(md5)
        assert image is not None, f"{md5} missing from {home}"
        image.pop("ingested_at")
        image.pop("answered_by")
        text = json.dumps(image, default=str).replace(landing.rstrip("/"), "<landing>")
        found[md5] = json.loads(text)
    return found
