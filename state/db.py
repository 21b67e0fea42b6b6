"""Opening the state DB: SQLite in WAL mode under the Sortie home by default, PostgreSQL by URL.

Migrations run through Alembic at open, under a lock (a file lock for SQLite, an advisory lock for
PostgreSQL), and only when the schema is behind: a CLI read costs one small query.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from orchestrator.config import SortieConfig, load_config, sortie_home
from orchestrator.errors import SortieError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
HEAD_REVISION = "0010"  # the newest migration (keep equal to the head: a mismatch upgrades at every open)
_PG_MIGRATION_LOCK = 742_015
# How long a SQLite write waits for the write lock (issue 28: 60 launches at once on a loaded machine queue for it;
# a write transaction takes it first, `BEGIN IMMEDIATE`, and waits its turn rather than failing).
BUSY_TIMEOUT_S = 60


def database_url(home: Path, config: SortieConfig) -> str:
    return os.environ.get("SORTIE_DB_URL") or config.state.url or f"sqlite:///{home / 'state.db'}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


# Issue 28: an execution option on a connection whose transaction will write (a session's explicit `begin()`): on
# SQLite it begins `BEGIN IMMEDIATE`, taking the write lock first (waiting up to the busy timeout for it). A deferred
# transaction that reads, then writes, fails at once with SQLITE_BUSY in WAL mode when another writer committed after
# its read began, whatever the busy timeout: concurrent launches were refused that way.
WRITE_TRANSACTION = "sortie_write_transaction"


def _sqlite_begin(conn: Connection) -> None:
    """pysqlite's own implicit BEGIN is off (`isolation_level=None`); SQLAlchemy's begin emits ours instead."""
    immediate = conn.get_execution_options().get(WRITE_TRANSACTION)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False,
                                                   "isolation_level": None},
                               pool_pre_ping=False)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    try:
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    except ModuleNotFoundError as exc:
        hint = " (pip install 'sortie[postgres]')" if url.startswith("postgresql") else ""
        raise SortieError(f"state DB {safe_url(url)}: the driver {exc.name} is not installed{hint}") from None


def _current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _upgrade(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def migrate(engine: Engine, home: Path) -> None:
    """Bring the schema to the head revision (no-op, one query, when it is there)."""
    if _current_revision(engine) == HEAD_REVISION:
        return
    if engine.dialect.name == "sqlite":
        with (home / "state.migrate.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            if _current_revision(engine) != HEAD_REVISION:
                _upgrade(engine)
    else:
        _upgrade(engine)


def open_engine(home: Path | None = None, config: SortieConfig | None = None) -> Engine:
    home = home or sortie_home()
    config = config or load_config(home)
    url = database_url(home, config)
    try:
        engine = make_engine(url)
        migrate(engine, home)
    except SortieError:
        raise
    except Exception as exc:
        detail = (str(exc).splitlines() or [""])[0]
        raise SortieError(f"state DB {safe_url(url)} is not usable: {type(exc).__name__}: {detail}") from None
    if engine.dialect.name == "sqlite" and engine.url.database:  # issue 17: 0600, even if made with a wider umask
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.chmod(engine.url.database + suffix, 0o600)
    return engine


def safe_url(url: str) -> str:
    """The URL without its password, even when SQLAlchemy cannot parse it."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


class StateSession(Session):
    """A session whose explicit `begin()` opens a write transaction (`BEGIN IMMEDIATE` on SQLite, issue 28), begun
    lazily at its first statement, so the write lock is held no longer than a deferred transaction would hold it;
    its reads, which begin implicitly, stay deferred and never wait for a writer."""

    def begin(self, nested: bool = False) -> SessionTransaction:
        if not nested and isinstance(self.bind, Engine) and self.bind.dialect.name == "sqlite" \
                and not self.in_transaction():
            self.bind = self.bind.execution_options(**{WRITE_TRANSACTION: True})
        return super().begin(nested=nested)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, class_=StateSession, expire_on_commit=False)
