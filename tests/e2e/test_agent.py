"""The node agent, started directly on a sandbox: auth, runs, logs, exit codes, cancel."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.infra.agent_bundle import local_agent_command, local_agent_env
from orchestrator.infra.agent_client import AgentError


def _raw_get(url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_refuses_missing_or_wrong_token(start_agent) -> None:
    agent = start_agent()
    assert _raw_get(f"{agent.url}/health", {}) == 401
    assert _raw_get(f"{agent.url}/health", {"Authorization": "Bearer wrong"}) == 401
    assert _raw_get(f"{agent.url}/health", {"Authorization": agent.token}) == 401  # no "Bearer "
    assert _raw_get(f"{agent.url}/health", {"Authorization": f"Bearer {agent.token}"}) == 200
    with pytest.raises(AgentError) as err:
        agent.client(token="nope").run("touch should-not-exist")
    assert err.value.status == 401
    assert not list((agent.sandbox / "runs").iterdir())
    assert not (agent.sandbox / "workdir" / "should-not-exist").exists()


def test_runs_command_with_env_and_cwd(start_agent, tmp_path: Path) -> None:
    agent = start_agent()
    client = agent.client()
    run_id = client.run('echo "rank=$SKYPILOT_NODE_RANK"; pwd; echo oops >&2; exit 3',
                        env={"SKYPILOT_NODE_RANK": "1"}, cwd=str(tmp_path / "wd"))
    status = client.wait(run_id, timeout=20)
    assert (status.state, status.exit_code) == ("exited", 3)
    output, next_offset = client.log(run_id)
    assert output.decode().splitlines() == ["rank=1", str(tmp_path / "wd"), "oops"]
    assert next_offset == len(output)
    rest, same = client.log(run_id, offset=len(b"rank=1\n"))
    assert rest.decode().startswith(str(tmp_path / "wd")) and same == next_offset


def test_default_cwd_is_sandbox_workdir_and_token_not_inherited(start_agent) -> None:
    agent = start_agent()
    client = agent.client()
    run_id = client.run('pwd; echo "token=${SORTIE_AGENT_TOKEN:-unset}"; echo "sandbox=$SORTIE_NODE_SANDBOX"')
    assert client.wait(run_id, timeout=20).exit_code == 0
    lines = client.log(run_id)[0].decode().splitlines()
    assert lines == [str(agent.sandbox / "workdir"), "token=unset", f"sandbox={agent.sandbox}"]


def test_cancel_kills_the_whole_process_group(start_agent) -> None:
    agent = start_agent()
    client = agent.client()
    run_id = client.run("sleep 300 & echo $! > child.pid; wait")
    pid_file = agent.sandbox / "workdir" / "child.pid"
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child = int(pid_file.read_text())
    status = client.cancel(run_id)
    assert status.state == "cancelled"
    assert status.exit_code is not None and status.exit_code != 0
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not Path(f"/proc/{child}").exists(), "the background child of a cancelled run survived"


def test_logs_and_exit_codes_survive_an_agent_restart(start_agent) -> None:
    first = start_agent()
    client = first.client()
    run_id = client.run("echo persisted; exit 7")
    assert client.wait(run_id, timeout=20).exit_code == 7
    first.stop()
    second = start_agent(sandbox=first.sandbox, token=first.token)
    status = second.client().status(run_id)
    assert (status.state, status.exit_code) == ("exited", 7)
    assert second.client().log(run_id)[0] == b"persisted\n"
    assert json.loads((first.sandbox / "runs" / run_id / "exit.json").read_text())["exit_code"] == 7


def test_bad_requests_are_refused_with_a_reason(start_agent) -> None:
    agent = start_agent()
    client = agent.client()
    with pytest.raises(AgentError, match="command") as err:
        client.run("   ")
    assert err.value.status == 400
    client.wait(client.run("true", run_id="fixed-id"), timeout=20)
    with pytest.raises(AgentError, match="already exists"):
        client.run("true", run_id="fixed-id")
    with pytest.raises(AgentError) as missing:
        client.status("no-such-run")
    assert missing.value.status == 404


def test_unreachable_agent_is_a_clear_error(start_agent) -> None:
    agent = start_agent()
    client = agent.client()
    agent.stop()
    with pytest.raises(AgentError, match="unreachable"):
        client.health()


def test_agent_requires_a_token(tmp_path: Path) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "SORTIE_AGENT_TOKEN"}
    proc = subprocess.run([*local_agent_command(), "--sandbox", str(tmp_path / "s")], env=local_agent_env(env),
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode != 0
    assert "token is required" in proc.stderr


def test_uploads_land_in_workdir_home_and_confined_mounts(start_agent, tmp_path: Path) -> None:
    agent = start_agent()
    client = agent.client()
    src = tmp_path / "project"
    (src / "pkg").mkdir(parents=True)
    (src / "train.py").write_text("print('hi')\n")
    (src / "pkg" / "data.txt").write_text("42\n")
    assert client.upload(str(src), ".") == str(agent.sandbox / "workdir")
    assert (agent.sandbox / "workdir" / "pkg" / "data.txt").read_text() == "42\n"
    client.upload(str(src / "train.py"), "~/bin/train.py")
    assert (agent.sandbox / "home" / "bin" / "train.py").read_text() == "print('hi')\n"
    # Re-uploading replaces: a file removed locally is gone on the node too.
    (src / "pkg" / "data.txt").unlink()
    client.upload(str(src), ".")
    assert not (agent.sandbox / "workdir" / "pkg" / "data.txt").exists()
    run_id = client.run("cat train.py")
    assert client.wait(run_id, timeout=20).exit_code == 0
    assert client.log(run_id)[0] == b"print('hi')\n"


def test_the_zipapp_agent_serves_runs(tmp_path: Path) -> None:
    """What a cloud node runs: `python3 agent.pyz` (isolated from this checkout), serving a run end to end."""
    import signal
    import subprocess
    import sys

    from orchestrator.infra.agent_bundle import agent_zipapp
    from orchestrator.infra.agent_client import AgentClient

    pyz = tmp_path / "agent.pyz"
    pyz.write_bytes(agent_zipapp())
    sandbox = tmp_path / "sandbox"
    proc = subprocess.Popen([sys.executable, "-I", str(pyz), "--sandbox", str(sandbox), "--token-stdin"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=tmp_path, start_new_session=True)
    assert proc.stdin is not None
    proc.stdin.write(b"zip-token\n")
    proc.stdin.close()
    try:
        deadline = time.monotonic() + 15
        while not (sandbox / "agent.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the zipapp agent did not start"
            time.sleep(0.02)
        client = AgentClient(f"http://127.0.0.1:{json.loads((sandbox / 'agent.json').read_text())['port']}",
                             "zip-token")
        assert client.health()["status"] == "ok"
        assert client.start("echo from-the-zipapp", "zip-run")
        assert client.wait("zip-run", timeout=30).exit_code == 0
        assert client.log("zip-run")[0] == b"from-the-zipapp\n"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def test_a_stopping_agent_says_so_rather_than_report_the_exits_of_runs_it_kills(start_agent) -> None:
    """A node going away (the agent's SIGTERM, as a preempted VM's shutdown) kills its runs; over a connection kept
    alive from before, the agent answers 503 rather than an exit code that is no exit of the run's (issue 15: the
    controller's polls reuse connections, and a 143 taken for the run's own failure would end a preempted job)."""
    import http.client
    import signal

    agent = start_agent()
    run_id = agent.client().run("trap '' TERM; sleep 60")  # outlives the SIGTERM: the agent waits out its grace
    connection = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    headers = {"Authorization": f"Bearer {agent.token}"}

    def ask() -> tuple[int, dict]:
        connection.request("GET", f"/runs/{run_id}", headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())

    assert ask()[0] == 200
    agent.proc.send_signal(signal.SIGTERM)
    answers = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and agent.proc.poll() is None:
        try:
            answers.append(ask())
        except (OSError, http.client.HTTPException):
            break
        time.sleep(0.05)
    assert answers and answers[-1] == (503, {"error": "the node is shutting down"}), answers
    assert all(status == 503 or body["state"] == "running" for status, body in answers), answers
