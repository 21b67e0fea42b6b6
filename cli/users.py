"""`sortie users ...` (issue 23): the API server's users and tokens. On the server's home they act directly (local
access); from a client home logged in as an admin they go through the server."""

from __future__ import annotations

import json
import time
from typing import Any

import typer

from cli.output import get_console, plain_table

users_app = typer.Typer(no_args_is_help=True, help="API server users: add, ls, rm, role, token rotate.")
token_app = typer.Typer(no_args_is_help=True, help="A user's token.")
users_app.add_typer(token_app, name="token")


def remote_or_none() -> Any:
    from cli.output import job_service
    from orchestrator.api_client import RemoteJobService

    service = job_service()
    return service if isinstance(service, RemoteJobService) else None


def _local() -> tuple[Any, Any]:
    from orchestrator.user_service import local_users

    return local_users()


def _duration(text: str | None) -> float | None:
    """`30d`, `12h`, `90m` or seconds."""
    from orchestrator.errors import UsageError

    if text is None:
        return None
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise UsageError(f"--expires-in {text}: give a duration like 30d, 12h or 3600") from None
    if not 0 < seconds <= 10 * 365 * 86400:
        raise UsageError(f"--expires-in {text}: between 1s and 10 years")
    return seconds


def _print_token(name: str, token: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"name": name, "token": token}))
    else:
        get_console().print(f"Token of {name} (shown once; keep it secret):\n{token}")


@users_app.command("add")
def add(name: str = typer.Argument(..., help="User name."),
        role: str = typer.Option("user", "--role", help="admin or user."),
        workspace: list[str] = typer.Option([], "--workspace", help="A workspace of the server's config "
                                            "(repeatable; the first is the default)."),
        service_account: bool = typer.Option(False, "--service-account", help="A service account (CI pipelines)."),
        expires_in: str = typer.Option(None, "--expires-in", help="The token expires after this: 30d, 12h, 3600."),
        output: str = typer.Option(None, "-o", "--output", help="json: {\"name\": ..., \"token\": ...}.")) -> None:
    """Add a user and print their token once."""
    seconds = _duration(expires_in)
    remote = remote_or_none()
    if remote is not None:
        token = remote.call("POST", "/api/v1/users", {"name": name, "role": role, "workspaces": workspace,
                                                      "service_account": service_account,
                                                      "expires_in": seconds})["token"]
    else:
        users, audit = _local()
        token = users.add(name, role=role, workspaces=workspace, service_account=service_account,
                          expires_in=seconds, audit=audit)
    _print_token(name, token, (output or "").lower() == "json")


@users_app.command("ls")
def ls(as_json: bool = typer.Option(False, "--json", help="JSON, for scripts.")) -> None:
    """Users: name, role, workspaces, service account, created."""
    remote = remote_or_none()
    if remote is not None:
        rows = remote.call("GET", "/api/v1/users")
    else:
        users, _ = _local()
        rows = [u.__dict__ for u in users.list()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(plain_table(["NAME", "ROLE", "WORKSPACES", "SERVICE ACCOUNT", "CREATED"],
                      [[r["name"], r["role"], ", ".join(r["workspaces"]) or "-", "yes" if r["service_account"]
                        else "no", time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"]))] for r in rows]))


@users_app.command("rm")
def rm(name: str = typer.Argument(..., help="User name.")) -> None:
    """Remove a user; their tokens stop working at once."""
    remote = remote_or_none()
    if remote is not None:
        remote.call("DELETE", f"/api/v1/users/{name}")
    else:
        users, audit = _local()
        users.remove(name, audit)
    get_console().print(f"User {name} removed; their tokens are revoked")


@users_app.command("role")
def role(name: str = typer.Argument(..., help="User name."),
         new_role: str = typer.Argument(..., help="admin or user.")) -> None:
    """Change a user's role."""
    remote = remote_or_none()
    if remote is not None:
        remote.call("POST", f"/api/v1/users/{name}/role", {"role": new_role})
    else:
        users, audit = _local()
        users.set_role(name, new_role, audit)
    get_console().print(f"User {name}: role {new_role}")


@token_app.command("rotate")
def rotate(name: str = typer.Argument(..., help="User name."),
           expires_in: str = typer.Option(None, "--expires-in", help="The new token expires after this."),
           output: str = typer.Option(None, "-o", "--output", help="json: {\"name\": ..., \"token\": ...}.")) -> None:
    """Revoke a user's tokens and print a new one once."""
    seconds = _duration(expires_in)
    remote = remote_or_none()
    if remote is not None:
        token = remote.call("POST", f"/api/v1/users/{name}/token", {"expires_in": seconds})["token"]
    else:
        users, audit = _local()
        token = users.rotate(name, audit, seconds)
    _print_token(name, token, (output or "").lower() == "json")
