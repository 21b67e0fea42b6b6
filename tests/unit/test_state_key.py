"""Every controller sharing the state gets its key (issue 17, item 6): a cloud controller VM through the same
secret channel as the DB URL; a controller whose key opens nothing says so at start, not per job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import SortieConfig
from orchestrator.infra import clouds
from state.key_check import state_key_problem
from state.secrets_box import STATE_KEY_ENV, SecretsBox
from state.store import StateStore


def _homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, int]:
    """Two homes, one state DB (as with a shared PostgreSQL), separate keys; home A submits a job with a secret."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    monkeypatch.setenv("SORTIE_DB_URL", f"sqlite:///{tmp_path / 'shared.db'}")
    monkeypatch.delenv(STATE_KEY_ENV, raising=False)
    store = StateStore(first)
    (job_id,) = store.submit({"name": "j", "tasks": [{"name": "t", "run": "true", "resources": [{}]}]},
                             [{"TOKEN": "s3cr3t"}], user="u")
    return first, second, job_id


def test_a_controller_with_another_key_is_told_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second, _job = _homes(tmp_path, monkeypatch)
    assert state_key_problem(StateStore(first)) is None
    problem = state_key_problem(StateStore(second))
    assert problem is not None and "cannot be decrypted" in problem and STATE_KEY_ENV in problem
    done = subprocess.run([sys.executable, "-m", "orchestrator.controller.daemon"], capture_output=True, text=True,
                          timeout=60, env={**__import__("os").environ, "SORTIE_HOME": str(second)})
    assert done.returncode == 1 and "cannot be decrypted" in done.stdout, done.stdout + done.stderr
    monkeypatch.setenv(STATE_KEY_ENV, SecretsBox(first).key)  # the same key, given as the VM gets it
    assert state_key_problem(StateStore(second)) is None
    assert StateStore(second).secrets(StateStore(second).list_jobs()[0]) == [{"TOKEN": "s3cr3t"}]


def test_the_controller_vm_gets_the_key_with_the_db_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.deploy.remote import controller_program

    monkeypatch.delenv(STATE_KEY_ENV, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setattr(clouds, "_has_sdk", lambda cloud: True)
    config = SortieConfig.model_validate({"jobs": {"controller": {"infra": "aws"}},
                                          "state": {"url": "postgresql://sortie@db.invalid/sortie"}})
    program, _ = controller_program(config, tmp_path)
    lines = program.spec.token.splitlines()  # the secret environment of the VM (a Pulumi secret)
    assert "SORTIE_DB_URL=postgresql://sortie@db.invalid/sortie" in lines
    assert f"{STATE_KEY_ENV}={SecretsBox(tmp_path).key}" in lines
    assert SecretsBox(tmp_path).key not in repr(program.spec)  # the token field is repr=False
