"""The controller's watch hub (orchestrator/controller/node_events.py) against real agents and the agent farm."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from orchestrator.controller.node_events import NodeEvents, NodeWatchers


@dataclass
class FarmServer:
    port: int
    token: str = "farm-token"

    def url(self, index: int, old: bool = False) -> str:
        return f"http://127.0.0.1:{self.port}/{'old' if old else 'n'}/{index}"

    def control(self, action: str, first: int = 0, count: int = 1, code: int = 0) -> float:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/control/{action}?first={first}&count={count}&code={code}", method="POST",
            data=b"")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())["at"]

    def stats(self, first: int = 0, count: int = 1 << 30) -> dict[str, float]:
        """{"held": watches held now, "beats": the fewest heartbeats any of these nodes has answered}."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/control/stats?first={first}&count={count}",
                                     method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())


def start_farm(nodes: int) -> tuple[subprocess.Popen, FarmServer]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.agent_farm", "--nodes", str(nodes)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    assert line, "the agent farm did not start"
    return proc, FarmServer(json.loads(line)["port"])


@pytest.fixture
def farm() -> Iterator[FarmServer]:
    proc, server = start_farm(8)
    yield server
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def hub() -> Iterator[Callable[..., tuple[NodeEvents, threading.Event]]]:
    made: list[NodeEvents] = []

    def factory(**kwargs: float) -> tuple[NodeEvents, threading.Event]:
        woken = threading.Event()
        made.append(NodeEvents(woken.set, **kwargs))
        return made[-1], woken

    yield factory
    for events in made:
        events.close()


def wait_for(check: Callable[[], object], timeout: float, what: str) -> float:
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < timeout, f"{what} within {timeout}s"
        time.sleep(0.01)
    return time.monotonic() - began


def test_an_exit_on_a_real_agent_reaches_the_hub_and_wakes_the_controller(start_agent, hub) -> None:
    agent = start_agent()
    events, woken = hub(watch_timeout=30.0)
    client = agent.client()
    events.ensure_watch("n0", agent.url, agent.token)
    wait_for(lambda: (s := events.latest("n0")) and s.mode == "watch", 10, "watch mode")
    woken.clear()
    run_id = client.run("sleep 1; echo done; exit 5")
    wait_for(lambda: (s := events.latest("n0")) and s.runs.get(run_id) and s.runs[run_id].state == "exited", 10,
             "the exit seen")
    assert woken.is_set()
    run = events.latest("n0").runs[run_id]  # type: ignore[union-attr]
    assert run.exit_code == 5 and run.log_offset == len(b"done\n")
    ended_at = json.loads((agent.sandbox / "runs" / run_id / "exit.json").read_text())["ended_at"]
    assert run.ended_at == ended_at
    assert run.seen_at - ended_at < 1.0, "the exit reached the hub more than 1 s after the process ended"


def test_a_killed_agent_is_reported_lost_after_the_confirmation(start_agent, hub) -> None:
    agent = start_agent()
    events, woken = hub(confirm_seconds=0.5)
    events.ensure_watch("n0", agent.url, agent.token)
    wait_for(lambda: (s := events.latest("n0")) and s.mode == "watch", 10, "watch mode")
    killed = time.monotonic()
    agent.stop()
    wait_for(lambda: events.version("n0")[1], 10, "reported lost")
    took = time.monotonic() - killed
    assert 0.5 <= took < 3.0
    assert woken.is_set()


def test_a_pause_shorter_than_the_confirmation_is_not_a_loss(farm: FarmServer, hub) -> None:
    events, _ = hub(watch_timeout=0.3, confirm_seconds=3.0)
    events.ensure_watch("n1", farm.url(1), farm.token)
    wait_for(lambda: events.version("n1")[2], 10, "watched and healthy")
    farm.control("pause", first=1)
    wait_for(lambda: (s := events.latest("n1")) and s.suspect_since is not None, 10, "the watch seen broken")
    seen_lost: list[bool] = []
    paused_until = time.monotonic() + 1.0  # a 1 s pause, under the 3 s confirmation
    while time.monotonic() < paused_until:  # looked at all through the pause, not only once healthy again
        seen_lost.append(events.version("n1")[1])
        time.sleep(0.05)
    farm.control("resume", first=1)
    wait_for(lambda: events.version("n1")[2], 10, "healthy again")
    assert len(seen_lost) >= 10 and not any(seen_lost), "reported lost during a pause shorter than the confirmation"


def test_a_dead_node_is_lost_and_found_again(farm: FarmServer, hub) -> None:
    events, _ = hub(watch_timeout=5.0, confirm_seconds=0.3)
    events.ensure_watch("n2", farm.url(2), farm.token)
    wait_for(lambda: events.version("n2")[2], 10, "watched")
    farm.control("kill", first=2)
    wait_for(lambda: events.version("n2")[1], 5, "reported lost")
    farm.control("resume", first=2)
    wait_for(lambda: events.version("n2")[2], 15, "found again")
    farm.control("exit", first=2, code=3)
    wait_for(lambda: (s := events.latest("n2")) and s.runs["run-0"].exit_code == 3, 5, "the exit after recovery")


def test_an_agent_without_watch_is_polled_and_so_is_a_wrong_token(farm: FarmServer, hub) -> None:
    events, _ = hub()
    events.ensure_watch("old", farm.url(3, old=True), farm.token)
    events.ensure_watch("bad", farm.url(4), "wrong-token")
    events.ensure_watch("fake", "fake://node-0", "t")
    wait_for(lambda: all((s := events.latest(k)) and s.mode == "poll" for k in ("old", "bad", "fake")), 10,
             "poll mode")
    assert not events.version("old")[2]  # not quiet: the reconciler keeps polling it


def test_watchers_say_news_once_and_lost_ranks(farm: FarmServer, hub) -> None:
    events, _ = hub(watch_timeout=5.0, confirm_seconds=0.3)
    watchers = NodeWatchers(events, confirm_again_seconds=60)
    nodes = [{"rank": 0, "url": farm.url(5)}, {"rank": 1, "url": farm.url(6)}]
    first = watchers.look("a", nodes, lambda: farm.token, "run-0")
    assert not first.news and not first.lost_ranks
    wait_for(lambda: watchers.look("a", nodes, lambda: farm.token, "run-0").quiet, 10, "quiet")
    farm.control("exit", first=6)
    wait_for(lambda: watchers.look("a", nodes, lambda: farm.token, "run-0").news, 5, "news of the exit")
    assert not watchers.look("a", nodes, lambda: farm.token, "run-0").news  # said once
    farm.control("kill", first=5)
    wait_for(lambda: watchers.look("a", nodes, lambda: farm.token, "run-0").lost_ranks == (0,), 5, "rank 0 lost")
    assert watchers.may_confirm("a") and not watchers.may_confirm("a")
    watchers.forget("a", nodes)
    assert events.latest(farm.url(5)) is None


def test_a_failed_probe_makes_a_node_suspect_before_it_is_lost(farm: FarmServer, hub) -> None:
    """Issue 15: the reconciler may ask the infra as soon as the first probe after a broken watch fails; the node is
    reported lost only after the confirmation, and an answer clears the suspicion."""
    events, woken = hub(watch_timeout=5.0, confirm_seconds=3.0)
    watchers = NodeWatchers(events)
    nodes = [{"rank": 0, "url": farm.url(7)}]
    wait_for(lambda: watchers.look("w", nodes, lambda: farm.token).quiet, 10, "quiet")
    woken.clear()
    farm.control("kill", first=7)
    took = wait_for(lambda: watchers.look("w", nodes, lambda: farm.token).suspect_ranks == (0,), 5, "suspect")
    assert took < 1.5 and woken.is_set()
    assert not events.version(farm.url(7))[1]  # not lost yet: the confirmation has 3 s
    farm.control("resume", first=7)
    wait_for(lambda: watchers.look("w", nodes, lambda: farm.token).quiet, 15, "healthy again")
    assert not events.suspect(farm.url(7))


def test_the_reconcilers_node_calls_run_on_the_hubs_loop(start_agent, hub) -> None:
    """Issue 15: polls, run starts and log copies are coroutines on the hub's own loop thread, through one shared
    session; the answers and errors are those of the threaded client."""
    import asyncio

    from orchestrator.controller.ops import LoopOperations
    from orchestrator.infra.agent_client import AgentError

    agent = start_agent()
    events, woken = hub()
    ops = LoopOperations(events, woken.set)
    client = events.agent(agent.url, agent.token)

    async def start_wait_and_read() -> dict:
        seen: dict = {"thread": threading.current_thread().name}
        seen["started"] = await client.start("echo out; exit 3", "run-x", env={"A": "1"})
        seen["again"] = await client.start("echo out; exit 3", "run-x")
        while not (status := await client.status("run-x")).done:
            await asyncio.sleep(0.02)
        seen["code"], seen["log"] = status.exit_code, (await client.log("run-x"))[0]
        for name, call in (("missing", client.status("nope")),
                           ("denied", events.agent(agent.url, "wrong").health()),
                           ("gone", events.agent("http://127.0.0.1:9", agent.token).health())):
            try:
                await call
            except AgentError as exc:
                seen[name] = (exc.status, str(exc))
        return seen

    assert ops.ensure("k", start_wait_and_read) is None and ops.busy("k")  # started, on the loop
    wait_for(lambda: not ops.running("k"), 20, "finished")
    assert woken.is_set()
    finished = ops.ensure("k", start_wait_and_read)
    assert finished is not None and finished.ok, finished
    seen = finished.value
    assert seen["thread"] == "node-events"
    assert (seen["started"], seen["again"], seen["code"], seen["log"]) == (True, False, 3, b"out\n")
    assert seen["missing"][0] == 404 and seen["denied"][0] == 401
    assert seen["gone"][0] is None and "unreachable" in seen["gone"][1]
    assert all("\n" not in seen[k][1] for k in ("missing", "denied", "gone"))
