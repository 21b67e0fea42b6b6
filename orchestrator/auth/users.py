"""The API server's users and tokens (issue 23): `sortie users ...` and the server's authenticator.

A token is `sortie_` and 43 random URL-safe characters; the state keeps only its SHA-256. A token shaped like a JWT
(three base64url parts) is an OIDC token when the server's config has `api.oidc` (`orchestrator.auth.oidc`)."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.auth.identity import ADMIN, ROLES, Identity, UnauthorizedError, workspaces_of
from orchestrator.config import write_private
from orchestrator.errors import UsageError
from state.machine import TransitionError
from state.user_transitions import Audit

if TYPE_CHECKING:
    from orchestrator.config import SortieConfig
    from state.store import StateStore

USER_NAME = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
TOKEN_PREFIX = "sortie_"
MAX_TOKEN = 4096
MIN_GIVEN_TOKEN = 32  # a platform's own admin token: long enough not to be guessed
ADMIN_TOKEN_FILE_ENV = "SORTIE_ADMIN_TOKEN_FILE"  # stacks/api_deployment.py mounts it in the server's pods
FIRST_ADMIN = "admin"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def given_admin_token(path: Path) -> str:
    """The first admin's token from the platform's file (`$SORTIE_ADMIN_TOKEN_FILE`), or one line saying what is
    wrong with it."""
    try:
        token = path.read_text(errors="strict")[:MAX_TOKEN + 2].strip()
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"${ADMIN_TOKEN_FILE_ENV}: cannot read {path}: {exc}") from None
    if not MIN_GIVEN_TOKEN <= len(token) <= MAX_TOKEN or any(c.isspace() for c in token):
        raise UsageError(f"${ADMIN_TOKEN_FILE_ENV}: {path} must hold one token of {MIN_GIVEN_TOKEN} to {MAX_TOKEN} "
                         "characters, no spaces (e.g. one `sortie users token rotate` printed)")
    return token


def admin_token_path(home: Path) -> Path:
    return home / "secrets" / "admin.token"


@dataclass(frozen=True)
class UserView:
    name: str
    role: str
    workspaces: list[str]
    service_account: bool
    created_at: float


class Users:
    """Users and tokens of one server home (its state store and config)."""

    def __init__(self, store: StateStore, config: SortieConfig) -> None:
        self.store, self.config = store, config

    def _check(self, name: str, role: str, workspaces: list[str]) -> None:
        if not USER_NAME.match(name):
            raise UsageError(f"user name {name!r}: lowercase letters, digits, '.', '_' and '-', starting with a "
                             "letter, at most 64 characters")
        if role not in ROLES:
            raise UsageError(f"--role {role}: use admin or user")
        unknown = [w for w in workspaces if w not in self.config.workspaces]
        if unknown:
            known = ", ".join(self.config.workspaces) or "none configured"
            raise UsageError(f"--workspace {unknown[0]}: not a workspace of the server's config (workspaces: {known})")

    def add(self, name: str, *, role: str = "user", workspaces: list[str] | None = None, service_account: bool = False,
            expires_in: float | None = None, audit: Audit, token: str | None = None) -> str:
        """The new user's token (shown once; only its hash is kept): a new one, or `token` where the platform gives
        it (the first admin's, `$SORTIE_ADMIN_TOKEN_FILE`)."""
        self._check(name, role, workspaces or [])
        token = token or new_token()
        try:
            self.store.add_api_user(name, role=role, workspaces=list(workspaces or []),
                                    service_account=service_account, token_hash=token_hash(token),
                                    expires_at=time.time() + expires_in if expires_in else None, audit=audit)
        except TransitionError:
            raise UsageError(f"user {name!r} exists; `sortie users token rotate {name}` gives a new token") from None
        return token

    def remove(self, name: str, audit: Audit) -> None:
        try:
            self.store.remove_api_user(name, audit=audit)
        except TransitionError:
            raise UsageError(f"no user {name!r}; see `sortie users ls`") from None

    def set_role(self, name: str, role: str, audit: Audit) -> None:
        if role not in ROLES:
            raise UsageError(f"role {role}: use admin or user")
        try:
            self.store.set_api_role(name, role, audit=audit)
        except TransitionError:
            raise UsageError(f"no user {name!r}; see `sortie users ls`") from None

    def rotate(self, name: str, audit: Audit, expires_in: float | None = None) -> str:
        token = new_token()
        try:
            self.store.rotate_api_token(name, token_hash(token), time.time() + expires_in if expires_in else None,
                                        audit=audit)
        except TransitionError:
            raise UsageError(f"no user {name!r}; see `sortie users ls`") from None
        return token

    def list(self) -> list[UserView]:
        return [UserView(u.name, u.role, list(workspaces_of(u.name, u.workspaces, self.config)), u.service_account,
                         u.created_at) for u in self.store.api_users()]

    def ensure_first_admin(self, home: Path) -> Path | None:
        """At the first `api start` (no admin yet): the admin, its token in `<home>/secrets/admin.token` (0600); or,
        where `$SORTIE_ADMIN_TOKEN_FILE` names a file (a Kubernetes Secret mounted in a pod whose home does not
        last), the token that file holds, adopted (its file is returned, nothing is written)."""
        if any(u.role == ADMIN for u in self.store.api_users()):
            return None
        given = os.environ.get(ADMIN_TOKEN_FILE_ENV, "").strip()
        if given:
            path = Path(given)
            self.add(FIRST_ADMIN, role=ADMIN, audit=Audit(FIRST_ADMIN, "api-start"), token=given_admin_token(path))
            return path
        token = self.add(FIRST_ADMIN, role=ADMIN, audit=Audit(FIRST_ADMIN, "api-start"))
        path = admin_token_path(home)
        write_private(path, token + "\n")
        return path

    def authenticate(self, token: str | None, request_id: str) -> Identity:
        """The identity of a bearer token; `UnauthorizedError` (401) for a missing, unknown, revoked or expired one."""
        if not token:
            raise UnauthorizedError("a token is required (Authorization: Bearer TOKEN; see `sortie api login`)")
        if len(token) > MAX_TOKEN:
            raise UnauthorizedError("the token is too long")
        if not token.startswith(TOKEN_PREFIX) and self.config.api.oidc:
            from orchestrator.auth.oidc import looks_like_jwt

            if looks_like_jwt(token):
                return self._oidc(token, request_id)
        row = self.store.token_owner(token_hash(token))
        if row is None:
            raise UnauthorizedError("the token is not valid (unknown, revoked or expired); ask an admin for a new one")
        return Identity(user=row.name, role=row.role, workspaces=workspaces_of(row.name, row.workspaces, self.config),
                        request_id=request_id)

    def _oidc(self, token: str, request_id: str) -> Identity:
        """A platform's OIDC token (`orchestrator.auth.oidc`): its user, its groups' role and workspaces."""
        from orchestrator.auth import oidc

        try:
            found = oidc.verify_oidc_token(token, oidc.OidcConfig.from_mapping(self.config.api.oidc))
        except oidc.OidcError as exc:
            raise UnauthorizedError(f"OIDC token refused: {exc}") from None
        own = [w for w in found.workspaces if w in self.config.workspaces]
        return Identity(user=found.user, role=found.role, workspaces=workspaces_of(found.user, own, self.config),
                        request_id=request_id)
