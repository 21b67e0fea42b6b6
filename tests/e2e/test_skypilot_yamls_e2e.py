"""SkyPilot forms end to end on the local cloud (real CLI, controller, engine and node): a git workdir cloned
on the node at its ref, serving it on a `ports` port that `jobs endpoints` shows on the node's loopback."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.e2e import Sortie, write

pytestmark = pytest.mark.e2e


@pytest.fixture
def sortie(sortie_cli) -> Sortie:
    return sortie_cli("controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  autostop_idle_minutes: 5\n")


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_git_workdir_and_ports_on_the_local_cloud(sortie: Sortie, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _git("init", "-q", "-b", "main", cwd=src)
    (src / "page.txt").write_text("from v1")
    _git("add", "page.txt", cwd=src)
    _git("commit", "-qm", "v1", cwd=src)
    _git("tag", "v1", cwd=src)
    (src / "page.txt").write_text("from main")
    _git("commit", "-qam", "main", cwd=src)
    _git("clone", "-q", "--bare", str(src), str(tmp_path / "repo.git"), cwd=tmp_path)
    port = _free_port()
    yaml = write(tmp_path, "serve.yaml", f"workdir:\n  url: {tmp_path / 'repo.git'}\n  ref: v1\n"
                 f"resources:\n  infra: local\n  ports: {port}\n"
                 f"service:\n  readiness_probe: /page.txt\n"
                 f"run: echo serving; python3 -m http.server {port} --bind 127.0.0.1\n")
    job_id = sortie.launch(yaml)
    try:
        sortie.wait_for_log(job_id, "serving", timeout=120)
        endpoint = ""
        deadline = time.monotonic() + 60
        while not endpoint:
            endpoint = sortie.run("jobs", "endpoints", str(job_id), str(port), check=False).stdout.strip()
            endpoint = endpoint.splitlines()[-1].split()[-1] if "127.0.0.1" in endpoint else ""
            if not endpoint:
                assert time.monotonic() < deadline, "jobs endpoints never showed the port"
                time.sleep(0.3)
        assert endpoint == f"127.0.0.1:{port}"
        assert f"127.0.0.1:{port}" in sortie.run("jobs", "queue", "-v").stdout
        body = ""
        while time.monotonic() < deadline and body != "from v1":
            try:
                body = urllib.request.urlopen(f"http://{endpoint}/page.txt", timeout=2).read().decode()
            except OSError:
                time.sleep(0.3)
        assert body == "from v1"  # the node cloned the repository at v1, and serves it on the port
    finally:
        sortie.run("jobs", "cancel", "-y", str(job_id), check=False)
    assert sortie.wait(job_id, timeout=120)["status"] == "CANCELLED"
