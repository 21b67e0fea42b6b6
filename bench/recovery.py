"""Benchmark: preemption to RUNNING again on the local cloud (detection, destroy, up, restart).

    .venv/bin/python bench/recovery.py [--runs 3]

Measured twice: with Sortie's defaults (poll every 5 s, 3 missed polls before `refresh` is asked) and
with a fast setting (poll every 1 s, grace 2). Prints the phases from the job's event log. Then, with the defaults,
preemption with a 30 s notice (`sortie local preempt --notice 30s`, issue 24): recovery starts at the notice, so
the job is back RUNNING measured from the moment the node is gone (negative: before it is gone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
SORTIE = str(Path(sys.executable).parent / "sortie")


def one_setting(poll: float, grace: int, runs: int) -> None:
    from orchestrator.infra.local_cloud import LocalCloud
    from orchestrator.service import JobService
    from orchestrator.spec import load_yaml_text

    home = Path(tempfile.mkdtemp(prefix="sortie-bench-recovery-"))
    (home / "config.yaml").write_text(f"controller:\n  poll_interval_seconds: {poll}\n  grace_misses: {grace}\n")
    os.environ["SORTIE_HOME"] = str(home)
    service = JobService(home)
    rows = []
    for _ in range(runs):
        (job_id,) = service.launch(load_yaml_text("resources:\n  use_spot: true\nrun: echo start; sleep 600\n"))
        while sum("start" in line for line in service.log_lines(service.resolve(job_id), follow=False)) < 1:
            time.sleep(0.1)
        attempt = service.store.open_attempts([job_id])[job_id]
        t0 = time.time()
        LocalCloud(home / "local").preempt_cluster(attempt.stack_name)
        while sum("start" in line for line in service.log_lines(service.resolve(job_id), follow=False)) < 2:
            time.sleep(0.1)
        back = time.time() - t0
        events = {e.what: e.at for e in service.store.events(job_id) if e.at >= t0}
        rows.append((events["preempted"] - t0, events["destroyed"] - events["preempted"],
                     events["provisioned"] - events["destroyed"], back))
        service.cancel([job_id])
        while service.store.job(job_id).status != "CANCELLED":
            time.sleep(0.2)
    subprocess.run([SORTIE, "controller", "stop"], env={**os.environ}, stdout=subprocess.DEVNULL, check=False)
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    print(f"poll {poll:g}s, grace {grace}: detection {med[0]:.1f}s, destroy {med[1]:.1f}s, "
          f"placement + up {med[2]:.1f}s; preemption -> running again (first line of output) {med[3]:.1f}s "
          f"(median of {runs}; all: {', '.join(f'{r[3]:.1f}' for r in rows)})")
    left = service.store.live_stacks()
    print(f"   left behind: {[s.name for s in left] or 'nothing'}")


def with_notice(runs: int, notice: float = 30.0) -> None:
    """Preemption with a notice: time from the notice, and from the node's loss (its deadline), to running again."""
    from orchestrator.infra.local_cloud import LocalCloud
    from orchestrator.service import JobService
    from orchestrator.spec import load_yaml_text

    home = Path(tempfile.mkdtemp(prefix="sortie-bench-notice-"))
    os.environ["SORTIE_HOME"] = str(home)
    service = JobService(home)
    rows = []
    for _ in range(runs):
        (job_id,) = service.launch(load_yaml_text("resources:\n  use_spot: true\nrun: echo start; sleep 600\n"))
        while sum("start" in line for line in service.log_lines(service.resolve(job_id), follow=False)) < 1:
            time.sleep(0.1)
        attempt = service.store.open_attempts([job_id])[job_id]
        t0 = time.time()
        LocalCloud(home / "local").preempt_cluster(attempt.stack_name, notice=notice)
        while sum("start" in line for line in service.log_lines(service.resolve(job_id), follow=False)) < 2:
            time.sleep(0.1)
        back = time.time() - t0
        events = {e.what: e.at for e in service.store.events(job_id) if e.at >= t0}
        rows.append((events["preemption-notice"] - t0, back, back - notice))
        service.cancel([job_id])
        while service.store.job(job_id).status != "CANCELLED":
            time.sleep(0.2)
    subprocess.run([SORTIE, "controller", "stop"], env={**os.environ}, stdout=subprocess.DEVNULL, check=False)
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    print(f"defaults, {notice:g}s notice: notice seen by the controller {med[0]:.1f}s; notice -> running again "
          f"{med[1]:.1f}s; node gone -> running again {med[2]:+.1f}s (median of {runs}; all from the notice: "
          f"{', '.join(f'{r[1]:.1f}' for r in rows)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    one_setting(5.0, 3, args.runs)
    one_setting(1.0, 2, args.runs)
    with_notice(args.runs)
    print("SkyPilot for comparison (documented defaults): status poll every 15 s, 60 s before it gives up on a "
          "node, 60 s initial relaunch backoff.")


if __name__ == "__main__":
    main()
