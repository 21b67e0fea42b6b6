"""Database errors in one line (issue 17): never the SQL or its parameters, which may hold a job's spec."""

from __future__ import annotations

from sqlalchemy.exc import SQLAlchemyError

from orchestrator.disk import is_no_space


def describe_db_error(exc: SQLAlchemyError, where: str) -> str:
    """`the state database is read-only (<where>)` and the like; `where` names the database (its safe URL)."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).splitlines()[0] if str(orig or exc) else type(exc).__name__
    lower = text.lower()
    if "readonly" in lower or "read-only" in lower or "read only" in lower:
        return f"the state database is read-only ({where}); make it writable, or point SORTIE_DB_URL elsewhere"
    if is_no_space(exc):
        return f"the state database's disk is full ({where}); free some space"
    if "locked" in lower or "busy" in lower:
        return f"the state database is busy (locked by another process) ({where}); try again"
    if "unable to open" in lower or "could not connect" in lower or "connection" in lower:
        return f"the state database cannot be reached ({where}): {text[:200]}"
    return f"the state database failed ({where}): {type(orig or exc).__name__}: {text[:200]}"
