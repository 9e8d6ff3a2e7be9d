"""Shared fixtures: the image corpus and a real S3 server (SeaweedFS) on loopback."""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest

from asset_library.runs.orchestrate import IngestSummary, ingest_batch
from asset_library_tests.support.postgres import PostgresServer
from asset_library_tests.support.seaweedfs import SeaweedS3

# A suite started in the background by a shell without job control (``make test &``) inherits
# SIGINT ignored, and so would every process it starts: the Ctrl-C tests need Python's own
# handler here, and a handled signal is back to its default in each child.
signal.signal(signal.SIGINT, signal.default_int_handler)

_bucket_numbers = itertools.count(1)

#: A test that starts a real service carries its marker, by the fixture that starts it.
SERVICE_FIXTURES = {"seaweed": "s3", "postgres": "postgres", "browser": "browser"}
#: ``make test-fast`` runs the tests that start no service and took at most this many seconds
#: (setup included) in the last recorded full run: the edit-test loop's budget.
FAST_BUDGET_SECONDS = 1.0
#: Shared fixtures that ingest a library through Dagster (10-20 s each, once): a recorded run
#: charges them to the first test that uses them, so every test that uses them is slow.
LIBRARY_FIXTURES = {"corpus_library", "batches", "library_root"}
#: Per-test seconds of the last full run, written by ``make test-durations``.
DURATIONS_FILE = Path(__file__).with_name("durations.json")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--record-durations",
        action="store_true",
        help=f"write each test's seconds (setup + call + teardown) to {DURATIONS_FILE.name}",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark service tests by their fixtures, and tests over the fast budget as ``slow``."""
    recorded = json.loads(DURATIONS_FILE.read_text()) if DURATIONS_FILE.exists() else {}
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for fixture, marker in SERVICE_FIXTURES.items():
            if fixture in fixtures:
                item.add_marker(marker)
        # A test never recorded is new: it stays in the fast set until a full run measures it.
        if recorded.get(item.nodeid, 0.0) > FAST_BUDGET_SECONDS or fixtures & LIBRARY_FIXTURES:
            item.add_marker("slow")


_durations: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.getoption("--record-durations") and _durations:
        ordered = {k: round(v, 2) for k, v in sorted(_durations.items())}
        DURATIONS_FILE.write_text(json.dumps(ordered, indent=0) + "\n")


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shared image corpus, beside the clone: <clone>/../shared/corpus."""
    path = Path(__file__).resolve().parents[2] / "shared" / "corpus"
    if not path.is_dir():
        pytest.fail(
            f"image corpus not found at {path}: the tests expect the project's shared/ folder "
            "beside the clone (shared/corpus)",
            pytrace=False,
        )
    return path.resolve()  # shared/ may be a link: sources are recorded by their real path


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedS3]:
    """One `weed mini` for the whole session, auth on. Fails (never skips) if it can't start."""
    server = SeaweedS3()
    try:
        server.start()
    except Exception as exc:
        server.close()
        pytest.fail(f"could not start SeaweedFS (weed mini): {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL 15 for the session (a database per use). Fails (never skips) if it
    can't start."""
    server = PostgresServer()
    try:
        server.start()
    except Exception as exc:
        server.stop()
        pytest.fail(f"could not start PostgreSQL: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(seaweed: SeaweedS3) -> str:
    """A fresh, empty bucket with a unique name."""
    name = f"test-{os.getpid()}-{next(_bucket_numbers)}"
    return seaweed.make_bucket(name)


@pytest.fixture
def s3_env(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point `s3_client_from_env()` at the test server (endpoint, keys, region)."""
    env = seaweed.env()
    for name in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """A real Dagster instance (SQLite, temporary home) for one test."""
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture(scope="session")
def corpus_library(
    tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path
) -> Iterator[tuple[Path, IngestSummary]]:
    """The whole corpus ingested once from its folder, in shards of 100, on the local store."""
    root = tmp_path_factory.mktemp("library")
    with dg.instance_for_test() as instance:
        summary = ingest_batch(
            str(corpus_dir),
            library=root,
            max_images_per_shard=100,
            workers=2,
            environ={},
            instance=instance,
            progress=lambda _: None,
        )
    yield root, summary


#: Settings a test's CLI run must not inherit from the shell that started pytest.
_LIBRARY_SETTINGS = (
    "ASSET_LIBRARY_OBJECTS",
    "ASSET_LIBRARY_LANDING",
    "ASSET_LIBRARY_SHARD_SIZE",
    "ASSET_LIBRARY_ALLOWED_ROOTS",
    "ASSET_LIBRARY_MAX_IMAGE_BYTES",
)


@pytest.fixture
def run_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """``asset-library ARGS...`` in this process on a library in ``tmp_path``, with its own
    Dagster home and one fingerprinting process: returns (exit code, stdout, stderr)."""
    from asset_library.cli import main

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("ASSET_LIBRARY_HOME", str(tmp_path / "library"))
    monkeypatch.setenv("ASSET_LIBRARY_WORKERS", "0")
    for name in _LIBRARY_SETTINGS:
        monkeypatch.delenv(name, raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run
