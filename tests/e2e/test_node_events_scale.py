"""10,000 nodes watched at once by the controller's hub, served by the agent farm (one process on loopback).

Pass/fail on counts with generous bounds; the timing figures are printed by `bench/node_events.py`."""

from __future__ import annotations

import resource
import time

import pytest

from orchestrator.controller.node_events import NodeEvents
from tests.e2e.test_node_events import start_farm, wait_for

NODES = 10_000
EXITS = 1_000


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[0] < NODES + 1000,
                    reason="needs an open-files limit above 11,000")
def test_ten_thousand_watches_idle_cheaply_and_record_a_thousand_exits_within_5s() -> None:
    base = rss_mib()  # this test process's own before the hub (a full suite has grown it already)
    proc, farm = start_farm(NODES)
    events = NodeEvents()  # the default 20 s heartbeat
    try:
        def all_watched() -> bool:
            for index in range(NODES):  # as the reconciler does each tick: still wanted
                events.ensure_watch(index, farm.url(index), farm.token)
            time.sleep(0.5)
            return events.modes().get("watch", 0) == NODES

        wait_for(all_watched, 600, f"{NODES} nodes in watch mode")
        wait_for(lambda: time.sleep(0.5) or farm.stats()["held"] >= NODES * 0.99, 60, "the watches held by the farm")
        beats = farm.stats()["beats"]
        cpu, wall = time.process_time(), time.monotonic()
        # one whole heartbeat of every watch (20 s, the default): each has answered a quiet watch since
        wait_for(lambda: time.sleep(1.0) or farm.stats()["beats"] > beats, 60, "a heartbeat of every watch")
        idle_cores = (time.process_time() - cpu) / (time.monotonic() - wall)
        rss = rss_mib() - base
        assert rss <= 500, f"{rss:.0f} MiB RSS more, holding {NODES} watches"
        assert idle_cores <= 1.0, f"{idle_cores:.2f} cores busy while {NODES} watches idle"
        assert events.modes() == {"watch": NODES}, "a watch broke while idle"

        exited_at = farm.control("exit", first=0, count=EXITS, code=7)
        # version(): a cheap look, so that this thread does not hold the interpreter from the hub's loop
        wait_for(lambda: time.sleep(0.1) or all(events.version(i, "run-0")[0] >= 2 for i in range(EXITS)), 60,
                 f"all {EXITS} exits recorded")
        runs = [events.latest(i).runs["run-0"] for i in range(EXITS)]  # type: ignore[union-attr]
        assert all(r.state == "exited" and r.exit_code == 7 for r in runs)
        last = max(r.seen_at for r in runs) - exited_at
        print(f"\n{NODES} watches: {rss:.0f} MiB RSS, {idle_cores:.2f} cores idle; {EXITS} exits recorded within "
              f"{last:.2f}s")
        # The target is 5 s (bench/node_events.py prints it); the test's bound is generous, for loaded CI machines.
        assert last < 60.0, f"the last of {EXITS} exits was recorded {last:.1f}s after they happened"
        assert all(events.latest(i).runs["run-0"].state == "running" for i in range(EXITS, EXITS + 100))  # type: ignore[union-attr]
    finally:
        events.close()
        proc.terminate()
        proc.wait(timeout=30)
