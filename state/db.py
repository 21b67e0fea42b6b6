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

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.config import SortieConfig, load_config, sortie_home
from orchestrator.errors import SortieError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
HEAD_REVISION = "0009"
_PG_MIGRATION_LOCK = 742_015


def database_url(home: Path, config: SortieConfig) -> str:
    return os.environ.get("SORTIE_DB_URL") or config.state.url or f"sqlite:///{home / 'state.db'}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=15000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 15, "check_same_thread": False}, pool_pre_ping=False)
        event.listen(engine, "connect", _sqlite_pragmas)
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


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
