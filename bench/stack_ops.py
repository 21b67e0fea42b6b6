"""Benchmark: wall time and peak memory of local-cloud stack operations on the real engine.

    .venv/bin/python bench/stack_ops.py [--parallel 16] [--sustain-seconds 60] [--concurrency N]

Prints, for each scenario, wall time and the peak resident memory of (a) Sortie's side of the work:
this process, the worker processes, the engine and its provider plugins, and (b) the node agents.
Runs in a throwaway Sortie home and destroys everything it made.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.node.agent import SANDBOX_ENV
from stacks.spec import ClusterSpec, StackProgram, new_cluster_token


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _process_table() -> dict[int, tuple[int, bytes]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    env = fh.read()
            except OSError:
                continue
            table[int(entry)] = (ppid, env)
    return table


class MemorySampler:
    """Samples, every 100 ms, the summed RSS of our process tree and of the node agents."""

    def __init__(self, home: Path) -> None:
        self.marker = f"{SANDBOX_ENV}={home}".encode()
        self.peak_tree = 0
        self.peak_agents = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        table = _process_table()
        tree = {os.getpid()}
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _env) in table.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        agents = {pid for pid, (_p, env) in table.items() if self.marker in env}
        self.peak_tree = max(self.peak_tree, sum(_rss_kib(p) for p in tree - agents))
        self.peak_agents = max(self.peak_agents, sum(_rss_kib(p) for p in agents))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.1)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def scenario(title: str, home: Path):
    print(f"\n== {title}", flush=True)
    started = time.monotonic()
    with MemorySampler(home) as mem:
        yield
    wall = time.monotonic() - started
    print(f"   wall {wall:.2f}s | peak RSS: sortie+engine {mem.peak_tree / 1024:.0f} MiB, "
          f"agents {mem.peak_agents / 1024:.0f} MiB", flush=True)


def _program(name: str, nodes: int) -> StackProgram:
    return StackProgram("cluster", ClusterSpec(name=name, num_nodes=nodes, token=new_cluster_token()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=16, help="clusters brought up at once")
    parser.add_argument("--sustain-seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=None, help="stack operations at once (default: config)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="sortie-bench-"))
    os.environ["SORTIE_HOME"] = str(home)
    from orchestrator.infra.engine import install_engine
    from orchestrator.infra.pulumi_driver import PulumiStackDriver

    install_engine()
    driver = PulumiStackDriver(home, max_concurrent=args.concurrency)
    slots = args.concurrency or driver.config.pulumi.operation_slots
    print(f"Sortie home {home}; {os.cpu_count()} CPUs; {slots} stack operations at once")

    with scenario("floor: one worker operation (list stacks)", home):
        t = time.monotonic()
        driver.list_stacks()
        print(f"   list: {time.monotonic() - t:.2f}s")

    with scenario("one empty local cluster (1 node, nothing running): up + destroy", home):
        t = time.monotonic()
        driver.up("bench-one-1", _program("bench-one-1", 1))
        up_s = time.monotonic() - t
        t = time.monotonic()
        driver.destroy("bench-one-1")
        print(f"   up {up_s:.2f}s, destroy {time.monotonic() - t:.2f}s")

    names = [f"bench-par-{i}-1" for i in range(args.parallel)]
    with scenario(f"{args.parallel} two-node clusters up, then destroyed, in parallel", home):
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            t = time.monotonic()
            list(pool.map(lambda n: driver.up(n, _program(n, 2)), names))
            up_s = time.monotonic() - t
            t = time.monotonic()
            list(pool.map(driver.destroy, names))
        print(f"   all up {up_s:.2f}s, all destroyed {time.monotonic() - t:.2f}s "
              f"({2 * args.parallel} nodes)")

    counter = {"ops": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + args.sustain_seconds

    def churn(i: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            name = f"bench-sus-{i}-{n}"
            driver.up(name, _program(name, 1))
            driver.destroy(name)
            n += 1
            with lock:
                counter["ops"] += 2

    with scenario(f"sustained: 1-node up/destroy cycles for {args.sustain_seconds:.0f}s", home):
        t = time.monotonic()
        with ThreadPoolExecutor(max_workers=slots) as pool:
            list(pool.map(churn, range(slots)))
        elapsed = time.monotonic() - t
        print(f"   {counter['ops']} stack operations in {elapsed:.0f}s = "
              f"{counter['ops'] * 60 / elapsed:.0f} operations/minute")

    left = driver.list_stacks()
    print(f"\nleft behind: {left or 'nothing'}")
    if left:
        sys.exit(1)


if __name__ == "__main__":
    main()
