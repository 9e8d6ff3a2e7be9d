"""A file replaced atomically reaches the disk before its rename, and the rename after: the
system calls of a real write, traced by strace."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path


def _traced(code: str, tmp_path: Path) -> list[str]:
    """The fsync and rename calls a Python snippet makes, in order, file descriptors shown
    with their paths (strace -y)."""
    strace = shutil.which("strace")
    assert strace, "these tests trace system calls with strace (apt-get install strace)"
    trace = tmp_path / "trace.txt"
    subprocess.run(
        [strace, "-f", "-y", "-s", "4096", "-qq", "-o", str(trace)]
        + ["-e", "trace=fsync,fdatasync,rename,renameat,renameat2", sys.executable, "-c", code],
        check=True,
        timeout=120,
    )
    return [line for line in trace.read_text().splitlines() if "(" in line]


def _first(calls: list[str], pattern: str) -> int:
    found = [n for n, call in enumerate(calls) if re.search(pattern, call)]
    assert found, (pattern, calls)
    return found[0]


def test_an_atomic_write_syncs_the_file_before_its_rename_and_the_folder_after(tmp_path):
    target = tmp_path / "library" / "library.json"
    calls = _traced(
        "from pathlib import Path; from asset_library.layout import atomic_write_text; "
        f"atomic_write_text(Path({str(target)!r}), '{{}}')",
        tmp_path,
    )
    synced = _first(calls, r"fsync\(\d+<[^>]*/\.library\.json\.[0-9a-f]+\.tmp>")
    renamed = _first(calls, r"^\d+\s+rename\w*\(.*\.library\.json\.[0-9a-f]+\.tmp.*library\.json")
    folder = _first(calls, rf"fsync\(\d+<{re.escape(str(target.parent))}>\)")
    assert synced < renamed < folder
    assert target.read_text() == "{}"


def test_a_folder_renamed_into_place_has_every_file_synced_first(tmp_path):
    staging, final = tmp_path / ".staging", tmp_path / "plan"
    (staging / "shards").mkdir(parents=True)
    (staging / "plan.json").write_text("{}")
    (staging / "shards" / "s0.parquet").write_bytes(b"rows")
    calls = _traced(
        "import os; from pathlib import Path; from asset_library.layout import rename_durably; "
        f"rename_durably(Path({str(staging)!r}), Path({str(final)!r}), os.rename)",
        tmp_path,
    )
    renamed = _first(calls, r"^\d+\s+rename\w*\(.*\.staging")
    for name in ("plan.json", "s0.parquet"):
        assert _first(calls, rf"fsync\(\d+<[^>]*/{re.escape(name)}>") < renamed
    assert renamed < _first(calls, rf"fsync\(\d+<{re.escape(str(tmp_path))}>\)")
    assert (final / "shards" / "s0.parquet").read_bytes() == b"rows"
