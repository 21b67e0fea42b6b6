"""Unit tests only: a new SQLite state database starts as a copy of one migrated once per session (the real
migrations, run by the `migrated_template` fixture), not by running every migration again (about a second each,
hundreds of times). A database at an older revision (tests/unit/test_migration_in_flight.py) still goes through
Alembic; the end-to-end tests (tests/e2e/test_state.py) and every CLI process migrate for real."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect

import state.db


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("migrated-template")
    engine = state.db.make_engine(f"sqlite:///{home / 'state.db'}")
    state.db.migrate(engine, home)
    assert state.db._current_revision(engine) == state.db.HEAD_REVISION
    engine.dispose()
    return home / "state.db"


def _from_template(template: Path, real: Callable[[Engine], None]) -> Callable[[Engine], None]:
    def upgrade(engine: Engine) -> None:
        if engine.dialect.name != "sqlite":
            return real(engine)
        with engine.connect() as conn:
            if inspect(conn).get_table_names():  # not a new database: migrate it for real
                fresh = False
            else:
                fresh = True
                with sqlite3.connect(template) as source:
                    source.backup(conn.connection.dbapi_connection)  # type: ignore[arg-type]
        if not fresh:
            real(engine)
        return None

    return upgrade


@pytest.fixture(autouse=True)
def _new_databases_from_the_template(migrated_template: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state.db, "_upgrade", _from_template(migrated_template, state.db._upgrade))
