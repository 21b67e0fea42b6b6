"""Benchmark: jobs a minute and controller-side CPU per job, fresh clusters against a warm pool, in one run.

    .venv/bin/python bench/throughput.py [--counts 10 40] [--workers 4] [--skip pool]

For each count N: N trivial jobs (`true`) submitted at once with one `jobs launch --num-jobs N`, each on its own
fresh local cluster (its own `up` and `destroy`); then the same N through a warm pool of `--workers` workers
(made READY first, not counted). Printed side by side:

- jobs a minute, from the submit to the last job ended (all must end SUCCEEDED);
- CPU seconds per job on the controller's side: the controller and everything it started and reaped (stack
  workers, engines, provider plugins), with its fork server of stack workers and what that reaped, from /proc
  (utime + stime + cutime + cstime), read once the last cluster's stack is gone. The nodes' agents and their
  runs are not the controller's children (the local cloud starts them in sessions of their own) and are not counted;
- peak stack operations in flight, and peak memory per operation in flight: the summed PSS (proportional set
  size, /proc/<pid>/smaps_rollup) of the controller's descendants (agents excluded) over the operations running at
  that sample, sampled every 200 ms;
- the machine's load average at the start and the end.

Runs in throwaway Sortie homes, stops its controllers and checks that no stack is left.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pools import fresh_home, sortie, wait_all_done
from bench.stack_ops import _process_table
from orchestrator.node.agent import SANDBOX_ENV

TICKS = os.sysconf("SC_CLK_TCK")
WORKER_MODULE = b"orchestrator.infra._stack_worker"
FORK_SERVER = b"orchestrator.infra.fork_server"


def cpu_seconds(pid: int) -> float:
    """The process's own CPU and that of its reaped descendants."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / TICKS


def pss_kib(pid: int) -> int:
    """Proportional set size: a page shared by k processes counts 1/k to each (RSS would count it k times)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def controller_cpu(pid: int) -> float:
    """The controller's CPU with its reaped descendants', and its stack workers' fork server's (which reaps the
    forks, whose engines and plugins they reaped)."""
    total = cpu_seconds(pid)
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():  # a child is listed under the thread that started it
        try:
            children |= set((task / "children").read_text().split())
        except OSError:
            continue
    for child in children:
        try:
            if FORK_SERVER in Path(f"/proc/{child}/cmdline").read_bytes():
                total += cpu_seconds(int(child))
        except OSError:
            continue
    return total


def controller_pid(env: dict[str, str]) -> int:
    return int(json.loads((Path(env["SORTIE_HOME"]) / "controller" / "controller.json").read_text())["pid"])


class TreeSampler:
    """Every 200 ms: stack operations in flight under the controller, and their RSS (agents left out)."""

    def __init__(self, root_pid: int, home: str) -> None:
        self.root_pid = root_pid
        self.marker = f"{SANDBOX_ENV}={home}".encode()
        self.peak_ops = 0
        self.peak_per_op_kib = 0.0
        self.peak_tree_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        table = _process_table()
        tree, grew = {self.root_pid}, True
        while grew:
            before = len(tree)
            tree |= {pid for pid, (ppid, _env) in table.items() if ppid in tree}
            grew = len(tree) > before
        tree = {pid for pid in tree - {self.root_pid} if self.marker not in table.get(pid, (0, b""))[1]}
        workers = 0
        for pid in tree:  # a stack worker: a fresh Python, or a fork of the fork server (not the server itself)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmdline = fh.read()
            except OSError:
                continue
            workers += WORKER_MODULE in cmdline or (FORK_SERVER in cmdline and table[pid][0] != self.root_pid)
        rss = sum(pss_kib(p) for p in tree)
        self.peak_tree_kib = max(self.peak_tree_kib, rss)
        if workers:
            self.peak_ops = max(self.peak_ops, workers)
            self.peak_per_op_kib = max(self.peak_per_op_kib, rss / workers)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.2)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Figures:
    jobs: int
    wall: float
    cpu: float
    peak_ops: int = 0
    per_op_mib: float = 0.0

    def row(self, label: str) -> str:
        ops = (f"; peak {self.peak_ops} stack operations in flight, {self.per_op_mib:.0f} MiB (PSS) per operation"
               if self.peak_ops else "")
        return (f"{label:<16} {self.jobs:>4} jobs in {self.wall:6.1f}s = {self.jobs / self.wall * 60:6.1f} jobs/min, "
                f"{self.cpu / self.jobs:5.2f} CPU s/job{ops}")


def wait_no_stacks(env: dict[str, str], timeout: float = 600) -> None:
    from state.store import StateStore

    store = StateStore(Path(env["SORTIE_HOME"]))
    deadline = time.monotonic() + timeout
    while store.live_stacks() and time.monotonic() < deadline:
        time.sleep(0.2)


def check_succeeded(env: dict[str, str], jobs: int) -> None:
    from state.store import StateStore

    rows = StateStore(Path(env["SORTIE_HOME"])).list_jobs()
    bad = [f"{j.id}:{j.status}" for j in rows if j.status != "SUCCEEDED"]
    if len(rows) < jobs or bad:
        raise SystemExit(f"not every job SUCCEEDED: {bad or len(rows)}")


def run_jobs(env: dict[str, str], jobs: int, *extra: str) -> Figures:
    pid = controller_pid(env)
    with TreeSampler(pid, env["SORTIE_HOME"]) as sampler:
        cpu = controller_cpu(pid)
        started = time.perf_counter()
        sortie(env, "jobs", "launch", "-y", *extra, "--num-jobs", str(jobs), "true")
        wait_all_done(env)
        wall = time.perf_counter() - started
        if not extra:  # the clusters' destroys may end after their jobs: their CPU counts
            wait_no_stacks(env)
        time.sleep(1.5)  # the fork server reaps its forks within a second
        cpu = controller_cpu(pid) - cpu
    return Figures(jobs, wall, cpu, sampler.peak_ops, sampler.peak_per_op_kib / 1024)


def bench_fresh(jobs: int) -> Figures:
    env = fresh_home()
    sortie(env, "controller", "start")
    try:
        figures = run_jobs(env, jobs)
        check_succeeded(env, jobs)
    except BaseException:  # interrupted: nothing is left running
        sortie(env, "jobs", "cancel", "-a", "-y")
        wait_all_done(env)
        wait_no_stacks(env)
        raise
    finally:
        sortie(env, "controller", "stop")
    _check_nothing_left(env)
    return figures


def bench_pool(jobs: int, workers: int) -> Figures:
    from orchestrator.pool_service import PoolService

    env = fresh_home()
    pool_yaml = Path(env["SORTIE_HOME"]) / "pool.yaml"
    pool_yaml.write_text(f"pool:\n  workers: {workers}\nresources:\n  cpus: 1+\nsetup: echo ready\n")
    sortie(env, "jobs", "pool", "apply", "-y", "-p", "bench", str(pool_yaml))
    service = PoolService(Path(env["SORTIE_HOME"]))
    try:
        while service.status("bench")[0].ready() < workers:
            time.sleep(0.2)
        figures = run_jobs(env, jobs, "-p", "bench")
        check_succeeded(env, jobs)
    finally:
        sortie(env, "jobs", "pool", "down", "-y", "bench")
        while service.status():
            time.sleep(0.2)
        sortie(env, "controller", "stop")
    _check_nothing_left(env)
    return figures


def _check_nothing_left(env: dict[str, str]) -> None:
    from state.store import StateStore

    left = StateStore(Path(env["SORTIE_HOME"])).live_stacks()
    if left:
        raise SystemExit(f"left behind: {[s.name for s in left]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 40], help="jobs submitted at once (160 too)")
    parser.add_argument("--workers", type=int, default=4, help="workers of the warm pool")
    parser.add_argument("--skip", nargs="*", default=[], choices=["fresh", "pool"])
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    for jobs in args.counts:
        if "fresh" not in args.skip:
            print(bench_fresh(jobs).row("fresh clusters"), flush=True)
        if "pool" not in args.skip:
            print(bench_pool(jobs, args.workers).row(f"pool of {args.workers}"), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
