"""`sortie check` says how far local-cloud jobs are kept apart here (issue 17, item 8)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.e2e import path_view_works


@pytest.mark.parametrize("namespaces", [True, False])
def test_check_says_whether_runs_are_kept_from_the_home(tmp_path: Path, namespaces: bool) -> None:
    env = {**os.environ, "SORTIE_HOME": str(tmp_path), "COLUMNS": "400"}
    if not namespaces:
        env["SORTIE_NO_MOUNT_NAMESPACE"] = "1"
    out = subprocess.run([sys.executable, "-m", "cli.main", "check"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("Local-cloud isolation:"))
    if namespaces and path_view_works():
        assert "hidden from them" in line
    else:
        assert "NOT isolated" in line and "Sortie home" in line
