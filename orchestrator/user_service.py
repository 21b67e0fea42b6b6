"""The users' service on the server's own home (issue 23): what `sortie users ...` and `sortie api audit` call when the
home has no endpoint (local access to the server's state). Through a server, the same commands go to `/api/v1`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.auth.users import Users
    from state.user_transitions import Audit


def local_users() -> tuple[Users, Audit]:
    """The users of this home's state, and the audit identity of a change made on it (`local:<OS user>`)."""
    from orchestrator.auth.identity import os_user
    from orchestrator.auth.users import Users
    from state.store import StateStore
    from state.user_transitions import Audit

    store = StateStore()
    return Users(store, store.config), Audit(f"local:{os_user()}"[:64], "local")


def audit_rows(limit: int) -> list[dict[str, Any]]:
    """The newest `limit` audit events of this home's state, as the API answers them."""
    from state.store import StateStore

    return [{"at": a.at, "user": a.user, "request_id": a.request_id, "action": a.action, "target": a.target,
             "workspace": a.workspace, "detail": a.detail} for a in StateStore().audit_events(limit)]
