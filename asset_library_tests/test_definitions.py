"""The code location loads the way `dagster dev` and `dagster definitions validate` load it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_code_location_validates(tmp_path):
    env = {**os.environ, "ASSET_LIBRARY_HOME": str(tmp_path / "library")}
    env.pop("DAGSTER_HOME", None)
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful for code location asset_library" in result.stdout + result.stderr
