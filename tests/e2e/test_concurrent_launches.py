"""Issue 28, item 6: concurrent `jobs launch -d` on SQLite, with a controller running, are all submitted. Deferred
transactions that read, then write, failed with SQLITE_BUSY at once in WAL mode whatever the busy timeout ("the
state database is busy"); write transactions now begin IMMEDIATE (`state.db`)."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from tests.support.e2e import ROOT, SORTIE, TERMINAL, Sortie

BURST = 60
# The controller runs and writes beside the launches (claims, leases, a job's tries), on one job at a time, in a
# drained region (capacity 0): the job waits for capacity, and no node ever runs.
CONFIG = ("local:\n  regions:\n    - {name: region-a, capacity: 0}\n"
          "controller:\n  tick_seconds: 0.2\n  max_jobs_per_replica: 1\n")


def _burst(sortie: Sortie, tag: str) -> list[subprocess.CompletedProcess[str]]:
    procs = [subprocess.Popen([*SORTIE, "jobs", "launch", "-y", "-d", "-n", f"{tag}-{i}", "echo hi"], env=sortie.env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(BURST)]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def test_two_bursts_of_concurrent_launches_are_all_submitted(sortie_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SORTIE_DB_URL", raising=False)
    sortie: Sortie = sortie_cli(CONFIG)
    sortie.env.pop("SORTIE_DB_URL", None)
    sortie.run("controller", "start")
    ids: list[int] = []
    try:
        for tag in ("first", "second"):
            for run in _burst(sortie, tag):
                assert run.returncode == 0, f"exit {run.returncode}: {run.stderr.strip()}"
                found = re.search(r"submitted: ID (\d+)", run.stdout)
                assert found, run.stdout
                ids.append(int(found.group(1)))
        assert len(ids) == len(set(ids)) == 2 * BURST
        rows = json.loads(sortie.run("jobs", "queue", "-a", "--json").stdout)
        assert {r["name"] for r in rows} == {f"{tag}-{i}" for tag in ("first", "second") for i in range(BURST)}
    finally:
        sortie.run("jobs", "cancel", "-a", "-y", check=False)
        deadline = time.monotonic() + 300
        while any(r["status"] not in TERMINAL for r in json.loads(sortie.run("jobs", "queue", "-a", "--json").stdout)):
            assert time.monotonic() < deadline, "the cancelled jobs did not end"
            time.sleep(1)
