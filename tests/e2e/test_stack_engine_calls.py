"""Issue 26: the engine processes one stack operation starts, counted on the real engine (a logging `pulumi` in front
of it): a new stack's `up` is `stack init`, `up` and one `stack export`; its `destroy` is one `destroy --remove`.
The outputs, secrets, tags and errors are those the Automation API's own calls gave."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from orchestrator.errors import StackNotFoundError
from orchestrator.infra.engine import require_engine
from stacks.spec import ClusterSpec, StackProgram, new_cluster_token

pytestmark = pytest.mark.e2e


def _logging_engine(driver, tmp_path: Path) -> Path:
    """A root whose bin/pulumi logs each command line, then runs the real engine."""
    real = require_engine().path
    root = tmp_path / "engine"
    (root / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    wrapper = root / "bin" / "pulumi"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    driver.settings = dataclasses.replace(driver.settings, engine_root=str(root))
    return log


def _commands(log: Path) -> list[str]:
    found = []
    for line in log.read_text().splitlines() if log.exists() else []:
        words = [w for w in line.split() if w != "--non-interactive"]
        found.append(" ".join(words[:2]) if words[0] == "stack" else words[0])
    log.unlink(missing_ok=True)
    return found


def test_up_and_destroy_run_three_engine_processes_and_one(make_driver, sortie_home: Path, tmp_path: Path) -> None:
    driver = make_driver("pulumi:\n  stack_tags: {team: ml}\n")
    log = _logging_engine(driver, tmp_path)
    token = new_cluster_token()
    name = "sortie-calls-1-1"
    result = driver.up(name, StackProgram("cluster", ClusterSpec(name=name, token=token)))
    assert _commands(log) == ["stack init", "up", "stack export"]
    assert result.outputs["token"] == token and result.secret_keys == frozenset({"token"})
    assert result.outputs["num_nodes"] == 1 and result.outputs["nodes"][0]["rank"] == 0
    tags = json.loads(subprocess.run([str(require_engine().path), "stack", "tag", "ls", "--json", "--stack", name],
                                     env=driver._env, cwd=sortie_home / "stacks" / name, capture_output=True,
                                     text=True, check=True).stdout)
    assert tags["team"] == "ml" and tags["sortie:owner"] == "sortie" and tags["sortie:kind"] == "cluster"
    again = driver.up(name, StackProgram("cluster", ClusterSpec(name=name, token=token)))  # an existing stack
    assert _commands(log) == ["stack init", "up", "stack export"] and again.outputs == result.outputs
    driver.destroy(name)
    assert _commands(log) == ["destroy"] and driver.list_stacks() == []
    assert not (sortie_home / "stacks" / name).exists()


def test_refresh_of_a_missing_stack_says_so(driver) -> None:
    with pytest.raises(StackNotFoundError, match="sortie-never-2-1 does not exist"):
        driver.refresh("sortie-never-2-1")
    assert driver.list_stacks() == []
