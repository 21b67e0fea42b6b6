"""The dashboard of a controller on a cloud VM: it serves on the VM's loopback (a systemd unit beside the
controller), and `sortie dashboard` reaches it through an SSH tunnel from this machine's loopback, as
`ssh -N -L`. The tunnel is recorded where a local dashboard would be (`<home>/dashboard/dashboard.json`), so
`sortie dashboard status|stop` treat both alike."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from orchestrator.controller_service import SshTarget
from orchestrator.dashboard import server
from orchestrator.errors import SortieError, UsageError


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def forward_spec(local_port: int, target: SshTarget) -> str:
    return f"127.0.0.1:{local_port}:127.0.0.1:{target.dashboard_port}"


def ssh_command(target: SshTarget, local_port: int) -> list[str]:
    """`ssh -N -L` from this machine's loopback to the VM dashboard's. Keys only (BatchMode), the VM's host key
    accepted the first time and pinned in Sortie's own known_hosts (a new VM: `controller up` forgets it)."""
    ssh = shutil.which("ssh")
    if ssh is None:
        raise UsageError("the dashboard of a cloud controller is reached over SSH, and `ssh` is not installed here "
                         "(apt-get install openssh-client)")
    target.known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    command = [ssh, "-N", "-p", str(target.port), "-L", forward_spec(local_port, target),
               "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "ConnectTimeout=15",
               "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3",
               "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={target.known_hosts}"]
    if target.identity is not None:
        command += ["-i", str(target.identity), "-o", "IdentitiesOnly=yes"]
    return [*command, f"{target.user}@{target.host}"]


def _why(log: Path, since: int) -> str:
    lines = [line.strip() for line in log.read_bytes()[since:].decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "ssh gave no reason"


def open_tunnel(home: Path, target: SshTarget, local_port: int = 0, timeout: float = 45) -> dict:
    """Start the tunnel in the background and wait until the VM's dashboard answers through it."""
    port = local_port or free_port()
    log = home / "logs" / "dashboard-tunnel.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    since = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        proc = subprocess.Popen(ssh_command(target, port), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    info = {"kind": "tunnel", "pid": proc.pid, "host": "127.0.0.1", "port": port, "url": url, "probe_url": url,
            "marker": forward_spec(port, target), "via": str(target), "started_at": time.time()}
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SortieError(f"cannot reach the controller VM over SSH ({target}): {_why(log, since)}")
        if server.answers(url):
            server.record(home, info)
            return info
        refused = "open failed" in log.read_bytes()[since:].decode(errors="replace")  # the VM refused the forward
        if refused or time.monotonic() >= deadline:
            proc.kill()
            proc.wait(timeout=10)
            raise SortieError(f"the SSH tunnel to {target} works but the VM's dashboard does not answer on its port "
                              f"{target.dashboard_port} ({_why(log, since)}): is its sortie-dashboard service "
                              "running? (`systemctl status sortie-dashboard` on the VM)")
        time.sleep(0.2)


def hold_tunnel(target: SshTarget, local_port: int) -> int:
    """The tunnel in the foreground until Ctrl-C (or SIGTERM): ssh's exit code, 0 when stopped so. The signal
    stops ssh through handlers of our own rather than a KeyboardInterrupt, which could land anywhere (a signal sent
    to this process alone, as a supervisor sends it, once left ssh running and this process waiting on it)."""
    stopped = threading.Event()
    proc = subprocess.Popen(ssh_command(target, local_port), stdin=subprocess.DEVNULL)

    def stop(_signum: int, _frame: object) -> None:
        stopped.set()
        with contextlib.suppress(OSError):
            proc.terminate()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # a Ctrl-C before the handlers were in place
        stopped.set()
        proc.terminate()
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return 0 if stopped.is_set() else code
