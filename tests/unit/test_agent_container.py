"""The agent's container mode against a stand-in engine that records its calls (the real engine is exercised by
`tests/e2e/test_containers_e2e.py`): registry login on stdin, env passed by name only, the container started once,
a failure to start is a failed run saying why."""

from __future__ import annotations

import json
import time
from pathlib import Path

from orchestrator.node.agent import Agent
from orchestrator.node.container import Container

FAKE_ENGINE = """#!/bin/bash
# Records each call (argv, and stdin for login); `exec` runs the command on the host instead.
printf '%s\\n' "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$@")" >> "$CALLS"
case "$1" in
  login) cat > "$CALLS.stdin"; [ "$FAIL_LOGIN" = 1 ] && exit 1; exit 0 ;;
  run) [ "$FAIL_RUN" = 1 ] && { echo "Error: image not known" >&2; exit 125; }; echo cid; exit 0 ;;
  exec) while [ "$1" != "/bin/sh" ]; do shift; done; exec "$@" ;;
  *) exit 0 ;;
esac
"""


def _agent(tmp_path: Path, monkeypatch, **env: str) -> tuple[Agent, Path]:
    engine = tmp_path / "engine"
    # the calls file is written into the stand-in itself: a run's environment is scrubbed to the task's own
    engine.write_text(FAKE_ENGINE.replace('"$CALLS', f'"{tmp_path / "calls"}'))
    engine.chmod(0o755)
    calls = tmp_path / "calls"
    monkeypatch.setenv("CALLS", str(calls))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    agent = Agent(tmp_path / "sandbox", "tok", "node-1",
                  container={"engine": str(engine), "image": "reg.example.com/me/img:1", "options": ["--shm-size=8g"]})
    return agent, calls


def _wait(agent: Agent, run_id: str) -> dict:
    deadline = time.monotonic() + 20
    while (status := agent.status(run_id))["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return status


def test_runs_go_into_one_container_with_env_by_name_and_login_on_stdin(tmp_path: Path, monkeypatch) -> None:
    agent, calls = _agent(tmp_path, monkeypatch)
    env = {"SKYPILOT_DOCKER_USERNAME": "me", "SKYPILOT_DOCKER_PASSWORD": "hunter2-pw",
           "SKYPILOT_DOCKER_SERVER": "reg.example.com", "GREETING": "hi"}
    first = agent.start_run('echo "$GREETING"', env, None, "setup-0")
    assert _wait(agent, first)["exit_code"] == 0
    second = agent.start_run("echo again", env, None, "run-0")
    assert _wait(agent, second)["exit_code"] == 0
    log = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [c[0] for c in log] == ["login", "rm", "run", "exec", "exec"]  # started once, for both runs
    assert log[0] == ["login", "--username", "me", "--password-stdin", "reg.example.com"]
    assert (tmp_path / "calls.stdin").read_text() == "hunter2-pw"
    assert not any("hunter2-pw" in part for call in log for part in call)  # never in a process's arguments
    run = log[2]
    assert run[run.index("--name") + 1] == "sortie-node-1" and "--shm-size=8g" in run
    assert "reg.example.com/me/img:1" in run and run[run.index("--network") + 1] == "host"
    exec_call = log[3]
    assert "-e" in exec_call and "GREETING" in exec_call and not any("=hi" in p for p in exec_call)
    assert agent.read_log(first, 0).decode().strip() == "hi"
    agent.shutdown_runs()
    assert json.loads(calls.read_text().splitlines()[-1])[:2] == ["rm", "-f"]  # the container goes with the agent


def test_a_container_that_cannot_start_fails_the_run_saying_why(tmp_path: Path, monkeypatch) -> None:
    agent, _calls = _agent(tmp_path, monkeypatch, FAIL_RUN="1")
    run = agent.start_run("echo never", {}, None, "setup-0")
    assert _wait(agent, run)["exit_code"] == 125
    assert "cannot start a container of reg.example.com/me/img:1: Error: image not known" in \
        agent.read_log(run, 0).decode()


def test_the_container_sees_the_run_directories_never_the_agents_records(tmp_path: Path, monkeypatch) -> None:
    agent, calls = _agent(tmp_path, monkeypatch)
    run = agent.start_run("echo $$", {}, None, "run-0")
    assert _wait(agent, run)["exit_code"] == 0
    started = next(c for c in map(json.loads, calls.read_text().splitlines()) if c[0] == "run")
    sandbox = tmp_path / "sandbox"
    bound = [started[i + 1].split(":")[0] for i, part in enumerate(started) if part == "-v"]
    assert str(sandbox / "workdir") in bound and str(sandbox / "run-pids") in bound
    assert str(sandbox) not in bound and not any(b.startswith(str(sandbox / "runs")) for b in bound)
    # the run's shell pid is recorded where the run may write, not among the agent's records
    assert (sandbox / "run-pids" / "run-0").read_text().strip().isdigit()
    assert not (sandbox / "runs" / "run-0" / "container.pid").exists()
    assert "--user" not in " ".join(started)  # no node user here (not confined): the engine's default user
    agent.shutdown_runs()


def test_with_a_node_user_the_container_is_that_user_without_capabilities(tmp_path: Path) -> None:
    container = Container("/usr/bin/podman", "img:1", ["--shm-size=1g"], "node-1", tmp_path, tmp_path / "workdir")
    assert container.confinement() == []
    container.user = (1900000007, 1900000007)
    assert container.confinement() == ["--user=1900000007:1900000007", "--cap-drop=all",
                                       "--security-opt=no-new-privileges"]


def test_a_pid_file_swapped_for_a_link_is_not_followed(tmp_path: Path, monkeypatch) -> None:
    agent, calls = _agent(tmp_path, monkeypatch)
    assert agent.container is not None
    secret = tmp_path / "secret"
    secret.write_text("4242\n")
    agent.container.pids.mkdir(exist_ok=True)
    agent.container.pid_file("run-9").symlink_to(secret)
    agent.container.signal(agent.container.pid_file("run-9"), "TERM")
    assert not calls.exists() or "4242" not in calls.read_text()  # the link was not read: nothing signalled
