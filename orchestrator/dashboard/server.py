"""Running the dashboard beside the controller: one per Sortie home, as a background process whose address is
in `<home>/dashboard/dashboard.json`. `python -m orchestrator.dashboard.server` is that process."""

from __future__ import annotations

import argparse
import contextlib
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

from orchestrator.config import sortie_home
from orchestrator.errors import SortieError
from orchestrator.local_cloud import pid_alive

DEFAULT_PORT = 8765


def info_path(home: Path) -> Path:
    return home / "dashboard" / "dashboard.json"


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def _alive(pid: int) -> bool:
    """A live (not zombie) process that is a dashboard server (a reused pid is not)."""
    if not pid_alive(pid):
        return False
    try:
        return b"orchestrator.dashboard.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as resp:
            return resp.status == 200
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # up, and wants its token
    except OSError:
        return False


def running(home: Path | None = None) -> dict | None:
    """The dashboard serving this home, if one runs and answers."""
    home = home or sortie_home()
    try:
        data = json.loads(info_path(home).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not _alive(int(data.get("pid", 0))) or not _answers(data["url"]):
        return None
    return data


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


def stop(home: Path | None = None) -> int | None:
    """Stop this home's dashboard; its pid, or None if none ran."""
    home = home or sortie_home()
    try:
        pid = int(json.loads(info_path(home).read_text())["pid"])
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    if not _alive(pid):
        info_path(home).unlink(missing_ok=True)
        return None
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not _alive(pid):
            break
        time.sleep(0.05)
    info_path(home).unlink(missing_ok=True)
    return pid


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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), "host": host, "port": bound, "url": url_of(host, bound),
                                "started_at": time.time(), "version": __version__}))
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
