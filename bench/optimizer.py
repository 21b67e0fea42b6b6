"""Benchmark: the optimizer's time for a task with 5 `any_of` alternatives over every catalog.

    .venv/bin/python bench/optimizer.py [--runs 200]

Prints the first call (it loads the catalogs) and the median and 95th percentile of warm calls, with the number
of offers searched and of feasible options found. Target: under 50 ms warm.

SkyPilot's optimizer is not run beside it: it fetches its catalogs from the network on first use, which these
machines cannot reach, so there is no offline peer to compare with here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TASK = """\
resources:
  any_of:
    - accelerators: H100:8
    - accelerators: A100:8
    - accelerators: {A10G: 1}
      use_spot: true
    - accelerators: L4:1
    - cpus: 8+
      memory: 32+
run: echo
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    from orchestrator.config import SortieConfig
    from orchestrator.policy.optimizer import catalog_offers, plan_for
    from orchestrator.spec import load_yaml_text

    config = SortieConfig()
    task = load_yaml_text(TASK).tasks[0]
    candidates = [c.to_json() for c in task.candidates()]
    enabled = ("local", "aws", "gcp", "azure")
    t = time.perf_counter()
    plan = plan_for(candidates, 1, config, ordered=False, enabled=enabled)
    first = time.perf_counter() - t
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        plan_for(candidates, 1, config, ordered=False, enabled=enabled)
        times.append(time.perf_counter() - t)
    times.sort()
    offers = len(catalog_offers(["aws", "gcp", "azure"]))
    print(f"optimizer, 5 any_of alternatives over {offers} catalog offers: first call {first * 1000:.1f} ms "
          f"(loads the catalogs); warm median {statistics.median(times) * 1000:.2f} ms, "
          f"p95 {times[int(len(times) * 0.95) - 1] * 1000:.2f} ms; {len(plan.options)} feasible options, chosen "
          f"{plan.chosen.infra if plan.chosen else None} {plan.chosen.offer.instance_type if plan.chosen else ''}")


if __name__ == "__main__":
    main()
