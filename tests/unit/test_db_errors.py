"""Database errors during launch/cancel are one line, never the SQL and its parameters (issue 17, Low)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from sqlalchemy.exc import OperationalError

from state.db_errors import describe_db_error


def test_describe_names_the_condition_in_one_line() -> None:
    def err(text: str) -> OperationalError:
        return OperationalError("INSERT INTO jobs (spec) VALUES (?)", ({"secret": "x"},),
                                sqlite3.OperationalError(text))

    assert describe_db_error(err("attempt to write a readonly database"), "/h/state.db") == (
        "the state database is read-only (/h/state.db); make it writable, or point SORTIE_DB_URL elsewhere")
    assert "disk is full" in describe_db_error(err("database or disk is full"), "/h/state.db")
    assert "busy" in describe_db_error(err("database is locked"), "/h/state.db")
    for text in ("attempt to write a readonly database", "database or disk is full", "something else"):
        line = describe_db_error(err(text), "/h/state.db")
        assert "\n" not in line and "INSERT" not in line and "secret" not in line


def test_a_read_only_state_db_makes_launch_fail_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "SORTIE_HOME": str(home)}
    sortie = [sys.executable, "-m", "cli.main"]
    subprocess.run([*sortie, "jobs", "queue"], env=env, check=True, capture_output=True, timeout=60)  # makes the DB
    env["SORTIE_DB_URL"] = f"sqlite:///file:{home / 'state.db'}?mode=ro&uri=true"
    done = subprocess.run([*sortie, "jobs", "launch", "-y", "-d", "echo hi"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "read-only" in lines[0], done.stderr
    assert "INSERT" not in done.stderr and "echo hi" not in done.stderr
