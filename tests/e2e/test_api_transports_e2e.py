"""Issue 23: the same CLI scenario in local mode (in-process services) and through the API server (the HTTP
transport) prints the same thing: launch (plan, dry runs, refusals), queue (table and JSON), logs, events, cancel, a
pipeline, and the one-line errors with their exit codes. Only times, durations and the user name may differ."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.e2e import Sortie, write
from tests.support.team import SERVER_CONFIG, Team

pytestmark = pytest.mark.e2e
LOCAL_CONFIG = SERVER_CONFIG.split("workspaces:")[0]


def normal(text: str, user: str, tmp: Path) -> str:
    text = re.sub(rf"\b{re.escape(user)}\b", "USER", text.replace(str(tmp), "TMP"))
    text = re.sub(r"\d\d:\d\d:\d\d", "T", text)
    text = re.sub(r"(a few secs|\d+ (secs?|mins?|hrs?)) ago", "AGO", text)
    text = re.sub(r"\b(\d+h )?(\d+m )?\d+s\b", "DUR", text)
    text = re.sub(r'"(submitted_at|started_at|ended_at|at)": [\d.]+', r'"\1": 0', text)
    text = re.sub(r"sortie-job-\d+-t\d+-\d+", "STACK", text)
    text = re.sub(r"\d+ node\(s\) up in", "N node(s) up in", text)
    return "\n".join(re.sub(r"\s+", " ", line).strip() for line in text.splitlines() if line.strip())


@pytest.fixture
def both(sortie_cli, tmp_path: Path) -> Iterator[tuple[Sortie, Sortie]]:
    team = Team(server=sortie_cli(SERVER_CONFIG), root=tmp_path)
    team.add("alice")
    team.start()
    remote = team.client("alice")
    local = Sortie(tmp_path / "local-home")
    local.home.mkdir()
    (local.home / "config.yaml").write_text(LOCAL_CONFIG)
    try:
        yield local, remote
    finally:
        team.server.run("api", "stop", check=False)
        local.run("controller", "stop", check=False, timeout=180)
        from state.store import StateStore

        assert [s.name for s in StateStore(local.home).live_stacks()] == []


def scenario(sortie: Sortie, tmp_path: Path) -> list[tuple[str, int, str, str]]:
    """Each step: its command, exit code, stdout and stderr."""
    yaml = write(tmp_path, "hello.yaml", "name: hello\nenvs:\n  GREETING: hi\nsetup: echo setting up\n"
                 "run: echo \"$GREETING from $SKYPILOT_NODE_RANK\"\n")
    pipe = write(tmp_path, "pipe.yaml", "name: pipe\n---\nname: one\nrun: echo first\n---\nname: two\n"
                 "run: echo second\n")
    steps = [
        ["jobs", "launch", "--dryrun", yaml],
        ["jobs", "launch", "--dryrun", "--json", yaml],
        ["jobs", "launch", "--dryrun", "--gpus", "H100:8", "--infra", "local", yaml],
        ["jobs", "launch", "-y", yaml],
        ["jobs", "launch", "-y", pipe],
        ["jobs", "queue"],
        ["jobs", "queue", "-a", "--json"],
        ["jobs", "queue", "-s", "SUCCEEDED", "-u"],
        ["jobs", "logs", "--no-follow", "1"],
        ["jobs", "logs", "2", "two"],
        ["jobs", "logs", "-n", "hello"],
        ["jobs", "events", "1"],
        ["jobs", "cancel", "-y", "1"],
        ["jobs", "logs", "--no-follow", "99"],
        ["jobs", "logs", "-n", "nope"],
        ["jobs", "cancel", "-y"],
        ["jobs", "queue", "-s", "NOPE"],
        ["jobs", "endpoints", "1"],
    ]
    found = []
    for args in steps:
        out = sortie.run(*args, check=False, timeout=240)
        found.append((" ".join(args).replace(str(tmp_path), "TMP"), out.returncode, out.stdout, out.stderr))
    return found


def test_every_step_prints_the_same_in_both_transports(both: tuple[Sortie, Sortie], tmp_path: Path) -> None:
    from orchestrator.auth.identity import os_user

    local, remote = both
    here = scenario(local, tmp_path)
    there = scenario(remote, tmp_path)
    differ = []
    for (cmd, code_a, out_a, err_a), (_, code_b, out_b, err_b) in zip(here, there, strict=True):
        mine = (code_a, normal(out_a, os_user(), tmp_path), normal(err_a, os_user(), tmp_path))
        theirs = (code_b, normal(out_b, "alice", tmp_path), normal(err_b, "alice", tmp_path))
        if mine != theirs:
            differ.append((cmd, mine, theirs))
    assert differ == []
    assert any("hi from 0" in out for cmd, _, out, _ in there if cmd.startswith("jobs logs"))
