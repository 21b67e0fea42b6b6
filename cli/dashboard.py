"""`sortie dashboard`: the web dashboard, started beside the controller (or found running)."""

from __future__ import annotations

import typer

dashboard_app = typer.Typer(help="The web dashboard: jobs and pools, live.", invoke_without_command=True)


def _console():
    from cli.main import _console as console

    return console()


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
    port: int = typer.Option(8765, "--port", help="Port (0: any free port)."),
    open_browser: bool = typer.Option(False, "--open", help="Open it in a browser, where there is one."),
    foreground: bool = typer.Option(False, "--foreground", help="Serve in this process until Ctrl-C."),
) -> None:
    """Start the dashboard on this (the controller's) machine, or find the one running, and print its URL."""
    if ctx.invoked_subcommand is not None:
        return
    _need_fastapi()
    from orchestrator.config import load_config, sortie_home
    from orchestrator.dashboard import server
    from orchestrator.dashboard.security import is_loopback, load_or_create_token, token_path
    from orchestrator.errors import UsageError

    home = sortie_home()
    if load_config(home).jobs.controller.infra != "local":
        _console().print("note: the controller runs on its own VM; this dashboard reads the shared state from here")
    console = _console()
    token, created = (None, False) if is_loopback(host) else load_or_create_token(home)
    if foreground:
        console.print(f"Dashboard: {server.url_of(host, port)} (Ctrl-C stops it)")
        server.serve(host, port, home)
        return
    found = server.running(home)
    if found and found["host"] != host:
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
        import webbrowser

        link = f"{url}/?token={token}" if token and created else url
        if not webbrowser.open(link):
            console.print("No browser found here; open the URL above.")


@dashboard_app.command("stop")
def stop() -> None:
    """Stop the dashboard of this Sortie home."""
    from orchestrator.dashboard import server

    pid = server.stop()
    _console().print(f"dashboard stopped (pid {pid})" if pid else "no dashboard was running")


@dashboard_app.command("status")
def status() -> None:
    """Whether the dashboard runs, and where."""
    from orchestrator.dashboard import server

    found = server.running()
    _console().print(f"dashboard: {found['url']} (pid {found['pid']})" if found else "dashboard: not running")
