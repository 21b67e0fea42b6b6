"""`sortie dashboard`: the web dashboard, started beside the controller (or found running)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cli.output import get_console

if TYPE_CHECKING:
    from orchestrator.config import SortieConfig

dashboard_app = typer.Typer(help="The web dashboard: jobs and pools, live.", invoke_without_command=True)


def _need_fastapi() -> None:
    import importlib.util

    from orchestrator.errors import UsageError

    missing = [m for m in ("fastapi", "jinja2", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"the dashboard needs {', '.join(missing)}: pip install 'sortie[dashboard]'")


@dashboard_app.callback()
def dashboard(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; beyond loopback a token is required."),
    port: int = typer.Option(8765, "--port",
                             help="Port (0: any free port); with a cloud controller, the tunnel's local port."),
    open_browser: bool = typer.Option(False, "--open", help="Open it in a browser, where there is one."),
    foreground: bool = typer.Option(False, "--foreground", help="Serve in this process until Ctrl-C."),
) -> None:
    """Start the dashboard on the controller's machine, or find the one running, and print its URL. With the
    controller on a cloud VM (jobs.controller.infra), the VM serves it and this opens an SSH tunnel to it."""
    if ctx.invoked_subcommand is not None:
        return
    from orchestrator.config import load_config, sortie_home
    from orchestrator.dashboard import server
    from orchestrator.dashboard.security import is_loopback, load_or_create_token, token_path
    from orchestrator.errors import UsageError

    home = sortie_home()
    config = load_config(home)
    console = get_console()
    if config.jobs.controller.infra != "local":
        _remote_dashboard(home, config, host, port, open_browser, foreground)
        return
    _need_fastapi()
    token, created = (None, False) if is_loopback(host) else load_or_create_token(home)
    if foreground:
        console.print(f"Dashboard: {server.url_of(host, port)} (Ctrl-C stops it)")
        server.serve(host, port, home)
        return
    found = server.running(home)
    if found and (found.get("kind") == "tunnel" or found["host"] != host):
        raise UsageError(f"a dashboard already runs on {found['url']}; `sortie dashboard stop` first")
    info = found or server.start(home, host, port)
    url = info["url"]
    console.print(f"Dashboard: {url} ({'already running' if found else 'started'}, pid {info['pid']})")
    if token is not None:
        if created:
            console.print(f"Token (shown once; stored 0600 in {token_path(home)}): {token}")
            console.print(f"Sign in with: {url}/?token={token}")
        else:
            console.print(f"Token: in {token_path(home)} "
                          f"(send `Authorization: Bearer TOKEN`, or open {url}/?token=TOKEN)")
    if open_browser:
        _open(f"{url}/?token={token}" if token and created else url)


def _open(url: str) -> None:
    import webbrowser

    if not webbrowser.open(url):
        get_console().print("No browser found here; open the URL above.")


def _remote_dashboard(home: Path, config: SortieConfig, host: str, port: int, open_browser: bool,
                      foreground: bool) -> None:
    """The controller runs on a cloud VM, and so does its dashboard (on the VM's loopback): tunnel to it."""
    from orchestrator.controller_service import controller_ssh_target
    from orchestrator.dashboard import server, tunnel
    from orchestrator.dashboard.security import is_loopback
    from orchestrator.errors import UsageError

    if not is_loopback(host):
        raise UsageError(f"--host {host}: the tunnel to the controller VM's dashboard listens on loopback only "
                         "(its dashboard has no token: share it over SSH, not the network)")
    console = get_console()
    found = server.running(home)
    if found and found.get("kind") != "tunnel":
        raise UsageError(f"a dashboard of this machine runs on {found['url']}; `sortie dashboard stop` first")
    target = controller_ssh_target(config, home)
    if foreground:
        local = port or tunnel.free_port()
        console.print(f"Dashboard: http://127.0.0.1:{local} (the controller VM's, through SSH to {target}; "
                      "Ctrl-C closes the tunnel)")
        code = tunnel.hold_tunnel(target, local)
        if code != 0:
            raise UsageError(f"ssh to the controller VM ({target}) failed (exit {code}); its reason is above")
        return
    info = found or tunnel.open_tunnel(home, target, port)
    console.print(f"Dashboard: {info['url']} (the controller VM's, through SSH to {info['via']}; "
                  f"{'already open' if found else 'tunnel opened'}, pid {info['pid']})")
    if open_browser:
        _open(info["url"])


@dashboard_app.command("stop")
def stop() -> None:
    """Stop the dashboard of this Sortie home (or close the tunnel to the controller VM's)."""
    from orchestrator.dashboard import server

    info = server.stop()
    if info is None:
        get_console().print("no dashboard was running")
    elif info.get("kind") == "tunnel":
        get_console().print(f"tunnel to the controller VM closed (pid {info['pid']}); "
                            "its dashboard keeps running there")
    else:
        get_console().print(f"dashboard stopped (pid {info['pid']})")


@dashboard_app.command("status")
def status() -> None:
    """Whether the dashboard runs, and where."""
    from orchestrator.dashboard import server

    found = server.running()
    if found is None:
        get_console().print("dashboard: not running")
    elif found.get("kind") == "tunnel":
        get_console().print(f"dashboard: {found['url']} (tunnel to the controller VM, {found['via']}; "
                            f"pid {found['pid']})")
    else:
        get_console().print(f"dashboard: {found['url']} (pid {found['pid']})")
