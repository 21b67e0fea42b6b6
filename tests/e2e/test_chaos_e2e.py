"""Chaos: many jobs, random preemptions and controller SIGKILLs at random moments, bounded in time.
At the end every job is in the status its script implies, nothing is left, and every job's events
tell a consistent story."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.e2e import TERMINAL, Sortie, write

pytestmark = pytest.mark.e2e
JOBS = int(os.environ.get("SORTIE_CHAOS_JOBS", "20"))
CHAOS_SECONDS = float(os.environ.get("SORTIE_CHAOS_SECONDS", "45"))
KILL_RATE = float(os.environ.get("SORTIE_CHAOS_KILL_RATE", "0.3"))  # of each pause, the chance of a SIGKILL
SLEEP_MAX = int(os.environ.get("SORTIE_CHAOS_SLEEP", "6"))  # each job's run sleeps 2..SLEEP_MAX seconds


@pytest.fixture
def cli(sortie_cli) -> Sortie:
    return sortie_cli("controller:\n  poll_interval_seconds: 0.5\n  tick_seconds: 0.2\n  grace_misses: 2\n"
                      "local:\n  regions:\n    - {name: region-a}\n    - {name: region-b}\n")


def kill_controller(cli: Sortie) -> bool:
    try:
        pid = json.loads((cli.home / "controller" / "controller.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, KeyError):
        return False
    return True


def test_chaos(cli: Sortie, tmp_path: Path) -> None:
    rng = random.Random(20261125)
    kinds = ["ok", "fail", "setup_fail", "pipeline", "ok"]
    plan: dict[int, str] = {}
    scripts = {
        "ok": "run: echo start; sleep {s}; echo end\n",
        "fail": "run: echo start; sleep {s}; exit 3\n",
        "setup_fail": "setup: exit 4\nrun: echo never\n",
        "pipeline": "---\nname: a\nrun: echo start; sleep {s}; echo end\n---\nname: b\nrun: echo start; sleep {s}; "
                    "echo end\n",
    }
    expected = {"ok": "SUCCEEDED", "fail": "FAILED", "setup_fail": "FAILED_SETUP", "pipeline": "SUCCEEDED"}

    def submit(i: int) -> tuple[int, str]:
        kind = kinds[i % len(kinds)]
        path = write(tmp_path, f"job{i}.yaml", f"name: chaos-{i}\n" + scripts[kind].format(s=rng.randint(2, SLEEP_MAX)))
        return cli.launch(path), kind

    with ThreadPoolExecutor(max_workers=8) as pool:
        plan = dict(pool.map(submit, range(JOBS)))

    preemptions = kills = 0
    deadline = time.monotonic() + CHAOS_SECONDS
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(1.0, 4.0))
        if rng.random() < KILL_RATE:
            kills += kill_controller(cli)
            time.sleep(rng.uniform(0.0, 1.5))
            cli.run("controller", "start")
        else:
            running = [r["id"] for r in json.loads(cli.run("jobs", "queue", "-a", "--json").stdout)
                       if r["status"] == "RUNNING"]
            if running:
                victim = rng.choice(running)
                preemptions += cli.run("local", "preempt", "--job", str(victim), check=False).returncode == 0
    cli.run("controller", "start")

    final = {job_id: cli.wait(job_id, timeout=420) for job_id in plan}
    wrong = {j: (plan[j], f["status"], f["failure_reason"]) for j, f in final.items()
             if f["status"] != expected[plan[j]]}
    assert not wrong, f"jobs in the wrong status: {wrong}"

    from state.store import StateStore

    store = StateStore(cli.home)
    assert store.live_stacks() == []
    recoveries = attempts_total = 0
    for job_id in plan:
        events = store.events(job_id)
        whats = [e.what for e in events]
        attempts = store.attempts(job_id)
        attempts_total += len(attempts)
        recoveries += sum(t.recoveries for t in store.tasks([job_id])[job_id])
        assert whats[0] == "submitted" and whats[-1] == "finished", (job_id, whats)
        assert whats.count("finished") == 1, (job_id, whats)
        assert whats.count("placed") == len(attempts), (job_id, whats, len(attempts))
        assert len({a.stack_name for a in attempts}) == len(attempts), "a stack name was reused"
        assert all(a.phase == "DONE" for a in attempts), (job_id, [a.phase for a in attempts])
        assert all(e.at >= events[0].at for e in events)
        task_recoveries = sum(t.recoveries for t in store.tasks([job_id])[job_id])
        assert task_recoveries == sum(1 for a in attempts if a.outcome == "PREEMPTED"), (job_id, whats)
        if final[job_id]["status"] == "SUCCEEDED":  # no task ran to its end twice (a controller kill never reruns)
            for task_dir in (cli.home / "logs" / "jobs" / str(job_id)).glob("task-*"):
                ends = sum(log.read_text().splitlines().count("end") for log in task_dir.glob("a*-run-rank*.log"))
                assert ends == 1, (job_id, task_dir.name, ends)
    assert JOBS >= 20 or os.environ.get("SORTIE_CHAOS_JOBS")
    counts = {s: sum(1 for f in final.values() if f["status"] == s) for s in sorted(TERMINAL)}
    print(f"\nchaos: {JOBS} jobs, {preemptions} preemptions, {kills} controller SIGKILLs, "
          f"{recoveries} recoveries, {attempts_total} attempts; final: "
          f"{ {k: v for k, v in counts.items() if v} }")
