"""The agent serves a run's log without following a link (issue 28, item 2): a run that can reach its own
`runs/<id>/output.log` and swaps it for a link (or a FIFO) to another file gets a note, never that file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from orchestrator.node.agent import Agent
from orchestrator.node.agent_files import NOT_A_LOG


def _ran(tmp_path: Path) -> tuple[Agent, str, Path]:
    agent = Agent(tmp_path / "sandbox", "tok", "node-1")
    run = agent.start_run("echo hello", {}, None, "run-0")
    deadline = time.monotonic() + 20
    while agent.status(run)["state"] == "running":  # type: ignore[index]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return agent, run, tmp_path / "sandbox" / "runs" / run / "output.log"


def test_a_log_is_served_as_written(tmp_path: Path) -> None:
    agent, run, _log = _ran(tmp_path)
    assert agent.read_log(run, 0) == b"hello\n" and agent.status(run)["log_size"] == 6  # type: ignore[index]


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_log_swapped_for_a_link_or_a_fifo_is_not_followed(tmp_path: Path, kind: str) -> None:
    agent, run, log = _ran(tmp_path)
    secret = tmp_path / "root-only"
    secret.write_text("TOPSECRET\n" * 100)
    secret.chmod(0o600)
    log.unlink()
    if kind == "symlink":
        log.symlink_to(secret)
    else:
        os.mkfifo(log)
    assert agent.read_log(run, 0) == NOT_A_LOG  # at once: neither the file nor a hang on the FIFO
    assert agent.read_log(run, len(NOT_A_LOG)) == b""
    assert agent.status(run)["log_size"] == 0  # type: ignore[index]
    agent._note_log(run)  # the sampler neither
