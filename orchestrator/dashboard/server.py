"""Running the dashboard beside the controller: one per Sortie home, as a background process whose address is
in `<home>/dashboard/dashboard.json`. `python -m orchestrator.dashboard.server` is that process."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.config import DASHBOARD_PORT, sortie_home
from orchestrator.errors import SortieError
from orchestrator.infra.local_cloud import pid_alive

DEFAULT_PORT = DASHBOARD_PORT


def info_path(home: Path) -> Path:
    return home / "dashboard" / "dashboard.json"


WILDCARDS = ("0.0.0.0", "", "::")
SERVER_MARKER = "orchestrator.dashboard.server"  # in the server's command line


def machine_address(ipv6: bool = False) -> str:
    """This machine's address as others reach it: the source address of its default route (no packet is
    sent), else its hostname's address; loopback when it has no other."""
    probes = [(socket.AF_INET6, "2001:db8::1")] if ipv6 else []
    for family, far in [*probes, (socket.AF_INET, "192.0.2.1")]:  # documentation addresses (RFC 3849, 5737)
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((far, 9))
                address = ipaddress.ip_address(probe.getsockname()[0])
        except (OSError, ValueError):
            continue
        if not (address.is_loopback or address.is_unspecified or address.is_link_local):
            return str(address)
    with contextlib.suppress(OSError, ValueError):
        address = ipaddress.ip_address(socket.gethostbyname(socket.gethostname()))
        if not address.is_loopback:
            return str(address)
    return "127.0.0.1"


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def url_of(host: str, port: int) -> str:
    """The URL to give people: bound to every address (0.0.0.0, ::), this machine's own address."""
    return _url(machine_address(ipv6=host == "::") if host in WILDCARDS else host, port)


def probe_url_of(host: str, port: int) -> str:
    """The URL this machine checks the server on: loopback when bound to every address."""
    if host in WILDCARDS:
        return _url("::1" if host == "::" else "127.0.0.1", port)
    return _url(host, port)


def _alive(pid: int, marker: str = SERVER_MARKER) -> bool:
    """A live (not zombie) process whose command line has `marker` (a reused pid has not)."""
    if not pid_alive(pid):
        return False
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as resp:
            return resp.status == 200
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # up, and wants its token
    except OSError:
        return False


def record(home: Path, info: dict) -> None:
    path = info_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))


def recorded(home: Path) -> dict | None:
    """What `<home>/dashboard/dashboard.json` says runs (a server here, or a tunnel to the controller VM's)."""
    try:
        data = json.loads(info_path(home).read_text())
        int(data["pid"])
        return data
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


def running(home: Path | None = None) -> dict | None:
    """The dashboard serving this home (or the tunnel to it), if one runs and answers."""
    data = recorded(home or sortie_home())
    if data is None or not _alive(int(data["pid"]), data.get("marker", SERVER_MARKER)):
        return None
    return data if answers(data.get("probe_url") or data["url"]) else None


def start(home: Path | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT, timeout: float = 30) -> dict:
    """Start the dashboard in the background (or return the one running); wait until it answers."""
    home = home or sortie_home()
    found = running(home)
    if found:
        return found
    log = home / "logs" / "dashboard.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    info_path(home).unlink(missing_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.dashboard.server", "--host", host,
                                 "--port", str(port)], env={**os.environ, "SORTIE_HOME": str(home)},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise SortieError(f"the dashboard exited at start ({log}): {' | '.join(tail)}")
        found = running(home)
        if found and found.get("pid") == proc.pid:
            return found
        time.sleep(0.1)
    raise SortieError(f"the dashboard did not answer within {timeout:.0f}s (log: {log})")


def stop(home: Path | None = None) -> dict | None:
    """Stop this home's dashboard (or close the tunnel to the controller VM's); what ran, or None."""
    home = home or sortie_home()
    data = recorded(home)
    if data is None:
        return None
    pid = int(data["pid"])
    if not _alive(pid, data.get("marker", SERVER_MARKER)):
        info_path(home).unlink(missing_ok=True)
        return None
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not _alive(pid, data.get("marker", SERVER_MARKER)):
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    info_path(home).unlink(missing_ok=True)
    return data


def serve(host: str, port: int, home: Path | None = None) -> None:
    """Serve in this process (foreground) until SIGTERM/SIGINT; records the address for `running()`."""
    import uvicorn

    from orchestrator import __version__
    from orchestrator.dashboard import create_app

    home = home or sortie_home()
    app = create_app(home, host=host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise SortieError(f"the dashboard cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    bound = sock.getsockname()[1]
    path = info_path(home)
    record(home, {"kind": "server", "pid": os.getpid(), "host": host, "port": bound, "url": url_of(host, bound),
                  "probe_url": probe_url_of(host, bound), "started_at": time.time(), "version": __version__})
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description="The Sortie dashboard (normally started by `sortie dashboard`).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args()
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
