"""The identity a service acts for: in local mode the OS user, who may do everything; behind the API server the
authenticated user, with a role (admin or user) and workspaces. The service layer asks it what may be seen and
changed, so the CLI's in-process transport and the server apply the same rules."""

from __future__ import annotations

import getpass
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.errors import SortieError

if TYPE_CHECKING:
    from orchestrator.config import SortieConfig

ADMIN, USER = "admin", "user"
ROLES = (ADMIN, USER)
DEFAULT_WORKSPACE = "default"  # when the server's config names no workspaces, everyone shares this one


class ForbiddenError(SortieError):
    """The identity may see the thing but not do this to it (HTTP 403)."""

    exit_code = 2


class UnauthorizedError(SortieError):
    """No valid token (HTTP 401)."""


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@dataclass(frozen=True)
class Identity:
    user: str
    role: str = ADMIN
    workspaces: tuple[str, ...] = ()
    local: bool = False  # local mode: no server, every job of this home is this user's to see
    request_id: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def admin(self) -> bool:
        return self.local or self.role == ADMIN

    def can_see(self, job_or_pool: Any) -> bool:
        """A job or pool of another workspace does not exist for a user (404, not 403)."""
        return self.admin or getattr(job_or_pool, "workspace", None) in self.workspaces

    def owns(self, job: Any) -> bool:
        return self.admin or (self.can_see(job) and job.user == self.user)

    def visible_workspaces(self) -> list[str] | None:
        """The workspaces whose jobs a listing shows; None: all (local mode, admins)."""
        return None if self.admin else list(self.workspaces)

    def workspace_for(self, asked: str | None, config: SortieConfig) -> str | None:
        """The workspace a launch goes to: the one asked for (if the identity is in it), else its default.
        None in local mode (no server, no workspaces)."""
        if self.local:
            return None
        known = set(config.workspaces) or {DEFAULT_WORKSPACE}
        if asked is not None:
            if asked not in known:
                raise SortieError(f"--workspace {asked}: no such workspace (ask an admin; see `sortie api info`)")
            if not self.admin and asked not in self.workspaces:
                raise ForbiddenError(f"--workspace {asked}: you are not in workspace {asked} "
                                     f"(yours: {', '.join(self.workspaces) or 'none'})")
            return asked
        if self.workspaces:
            return self.workspaces[0]
        if self.admin:
            return sorted(known)[0]
        raise ForbiddenError("you are in no workspace; ask an admin to add you to one")


def local_identity() -> Identity:
    return Identity(user=os_user(), role=ADMIN, local=True, request_id="local")


def workspaces_of(name: str, own: list[str], config: SortieConfig) -> tuple[str, ...]:
    """A user's workspaces: those given at `users add`, then those of the config naming them; with no workspace
    configured at all, `default`."""
    if not config.workspaces:
        return (DEFAULT_WORKSPACE,)
    found = [w for w in own if w in config.workspaces]
    found += [w for w, ws in config.workspaces.items() if name in ws.users and w not in found]
    return tuple(found)
