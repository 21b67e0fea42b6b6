"""A real PostgreSQL server for tests, and a fresh database for each test.

The server is $SORTIE_TEST_PG_URL (CI exports it), or else the throwaway one `.ci/postgres.sh` starts
(installing PostgreSQL from Debian if need be), run once per session, so that a plain `make test`
exercises PostgreSQL too.

Use it from a test module with `pytest_plugins = ["tests.support.pg"]` and the fixture `pg_database_url`: the
URL of a database made for the test (`sortie_t_<random>`), dropped after it. With no server, tests
that need one are skipped, saying why; with $CI or $SORTIE_REQUIRE_PG set they fail instead, and so
they do when $SORTIE_TEST_PG_URL names a server that does not answer.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "postgres.sh"
URL_ENV = "SORTIE_TEST_PG_URL"
DB_PREFIX = "sortie_t_"


def pg_required() -> bool:
    """True when a missing server must fail the tests rather than skip them (CI)."""
    return any(os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")
               for name in ("CI", "SORTIE_REQUIRE_PG"))


def _start_server() -> tuple[str | None, str]:
    try:
        run = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{SCRIPT.relative_to(ROOT)} could not run: {exc}"
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        why = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"{SCRIPT.relative_to(ROOT)} exited {run.returncode}: {why}"
    return lines[-1].strip(), ""


@functools.cache
def _server() -> tuple[str | None, str]:
    """(URL, "") of a server that answers, or (None, why not). Once per session."""
    url = os.environ.get(URL_ENV, "").strip()
    explicit = bool(url)
    if not explicit:
        url, why = _start_server()
        if url is None:
            return None, why
    try:
        with _admin_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        shown = make_url(url).render_as_string(hide_password=True)
        why = f"{shown} does not answer: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        return None, f"${URL_ENV}={why}" if explicit else why
    return url, ""


@functools.cache
def _admin_engine(url: str) -> Engine:
    # AUTOCOMMIT: CREATE/DROP DATABASE cannot run inside a transaction.
    return create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)


def pg_url() -> str | None:
    """The server's URL, or None when there is none (see `require_pg_url`)."""
    return _server()[0]


def require_pg_url() -> str:
    """The server's URL; else skip the test (fail it under CI, or when $SORTIE_TEST_PG_URL was given)."""
    url, why = _server()
    if url is None:
        message = f"no PostgreSQL server for the tests: {why}"
        if pg_required() or os.environ.get(URL_ENV, "").strip():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return url


def drop_database(name: str) -> None:
    """Drop a test database, ending the connections still open on it first."""
    admin = _admin_engine(require_pg_url())
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database on the server, dropped on exit. Yields its URL."""
    base = require_pg_url()
    name = f"{DB_PREFIX}{uuid.uuid4().hex[:16]}"
    with _admin_engine(base).connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        drop_database(name)


@pytest.fixture
def pg_database_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database for this test alone."""
    with fresh_database() as url:
        yield url
