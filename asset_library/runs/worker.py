"""A process that runs the library's Dagster jobs on request, one run at a time.

``asset-library ingest`` starts a few of these so shards run side by side, each shard a normal
run of the named job (``plan_batch``, ``ingest_shard``, ``refresh_library``) through Dagster's
public execution API, recorded in the instance the parent names. A worker imports Dagster and
the code location once and then serves run after run: requests arrive as JSON lines on stdin,
one result line goes back on stdout per run.

A worker is the leader of its own process group: a stop signal reaches it only when the parent
forwards one, and it ends, with its fingerprinting processes, when the parent ends however it
ended.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import dagster as dg

if TYPE_CHECKING:  # Dagster does not export the type of what ``instance.get_ref()`` gives
    from dagster._core.instance.ref import InstanceRef

#: The serialized ref of the instance the runs are recorded in (set by the parent).
INSTANCE_ENV = "ASSET_LIBRARY_INSTANCE_REF"

#: Runs from the terminal print the CLI's lines, not Dagster's events and tracebacks; those are
#: still in the instance for the UI.
QUIET: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


@functools.cache
def _job(name: str) -> dg.JobDefinition:
    """The named job of the code location, loaded once per worker."""
    from asset_library.definitions import build_definitions

    return build_definitions().resolve_job_def(name)


def plan_batch_job() -> dg.JobDefinition:
    return _job("plan_batch")


def ingest_shard_job() -> dg.JobDefinition:
    return _job("ingest_shard")


def refresh_library_job() -> dg.JobDefinition:
    return _job("refresh_library")


#: The jobs a worker runs, by name, as module-level factories ``dg.reconstructable`` accepts.
JOBS = {
    "plan_batch": plan_batch_job,
    "ingest_shard": ingest_shard_job,
    "refresh_library": refresh_library_job,
}


def run_job(
    instance: dg.DagsterInstance, job: str, tags: dict[str, str], config: dict[str, Any]
) -> dict[str, Any]:
    """Run ``job`` to its end; what the parent needs to know about it, as plain JSON."""
    from asset_library.defs.tags import PROCESS_TAG
    from asset_library.runs.processes import process_token

    tags = {**tags, PROCESS_TAG: process_token()}
    try:
        result = dg.execute_job(
            dg.reconstructable(JOBS[job]),
            instance=instance,
            run_config={**config, **QUIET},
            tags=tags,
        )
    except Exception as error:  # the run could not start (bad config, unloadable code)
        return {"run_id": None, "success": False, "failure": _first_line(str(error))}
    return {
        "run_id": result.run_id,
        "success": result.success,
        "failure": "" if result.success else failure_message(result),
        "checks": {e.check_name: e.passed for e in result.get_asset_check_evaluations()},
    }


def failure_message(result: dg.ExecutionResult) -> str:
    """The first line of the error our code raised in the first failed step."""
    return step_failure_message(result.get_step_failure_events())


def step_failure_message(events: Iterable[dg.DagsterEvent]) -> str:
    """The first line of the error our code raised in the first of these step failures: below
    Dagster's wrapping, above the library errors it wraps (ours name the file, row, shard or
    URI)."""
    for event in events:
        error = event.step_failure_data.error if event.step_failure_data else None
        if error is None:
            continue
        while error.cause is not None and (error.cls_name or "").startswith("Dagster"):
            error = error.cause
        first = _first_line(error.message or "")
        kind, _, text = first.partition(": ")
        return text if text and " " not in kind else first
    return "the run failed before any step did"


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def serve(requests: IO[str] = sys.stdin) -> None:
    """Run each requested job in turn and answer each with one JSON line."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to the worker's log, not into the answers
    _end_with_parent(os.getppid())
    ref = cast("InstanceRef", dg.deserialize_value(os.environ[INSTANCE_ENV]))
    # Entering the instance makes it the "current" definitions state store that Dagster reads
    # when it loads the code location (state-backed components); outside a `with`, that store
    # is whichever instance was entered last in this process, or none.
    with dg.DagsterInstance.from_ref(ref) as instance:
        answers.write(json.dumps({"ready": True}) + "\n")
        for line in requests:
            request = json.loads(line)
            answer = run_job(instance, request["job"], request["tags"], request.get("config", {}))
            answers.write(json.dumps(answer) + "\n")


def _end_with_parent(parent: int) -> None:
    """End this worker's process group once the parent is gone (``kill -9``, a crash): its run
    is then left in progress, and the next ``ingest`` or ``status`` marks it failed."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


class Worker:
    """One worker process, seen from the parent: what it is running, and its log."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.task: Any = None  # what the parent asked it to run, None while idle
        self._unread = b""  # what the worker wrote past its last full line
        self._log_file = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from asset_library.runs.worker import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the parent, which forwards it
        )

    def submit(self, task: Any, job: str, tags: dict[str, str], config: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.task = task
        request = {"job": job, "tags": tags, "config": config}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()

    def read_answer(self) -> dict[str, Any] | None:
        """The answer to the running task if it has come whole (its "ready" line is skipped);
        a worker that ended answers with a failure naming its exit and its log's last line.

        Read from the pipe itself, not a buffered file: a line held in a buffer would never
        wake ``select`` again."""
        assert self.process.stdout is not None
        data = os.read(self.process.stdout.fileno(), 1 << 16)
        if not data:
            code = self.process.wait()
            lines = self.log.read_text(errors="replace").strip().splitlines()
            said = lines[-1].strip() if lines else "no message"
            return {
                "run_id": None,
                "success": False,
                "failure": f"its worker process ended (exit code {code}): {said}",
                "ended": True,
            }
        self._unread += data
        while b"\n" in self._unread:
            line, _, self._unread = self._unread.partition(b"\n")
            answer = json.loads(line)
            if not answer.get("ready"):
                return answer
        return None

    def interrupt(self) -> None:
        """Forward a stop signal to the worker's process group (it and its fingerprinting)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGINT)

    def close(self, timeout: float) -> None:
        """Let the worker finish and end; killed (with its group) if it takes longer."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log_file.close()


class RunWorkers:
    """Up to ``count`` workers, started together so their imports overlap the first run."""

    def __init__(self, count: int, env: dict[str, str], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self._env = env
        self._log_dir = log_dir
        self._started = 0
        self.workers = [self._start() for _ in range(count)]

    def _start(self) -> Worker:
        self._started += 1
        return Worker(self._env, self._log_dir / f"worker-{self._started}.log")

    def idle(self) -> Worker | None:
        return next((w for w in self.workers if w.task is None), None)

    def busy(self) -> list[Worker]:
        return [w for w in self.workers if w.task is not None]

    def answers(self, timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        """The runs that ended within ``timeout`` seconds: (task, answer) pairs. A worker that
        died is replaced, so the pool keeps its size."""
        streams = {w.process.stdout: w for w in self.busy() if w.process.stdout is not None}
        ready, _, _ = select.select(list(streams), [], [], timeout) if streams else ([], [], [])
        ended = []
        for stream in ready:
            worker = streams[stream]
            answer = worker.read_answer()
            if answer is None:
                continue
            ended.append((worker.task, answer))
            worker.task = None
            if answer.get("ended"):
                worker.close(0)
                self.workers[self.workers.index(worker)] = self._start()
        return ended

    def stop(self, timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        """Interrupt the running runs and end every worker; the answers that still came."""
        running = self.busy()
        for worker in running:
            worker.interrupt()
        came = []
        deadline = time.monotonic() + timeout
        while self.busy() and time.monotonic() < deadline:
            came += self.answers(min(0.5, max(0.0, deadline - time.monotonic())))
        self.close(timeout=max(1.0, deadline - time.monotonic()))
        return came

    def close(self, timeout: float = 30.0) -> None:
        for worker in self.workers:
            worker.close(timeout)

    def __enter__(self) -> RunWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
