"""The agent's GET /watch: numbered changes, kept on disk, a held watch woken by an exit, auth."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.infra.agent_client import AgentError
from orchestrator.node import agent as agent_module
from orchestrator.node import watch as watch_module


def _kinds(events: list[dict], run_id: str) -> list[str]:
    return [e["kind"] for e in events if e["run_id"] == run_id and e["kind"] != "log"]


def _until_exit(client, run_id: str, since: int = 0) -> list[dict]:
    """Every event of the node up to `run_id`'s exit, by watching."""
    seen: list[dict] = []
    deadline = time.monotonic() + 20
    while not any(e["run_id"] == run_id and e["kind"] in ("exited", "cancelled") for e in seen):
        assert time.monotonic() < deadline, seen
        answer = client.watch(since, timeout=5)
        seen += answer["events"]
        since = answer["seq"]
    return seen


def test_watch_reports_start_log_and_exit_in_order(start_agent) -> None:
    agent = start_agent()
    client = agent.client()
    run_id = client.run("echo hello; exit 4")
    events = _until_exit(client, run_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert _kinds(events, run_id) == ["started", "exited"]
    exited = events[-1]
    assert exited["exit_code"] == 4
    logs = [e for e in events if e["kind"] == "log"]
    assert logs and logs[-1]["offset"] == len(b"hello\n")
    assert json.loads((agent.sandbox / "runs" / run_id / "exit.json").read_text())["ended_at"] == exited["ended_at"]


def test_a_held_watch_is_woken_by_an_exit(start_agent) -> None:
    agent = start_agent()
    client = agent.client()
    run_id = client.run("sleep 0.7")
    started = client.watch(0, timeout=5)
    assert _kinds(started["events"], run_id) == ["started"]
    answers: list[tuple[float, dict]] = []
    began = time.monotonic()
    held = threading.Thread(target=lambda: answers.append((time.monotonic(), client.watch(started["seq"], 30))))
    held.start()
    held.join(timeout=20)
    assert answers, "the watch did not return"
    returned_at, answer = answers[0]
    assert _kinds(answer["events"], run_id) == ["exited"]
    assert returned_at - began < 5, "the watch was not woken by the exit (it waited out its timeout)"
    ended_at = answer["events"][-1]["ended_at"]
    assert abs(ended_at - json.loads((agent.sandbox / "runs" / run_id / "exit.json").read_text())["ended_at"]) < 1e-6


def test_an_idle_watch_returns_empty_after_its_timeout(start_agent) -> None:
    agent = start_agent()
    client = agent.client()
    epoch = client.watch(0)["epoch"]
    began = time.monotonic()
    answer = client.watch(0, timeout=0.5, epoch=epoch)
    waited = time.monotonic() - began
    assert answer["events"] == [] and answer["reset"] is False and answer["seq"] == 0
    assert 0.4 <= waited < 5


def test_watch_resumes_from_a_seq_after_an_agent_restart(start_agent) -> None:
    first = start_agent()
    client = first.client()
    one = client.run("exit 1")
    events = _until_exit(client, one)
    seq, epoch = events[-1]["seq"], client.watch(0)["epoch"]
    first.stop()
    second = start_agent(sandbox=first.sandbox, token=first.token)
    client = second.client()
    assert client.watch(seq, timeout=0, epoch=epoch) == {"epoch": epoch, "reset": False, "events": [], "seq": seq}
    two = client.run("exit 2")
    after = _until_exit(client, two, since=seq)
    assert after[0]["seq"] == seq + 1, "sequence numbers must go on across a restart"
    assert _kinds(after, two) == ["started", "exited"] and after[-1]["exit_code"] == 2
    replay = client.watch(0, timeout=0, epoch=epoch)["events"]  # the journal on disk still has the first run
    assert _kinds(replay, one) == ["started", "exited"]


def test_a_watcher_from_another_journal_or_too_far_behind_is_told_to_reset(start_agent, monkeypatch) -> None:
    monkeypatch.setattr(watch_module, "WATCH_KEEP", 4)
    journal = agent_module.WatchJournal(start_agent().sandbox)  # the journal itself, without a server
    for index in range(10):
        journal.record("log", "r", offset=index)
    assert journal.since(2, 0) == ([], 10, True)  # events 3..6 are gone
    events, seq, reset = journal.since(6, 0)
    assert (reset, seq, [e["seq"] for e in events]) == (False, 10, [7, 8, 9, 10])
    assert journal.since(11, 0) == ([], 10, True)  # ahead: a new node at the same address
    assert journal.since(10, 0, epoch="other") == ([], 10, True)
    assert len((journal.path).read_text().splitlines()) <= 2 * 4 + 1  # compacted
    again = agent_module.WatchJournal(journal.path.parent)
    assert (again.seq, again.epoch) == (10, journal.epoch)


def test_watch_refuses_without_the_token_and_bad_numbers(start_agent) -> None:
    agent = start_agent()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        req = urllib.request.Request(f"{agent.url}/watch?since=0&timeout=0", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 401
    with pytest.raises(AgentError) as bad:
        agent.client()._request("GET", "/watch?since=x")
    assert bad.value.status == 400 and "since" in str(bad.value)


def test_watch_refuses_a_timeout_that_is_not_a_finite_number(start_agent) -> None:
    """Issue 28: `timeout=nan` held a thread spinning on a condition that returned at once, for ever (the request
    never came back); infinities and negatives are refused the same way, a large finite one is capped."""
    agent = start_agent()
    client = agent.client()
    for bad in ("nan", "NaN", "inf", "-inf", "-1", "1e999"):
        with pytest.raises(AgentError) as refused:
            client._request("GET", f"/watch?since=0&timeout={bad}", timeout=5)
        assert refused.value.status == 400 and "finite" in str(refused.value), bad
    started = time.monotonic()
    assert client._request("GET", "/watch?since=0&timeout=0.2", timeout=5)[0]
    assert time.monotonic() - started < 4
    assert client.health()["status"] == "ok"


def test_watch_journal_lives_in_the_sandbox(start_agent) -> None:
    agent = start_agent()
    run_id = agent.client().run("true")
    _until_exit(agent.client(), run_id)
    lines = [json.loads(line) for line in Path(agent.sandbox / "watch.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in lines if e["kind"] != "log"] == ["started", "exited"]
