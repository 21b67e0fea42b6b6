"""A throwaway OpenSSH server on loopback for the tests (Debian's openssh-server; `.ci/run` installs it): it
stands in for a cloud VM's sshd, with a key of its own and one authorized client key. Skipped where there is
no sshd, failed instead under CI."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.pg import pg_required


@dataclass(frozen=True)
class Sshd:
    port: int
    user: str
    client_key: Path  # the private key it admits
    client_public_key: str
    host_public_key: str  # what a client pins in its known_hosts


def _sshd_binary() -> str | None:
    return next((p for p in (shutil.which("sshd"), "/usr/sbin/sshd") if p and Path(p).exists()), None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    binary = _sshd_binary()
    if binary is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        message = "no OpenSSH server/client here (apt-get install -y openssh-server openssh-client)"
        if pg_required():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    base = tmp_path / "sshd"
    base.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sortie-test-{name}",
                        "-f", str(base / name)], check=True)
    (base / "authorized_keys").write_text((base / "client.pub").read_text())
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege-separation directory
    port = _free_port()
    config = base / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {base / 'host'}
PidFile {base / 'sshd.pid'}
AuthorizedKeysFile {base / 'authorized_keys'}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AllowTcpForwarding local
X11Forwarding no
LogLevel ERROR
""")
    log = (base / "sshd.log").open("wb")
    proc = subprocess.Popen([binary, "-D", "-e", "-f", str(config)], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, f"sshd exited: {(base / 'sshd.log').read_text()}"
                assert time.monotonic() < deadline, "sshd did not listen within 10s"
                time.sleep(0.05)
        yield Sshd(port=port, user=getpass.getuser(), client_key=base / "client",
                   client_public_key=(base / "client.pub").read_text().strip(),
                   host_public_key=(base / "host.pub").read_text().split()[1])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
