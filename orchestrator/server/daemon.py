"""Running the API server: one per server home, a background process whose address is in `<home>/api/server.json`
(`sortie api start|stop|status|logs`). `python -m orchestrator.server.daemon` is that process; it starts the
controller as `jobs launch` does, and at the first start makes the admin (`<home>/secrets/admin.token`, 0600)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.config import sortie_home, write_private
from orchestrator.dashboard.server import _alive, probe_url_of, url_of
from orchestrator.errors import SortieError, UsageError

DEFAULT_PORT = 46580  # SkyPilot's API server's port + 1
MARKER = "orchestrator.server.daemon"


def info_path(home: Path) -> Path:
    return home / "api" / "server.json"


def log_path(home: Path) -> Path:
    return home / "logs" / "api-server.log"


def recorded(home: Path) -> dict | None:
    try:
        data = json.loads(info_path(home).read_text())
        int(data["pid"])
        return data
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


def _answers(url: str) -> bool:
    context = ssl._create_unverified_context() if url.startswith("https") else None  # our own, on loopback
    try:
        with urllib.request.urlopen(f"{url}/api/v1/health", timeout=2, context=context) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def running(home: Path | None = None) -> dict | None:
    data = recorded(home or sortie_home())
    if data is None or not _alive(int(data["pid"]), MARKER):
        return None
    return data if _answers(data["probe_url"]) else None


def start(home: Path | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
          tls_cert: str | None = None, tls_key: str | None = None, behind_proxy: bool = False,
          timeout: float = 60) -> tuple[dict, Path | None]:
    """Start the server in the background (or return the one running), and the admin token's file if it was made
    now (the first start)."""
    from orchestrator.auth.users import Users
    from state.store import StateStore

    home = home or sortie_home()
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    for given in (tls_cert, tls_key):
        if given and not Path(given).expanduser().is_file():
            raise UsageError(f"--tls-cert/--tls-key: {given} is not a file")
    found = running(home)
    if found:
        return found, None
    store = StateStore(home)
    if store.config.api.oidc:  # a bad `api.oidc` stops the start in one line naming the key
        from orchestrator.auth.oidc import OidcConfig

        OidcConfig.from_mapping(store.config.api.oidc)
    made = Users(store, store.config).ensure_first_admin(home)
    store.engine.dispose()
    log = log_path(home)
    log.parent.mkdir(parents=True, exist_ok=True)
    info_path(home).unlink(missing_ok=True)
    args = [sys.executable, "-m", MARKER, "--host", host, "--port", str(port)]
    if tls_cert and tls_key:
        args += ["--tls-cert", str(Path(tls_cert).expanduser().resolve()),
                 "--tls-key", str(Path(tls_key).expanduser().resolve())]
    if behind_proxy:
        args.append("--behind-proxy")
    with log.open("ab") as out:
        proc = subprocess.Popen(args, env={**os.environ, "SORTIE_HOME": str(home)}, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise SortieError(f"the API server exited at start ({log}): {' | '.join(tail)}")
        found = running(home)
        if found and found.get("pid") == proc.pid:
            return found, made
        time.sleep(0.2)
    proc.terminate()  # nothing left behind: a server that never answered is stopped
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    info_path(home).unlink(missing_ok=True)
    raise SortieError(f"the API server did not answer within {timeout:.0f}s (log: {log})")


def stop(home: Path | None = None) -> dict | None:
    home = home or sortie_home()
    data = recorded(home)
    if data is None:
        return None
    pid = int(data["pid"])
    if _alive(pid, MARKER):
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if not _alive(pid, MARKER):
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    info_path(home).unlink(missing_ok=True)
    return data


def serve(host: str, port: int, *, tls_cert: str | None = None, tls_key: str | None = None,
          behind_proxy: bool = False) -> None:
    """Serve in this process until SIGTERM; the controller is started (and kept) as `jobs launch` does."""
    import uvicorn

    from orchestrator import __version__
    from orchestrator.controller_service import ensure_controller
    from orchestrator.server.app import create_app

    home = sortie_home()
    app = create_app(home, behind_proxy=behind_proxy)
    config = app.state.store.config
    if config.jobs.controller.infra == "local" and config.api.start_controller:
        ensure_controller(home)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise SortieError(f"the API server cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(512)
    bound = sock.getsockname()[1]
    scheme = "https" if tls_cert else "http"
    url, probe = url_of(host, bound), probe_url_of(host, bound)
    if tls_cert:
        url, probe = url.replace("http://", "https://", 1), probe.replace("http://", "https://", 1)
    write_private(info_path(home), json.dumps({"pid": os.getpid(), "host": host, "port": bound, "url": url,
                                               "probe_url": probe, "scheme": scheme, "started_at": time.time(),
                                               "version": __version__}))
    settings = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                              ssl_certfile=tls_cert, ssl_keyfile=tls_key, proxy_headers=False)
    try:
        uvicorn.Server(settings).run(sockets=[sock])
    finally:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if json.loads(info_path(home).read_text()).get("pid") == os.getpid():
                info_path(home).unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description="The Sortie API server (normally started by `sortie api start`).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--behind-proxy", action="store_true")
    args = parser.parse_args()
    os.umask(0o077)
    serve(args.host, args.port, tls_cert=args.tls_cert, tls_key=args.tls_key, behind_proxy=args.behind_proxy)


if __name__ == "__main__":
    main()
