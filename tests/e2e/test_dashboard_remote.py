"""`sortie dashboard` with the controller on a cloud VM (`jobs.controller.infra`): the VM serves the dashboard
on its own loopback (the systemd unit its boot script writes runs `python -m orchestrator.dashboard.server`),
and the CLI reaches it through an SSH tunnel. The VM is played by a second Sortie home whose dashboard process
runs as the unit runs it, against the shared PostgreSQL state; its sshd is a real OpenSSH server on loopback
(tests/support/sshd.py). What cannot run here is the VM itself: its stack row and outputs are written as `sortie
controller up` writes them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.pg import fresh_database
from tests.support.sshd import Sshd, sshd  # noqa: F401  (a fixture)

pytest.importorskip("fastapi", reason="the dashboard extra is not installed (pip install 'sortie[dashboard]')")

from orchestrator.config import load_config
from orchestrator.dashboard.tunnel import free_port
from orchestrator.deploy.remote import controller_stack
from state.machine import StackKind
from state.store import StateStore
from tests.unit.test_dashboard_api import _submit

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Setup:
    laptop: Path  # where the user types `sortie`
    vm: Path  # the controller VM's Sortie home
    vm_port: int  # its dashboard, on its loopback
    job_id: int
    config_text: str

    def sortie(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SORTIE_HOME": str(self.laptop), "COLUMNS": "200"}
        return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def mark_up(self, outputs: dict | None) -> None:
        """What `sortie controller up` records: the stack UP, and its public outputs."""
        store = StateStore(self.laptop, load_config(self.laptop))
        name = controller_stack(load_config(self.laptop))
        store.record_stack(name, StackKind.CONTROLLER)
        store.stack_up(name, outputs=outputs)


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def setup(tmp_path: Path, sshd: Sshd) -> Iterator[Setup]:  # noqa: F811
    with fresh_database() as url:
        config_text = (f"state:\n  url: {url}\njobs:\n  controller:\n    infra: aws\n"
                       f"cloud:\n  ssh_public_key: {sshd.client_public_key}\n  ssh_private_key: {sshd.client_key}\n")
        laptop, vm = tmp_path / "laptop", tmp_path / "vm"
        for home in (laptop, vm):
            home.mkdir()
            (home / "config.yaml").write_text(config_text)
        store = StateStore(laptop, load_config(laptop))
        (job_id,) = _submit(store, "run: echo hi\n", "alice", "through-the-tunnel", 1)
        vm_port = free_port()
        log = (tmp_path / "vm-dashboard.log").open("wb")
        unit = subprocess.Popen([sys.executable, "-m", "orchestrator.dashboard.server", "--host", "127.0.0.1",
                                 "--port", str(vm_port)], env={**os.environ, "SORTIE_HOME": str(vm)}, cwd=ROOT,
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        setup = Setup(laptop, vm, vm_port, job_id, config_text)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    get_json(f"http://127.0.0.1:{vm_port}/api/health")
                    break
                except OSError:
                    assert unit.poll() is None, (tmp_path / "vm-dashboard.log").read_text()
                    assert time.monotonic() < deadline, "the VM's dashboard did not start"
                    time.sleep(0.2)
            yield setup
        finally:
            setup.sortie("dashboard", "stop")
            unit.terminate()
            unit.wait(timeout=10)
            log.close()


def test_the_dashboard_of_a_cloud_controller_is_reached_through_an_ssh_tunnel(setup: Setup, sshd: Sshd) -> None:  # noqa: F811
    # Before `controller up`: one line saying what to do.
    before = setup.sortie("dashboard", "--port", "0")
    assert before.returncode != 0 and "sortie controller up" in before.stderr
    assert len(before.stderr.strip().splitlines()) == 1 and "Traceback" not in before.stderr

    assert "never created: start it with `sortie controller up`" in setup.sortie("controller", "status").stdout
    launch = setup.sortie("jobs", "launch", "-y", "-d", "echo hi")  # no local controller is started either
    assert launch.returncode != 0 and "start it with `sortie controller up`" in launch.stderr
    assert len(launch.stderr.strip().splitlines()) == 1
    assert not (setup.laptop / "controller.pid").exists() and not (setup.laptop / "logs" / "controller.log").exists()
    stop = setup.sortie("controller", "stop")  # nothing to stop here: it says what does
    assert stop.returncode != 0 and "`sortie controller down`" in stop.stderr

    setup.mark_up({"controller": {"ip": "10.0.0.5", "public_ip": "127.0.0.1", "ssh_user": sshd.user,
                                  "ssh_port": sshd.port, "dashboard_port": setup.vm_port,
                                  "instance_type": "m6i.large", "region": "us-east-1"}, "infra": "aws"})
    status = setup.sortie("controller", "status").stdout
    assert "runs on a VM on aws" in status
    assert "UP at 127.0.0.1 (m6i.large, us-east-1)" in status
    out = setup.sortie("dashboard", "--port", "0")
    assert out.returncode == 0, out.stderr
    assert f"through SSH to {sshd.user}@127.0.0.1:{sshd.port}" in out.stdout and "tunnel opened" in out.stdout
    url = out.stdout.split("Dashboard: ", 1)[1].split()[0]
    local_port = int(url.rsplit(":", 1)[1])
    assert local_port != setup.vm_port
    # Through the tunnel: the VM's dashboard, over the shared state.
    jobs = get_json(f"{url}/api/jobs")
    assert [j["name"] for j in jobs["items"]] == ["through-the-tunnel"]
    with urllib.request.urlopen(f"{url}/jobs/{setup.job_id}", timeout=10) as resp:
        assert "through-the-tunnel" in resp.read().decode()
    # Found again, not opened twice; status names the tunnel.
    again = setup.sortie("dashboard", "--port", "0")
    assert "already open" in again.stdout and url in again.stdout
    assert "tunnel to the controller VM" in setup.sortie("dashboard", "status").stdout
    # The VM's host key was pinned in Sortie's own known_hosts, not the user's.
    assert sshd.host_public_key in (setup.laptop / "ssh" / "known_hosts").read_text()

    stopped = setup.sortie("dashboard", "stop")
    assert "tunnel to the controller VM closed" in stopped.stdout
    with pytest.raises(OSError):
        get_json(f"{url}/api/health")
    assert get_json(f"http://127.0.0.1:{setup.vm_port}/api/health")  # the VM's dashboard keeps running
    assert setup.sortie("dashboard", "status").stdout.strip() == "dashboard: not running"


def test_tunnel_failures_are_one_line_and_leave_nothing(setup: Setup, sshd: Sshd, tmp_path: Path) -> None:  # noqa: F811
    outputs = {"controller": {"ip": "10.0.0.5", "public_ip": "127.0.0.1", "ssh_user": sshd.user,
                              "ssh_port": sshd.port, "dashboard_port": setup.vm_port}}
    # A key the VM does not admit.
    other = tmp_path / "other-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    (setup.laptop / "config.yaml").write_text(setup.config_text.replace(str(sshd.client_key), str(other)))
    setup.mark_up(outputs)
    denied = setup.sortie("dashboard", "--port", "0")
    assert denied.returncode != 0 and "cannot reach the controller VM over SSH" in denied.stderr
    assert "Permission denied" in denied.stderr and len(denied.stderr.strip().splitlines()) == 1
    assert setup.sortie("dashboard", "status").stdout.strip() == "dashboard: not running"
    # The VM answers SSH but its dashboard does not (a wrong port, as when its service is down).
    (setup.laptop / "config.yaml").write_text(setup.config_text)
    setup.mark_up({"controller": {**outputs["controller"], "dashboard_port": free_port()}})
    silent = setup.sortie("dashboard", "--port", "0")
    assert silent.returncode != 0 and len(silent.stderr.strip().splitlines()) == 1
    assert "the VM's dashboard does not answer" in silent.stderr and "Connection refused" in silent.stderr
    assert setup.sortie("dashboard", "status").stdout.strip() == "dashboard: not running"
    # Bound beyond loopback: refused (the VM's dashboard has no token).
    wide = setup.sortie("dashboard", "--host", "0.0.0.0")
    assert wide.returncode != 0 and "loopback only" in wide.stderr
    # No address recorded (a controller made before this version): say how to record it.
    setup.mark_up({"controller": {}})
    blank = setup.sortie("dashboard")
    assert blank.returncode != 0 and "run `sortie controller up` again" in blank.stderr


def test_foreground_holds_the_tunnel_until_ctrl_c(setup: Setup, sshd: Sshd) -> None:  # noqa: F811
    setup.mark_up({"controller": {"ip": "10.0.0.5", "public_ip": "127.0.0.1", "ssh_user": sshd.user,
                                  "ssh_port": sshd.port, "dashboard_port": setup.vm_port}})
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "dashboard", "--foreground", "--port", str(port)],
                            env={**os.environ, "SORTIE_HOME": str(setup.laptop)}, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
        deadline = time.monotonic() + 30
        while True:
            try:
                assert get_json(f"http://127.0.0.1:{port}/api/jobs")["total"] == 1
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        with pytest.raises(OSError):
            get_json(f"http://127.0.0.1:{port}/api/health")
    finally:
        if proc.poll() is None:
            proc.kill()
