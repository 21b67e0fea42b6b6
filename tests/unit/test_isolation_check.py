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


def test_check_says_what_a_container_job_can_reach(monkeypatch) -> None:
    from orchestrator.node.isolation import container_isolation

    assert container_isolation(None).startswith("none: no working podman or docker")
    if os.geteuid() == 0:
        monkeypatch.delenv("SORTIE_NO_RUN_USERS", raising=False)
        line = container_isolation("/usr/bin/podman")
        assert "node's user (not root)" in line and "no capabilities" in line
        monkeypatch.setenv("SORTIE_NO_RUN_USERS", "1")
        assert "their processes are root" in container_isolation("/usr/bin/podman")
    line = container_isolation("/usr/bin/podman", ["--volume", "--ipc"])
    assert "never the agent's logs" in line and "run_options that mount host paths" in line
    assert "docker.allowed_run_options allows (--volume, --ipc)" in line


def test_check_prints_the_container_line(tmp_path: Path) -> None:
    env = {**os.environ, "SORTIE_HOME": str(tmp_path), "COLUMNS": "400"}
    (tmp_path / "config.yaml").write_text("docker:\n  allowed_run_options: [--ipc]\n")
    out = subprocess.run([sys.executable, "-m", "cli.main", "check"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("Local-cloud containers:"))
    assert "--ipc" in line or "no working podman" in line
