"""The named transitions of the API server's users and tokens (issue 23), and their reads, held by `StateStore`.
Each change is one transaction with its audit event (`audit_events`) in that same transaction; a change of a row
that is not there (or is already there) is a `TransitionError`. Tokens are stored only as SHA-256 hashes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, update

from state.machine import TransitionError
from state.models import ApiTokenRow, ApiUserRow, AuditRow
from state.transitions import TRANSITION_MARK, rowcount

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.orm import Session


@dataclass(frozen=True)
class Audit:
    """Who makes a change and in which request: written as the change's audit event."""

    user: str
    request_id: str
    workspace: str | None = None


def audit_event(session: Session, audit: Audit, action: str, target: str, detail: str | None = None) -> None:
    session.info[TRANSITION_MARK] = True
    session.add(AuditRow(at=time.time(), user=audit.user[:64], request_id=audit.request_id[:64], action=action,
                         target=target[:255], workspace=audit.workspace, detail=detail))


class UserTransitions:
    """The users' and tokens' transitions and reads, each one transaction of a session from `sessions`
    (`StateStore` holds one and forwards its methods)."""

    def __init__(self, sessions: Callable[[], Session]) -> None:
        self.session = sessions

    def add_api_user(self, name: str, *, role: str, workspaces: list[str], service_account: bool, token_hash: str,
                     expires_at: float | None, audit: Audit) -> None:
        now = time.time()
        with self.session() as session, session.begin():
            if session.get(ApiUserRow, name) is not None:
                raise TransitionError(f"user {name!r} exists")
            session.add(ApiUserRow(name=name, role=role, workspaces=workspaces, service_account=service_account,
                                   created_at=now))
            session.add(ApiTokenRow(user=name, token_hash=token_hash, created_at=now, expires_at=expires_at))
            kind = "service account" if service_account else "user"
            audit_event(session, audit, "user added", name, f"{kind}, role {role}, workspaces {workspaces or '-'}")

    def remove_api_user(self, name: str, *, audit: Audit) -> None:
        """The user goes, and every token of theirs is revoked in the same transaction."""
        now = time.time()
        with self.session() as session, session.begin():
            if rowcount(session.execute(delete(ApiUserRow).where(ApiUserRow.name == name))) != 1:
                raise TransitionError(f"no user {name!r}")
            session.execute(update(ApiTokenRow).where(ApiTokenRow.user == name, ApiTokenRow.revoked_at.is_(None))
                            .values(revoked_at=now))
            audit_event(session, audit, "user removed", name)

    def set_api_role(self, name: str, role: str, *, audit: Audit) -> None:
        with self.session() as session, session.begin():
            if rowcount(session.execute(update(ApiUserRow).where(ApiUserRow.name == name).values(role=role))) != 1:
                raise TransitionError(f"no user {name!r}")
            audit_event(session, audit, "user role", name, role)

    def rotate_api_token(self, name: str, token_hash: str, expires_at: float | None, *, audit: Audit) -> None:
        """The user's tokens are revoked and the new one takes their place, in one transaction."""
        now = time.time()
        with self.session() as session, session.begin():
            if session.get(ApiUserRow, name) is None:
                raise TransitionError(f"no user {name!r}")
            session.execute(update(ApiTokenRow).where(ApiTokenRow.user == name, ApiTokenRow.revoked_at.is_(None))
                            .values(revoked_at=now))
            session.add(ApiTokenRow(user=name, token_hash=token_hash, created_at=now, expires_at=expires_at))
            audit_event(session, audit, "token rotated", name)

    def record_audit(self, audit: Audit, action: str, target: str, detail: str | None = None) -> None:
        with self.session() as session, session.begin():
            audit_event(session, audit, action, target, detail)

    # --- reads ------------------------------------------------------------------------------------------

    def api_user(self, name: str) -> ApiUserRow | None:
        with self.session() as session:
            return session.get(ApiUserRow, name)

    def api_users(self) -> list[ApiUserRow]:
        with self.session() as session:
            return list(session.scalars(select(ApiUserRow).order_by(ApiUserRow.name)))

    def token_owner(self, token_hash: str, now: float | None = None) -> ApiUserRow | None:
        """The user of a live token (not revoked, not expired, its user not removed), or None."""
        now = now or time.time()
        with self.session() as session:
            token = session.scalar(select(ApiTokenRow).where(ApiTokenRow.token_hash == token_hash))
            if token is None or token.revoked_at is not None or (token.expires_at and token.expires_at <= now):
                return None
            return session.get(ApiUserRow, token.user)

    def audit_events(self, limit: int = 100) -> list[AuditRow]:
        with self.session() as session:
            return list(session.scalars(select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)))[::-1]
