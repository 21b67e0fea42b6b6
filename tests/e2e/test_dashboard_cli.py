"""`sortie dashboard` on this machine: bound to every address, the URL it prints is this machine's own address
(not loopback), answers there, and wants the token it showed once."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the dashboard extra is not installed (pip install 'sortie[dashboard]')")

from orchestrator.dashboard.server import machine_address, probe_url_of, url_of

ROOT = Path(__file__).resolve().parents[2]


def status_of(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(f"{url}/api/health",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_urls_of_a_wildcard_bind_name_this_machine_and_probe_loopback() -> None:
    here = machine_address()
    assert ipaddress.ip_address(here)  # an address, whatever the machine
    assert url_of("0.0.0.0", 8765) == f"http://{here}:8765"
    assert url_of("10.1.2.3", 80) == "http://10.1.2.3:80" and url_of("::1", 80) == "http://[::1]:80"
    assert probe_url_of("0.0.0.0", 8765) == "http://127.0.0.1:8765"
    assert probe_url_of("::", 8765) == "http://[::1]:8765"


def test_bound_to_every_address_it_prints_this_machines_address_and_wants_the_token(tmp_path: Path) -> None:
    here = machine_address()
    if ipaddress.ip_address(here).is_loopback:
        pytest.skip("this machine has no address but loopback")
    env = {**os.environ, "SORTIE_HOME": str(tmp_path / "home"), "COLUMNS": "200"}

    def sortie(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True,
                              timeout=90, cwd=ROOT)

    try:
        first = sortie("dashboard", "--host", "0.0.0.0", "--port", "0")
        assert first.returncode == 0, first.stderr
        url = re.search(r"Dashboard: (http://\S+)", first.stdout).group(1)
        assert url.startswith(f"http://{here}:")
        token = re.search(r"Token \(shown once.*\): (\S+)", first.stdout).group(1)
        assert status_of(url) == 401 and status_of(url, token) == 200  # reached by the printed address
        again = sortie("dashboard", "--host", "0.0.0.0", "--port", "0")
        assert "already running" in again.stdout and url in again.stdout and token not in again.stdout
        assert url in sortie("dashboard", "status").stdout
    finally:
        sortie("dashboard", "stop")
    assert sortie("dashboard", "status").stdout.strip() == "dashboard: not running"
