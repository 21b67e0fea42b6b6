"""`sortie api ...` (issue 23): run the API server on a server home (start, stop, status, logs, audit), and log a
client home in to one (login, logout, info)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import typer

from cli.output import get_console, plain_table, print_log_file

api_app = typer.Typer(no_args_is_help=True, help="The Sortie API server: start, stop, status, logs; login, logout, "
                      "info; audit.")


@api_app.command("start")
def start(host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every one)."),
          port: int = typer.Option(46580, "--port", help="Port to listen on."),
          tls_cert: str = typer.Option(None, "--tls-cert", help="TLS certificate (PEM), with --tls-key."),
          tls_key: str = typer.Option(None, "--tls-key", help="TLS private key (PEM)."),
          behind_proxy: bool = typer.Option(False, "--behind-proxy", help="Trust X-Forwarded-* from the addresses "
                                            "in api.trusted_proxies (a TLS-terminating proxy in front).")) -> None:
    """Start the API server on this (server) home, in the background; the first start makes the admin."""
    from cli.output import local_only
    from orchestrator.server.daemon import start as start_server

    local_only("`sortie api start`")
    if not 0 <= port <= 65535:
        from orchestrator.errors import UsageError

        raise UsageError(f"--port {port}: must be 0-65535")
    info, admin_token = start_server(host=host, port=port, tls_cert=tls_cert, tls_key=tls_key,
                                     behind_proxy=behind_proxy)
    console = get_console()
    console.print(f"API server running at {info['url']} (pid {info['pid']}, version {info['version']})")
    if admin_token is not None:
        how = ("adopted from $SORTIE_ADMIN_TOKEN_FILE" if os.environ.get("SORTIE_ADMIN_TOKEN_FILE", "").strip()
               else "written")
        console.print(f"Admin token {how}: {admin_token}; log in with `sortie api login --endpoint "
                      f"{info['url']} --token $(cat {admin_token})`")


@api_app.command("stop")
def stop() -> None:
    """Stop this home's API server (jobs go on; the controller keeps running)."""
    from orchestrator.server.daemon import stop as stop_server

    found = stop_server()
    get_console().print(f"API server stopped (pid {found['pid']})" if found else "API server was not running")


@api_app.command("status")
def status() -> None:
    """Whether this home's API server runs, where, and since when."""
    from orchestrator.server.daemon import running
    from orchestrator.timefmt import duration

    found = running()
    if not found:
        get_console().print("API server: not running (`sortie api start`)")
        return
    get_console().print(f"API server: running at {found['url']}, pid {found['pid']}, version {found['version']}, "
                        f"up {duration(found['started_at'], None)}")


@api_app.command("logs")
def logs(follow: bool = typer.Option(False, "--follow/--no-follow", help="Follow the log."),
         tail: int = typer.Option(50, "--tail", help="The last N lines.")) -> None:
    """The API server's own log."""
    from orchestrator.config import sortie_home
    from orchestrator.server.daemon import log_path

    path = log_path(sortie_home())
    if not path.exists():
        get_console().print("the API server has not written a log yet")
        return
    print_log_file(path, tail, follow)


def _config_path() -> Path:
    from orchestrator.config import CONFIG_FILE, sortie_home

    return sortie_home() / CONFIG_FILE


def _raw_config() -> dict[str, Any]:
    import yaml

    from orchestrator.config import load_config

    load_config()  # a broken config says so in one line first
    path = _config_path()
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _write_config(raw: dict[str, Any]) -> None:
    import yaml

    from orchestrator.config import write_private

    write_private(_config_path(), yaml.safe_dump(raw, sort_keys=False))


@api_app.command("login")
def login(endpoint: str = typer.Option(..., "-e", "--endpoint", help="The server's URL."),
          token: str = typer.Option(..., "--token", envvar="SORTIE_API_TOKEN", help="Your token (`sortie users add` "
                                    "printed it)."),
          insecure: bool = typer.Option(False, "--insecure", help="Allow plain HTTP to a host that is not loopback.")
          ) -> None:
    """Log this home in to an API server: every `sortie jobs ...` command then goes there. The endpoint and the token
    are written to this home's config.yaml (0600), once the server has accepted the token."""
    from orchestrator.api_client import RemoteJobService, check_endpoint
    from orchestrator.config import ApiConfig

    endpoint = check_endpoint(endpoint, insecure)
    api = ApiConfig(endpoint=endpoint, token=token.strip(), insecure=insecure)
    me = RemoteJobService(api).identity
    raw = _raw_config()
    raw["api"] = {**(raw.get("api") or {}), "endpoint": endpoint, "token": token.strip(), "insecure": insecure}
    _write_config(raw)
    get_console().print(f"Logged in to {endpoint} as {me.user} ({me.role}; workspaces: "
                        f"{', '.join(me.workspaces) or 'none'})")


@api_app.command("logout")
def logout() -> None:
    """Forget the endpoint and token: this home is back in local mode."""
    raw = _raw_config()
    api = raw.get("api") or {}
    had = api.pop("endpoint", None)
    api.pop("token", None)
    api.pop("insecure", None)
    if api:
        raw["api"] = api
    else:
        raw.pop("api", None)
    _write_config(raw)
    get_console().print(f"Logged out of {had}" if had else "Not logged in")


@api_app.command("info")
def info(as_json: bool = typer.Option(False, "--json", help="JSON, for scripts.")) -> None:
    """The endpoint, the server's version, who I am, my role and workspaces."""
    from orchestrator import __version__
    from orchestrator.api_client import RemoteJobService
    from orchestrator.config import load_config

    config = load_config()
    if not config.api.endpoint:
        get_console().print("Not logged in to an API server: local mode (`sortie api login --endpoint URL --token T`)")
        return
    remote = RemoteJobService(config.api)
    me = remote.identity
    found = {"endpoint": remote.endpoint, "server_version": remote.server_version, "client_version": __version__,
             "user": me.user, "role": me.role, "workspaces": list(me.workspaces)}
    if as_json:
        print(json.dumps(found, indent=2))
        return
    for key, value in found.items():
        get_console().print(f"{key + ':':16}{', '.join(value) if isinstance(value, list) else value}")


@api_app.command("audit")
def audit(limit: int = typer.Option(100, "-l", "--limit", help="The last N events."),
          as_json: bool = typer.Option(False, "--json", help="JSON, for scripts.")) -> None:
    """Every change made through the server: who, which request, what (admins; or on the server's home)."""
    from cli.users import remote_or_none

    if not 1 <= limit <= 10_000:
        from orchestrator.errors import UsageError

        raise UsageError("--limit: 1 to 10000")
    remote = remote_or_none()
    if remote is not None:
        rows = remote.call("GET", "/api/v1/audit", limit=limit)
    else:
        from orchestrator.user_service import audit_rows

        rows = audit_rows(limit)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(plain_table(["TIME", "USER", "REQUEST", "ACTION", "TARGET", "WORKSPACE", "DETAIL"],
                      [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"])), r["user"], r["request_id"],
                        r["action"], r["target"], r["workspace"] or "-", r["detail"] or ""] for r in rows]))
