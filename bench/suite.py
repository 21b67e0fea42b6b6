"""Benchmark: the test suite itself, per tier (unit, integration, e2e) and its slowest tests.

    .venv/bin/python bench/suite.py                      the figures of the last pytest run (e.g. `make test`)
    .venv/bin/python bench/suite.py --run unit [-n 2]    run one tier (unit/integration/e2e/all) now, then print
    .venv/bin/python bench/suite.py --from FILE          figures from another record

Every pytest run writes each test's wall time (setup, call and teardown) and its tier to
`.pytest_cache/sortie/suite-times.json` (tests/support/timing.py), so `make test` is its own measurement. Printed:
per tier, the tests, their summed time and the slowest; the tests marked `slow`; the run's wall time, its workers
(pytest-xdist) and the load average at its end (the machine is often shared: say so with the figures).
Targets (issue 27): `make test` <= 25 min and `make test-unit` <= 2 min on 2 cores with warm caches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.timing import DEFAULT_PATH, TIERS  # noqa: E402

TARGETS = {"unit": 120.0, "all": 25 * 60.0}


def run_tier(tier: str, workers: str | None) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q"]
    if tier != "all":  # the tier's directory too: collecting the rest only to deselect it costs time
        cmd += ["-m", tier, "tests/unit" if tier == "unit" else "tests/e2e"]
    if workers:
        cmd += ["-n", workers]
    print("$", " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def report(record: dict[str, Any], top: int) -> None:
    tests: dict[str, dict[str, Any]] = record["tests"]
    ran = {k: v for k, v in tests.items() if v["outcome"] != "not run"}
    load = ", ".join(f"{x:.1f}" for x in record.get("load", []))
    print(f"run: pytest {' '.join(record.get('args') or [])}".rstrip())
    print(f"  wall {minutes(record['wall_seconds'])}, {len(ran)} tests run of {len(tests)} collected, "
          f"workers {record.get('workers') or 1}, {record.get('cpus')} CPUs, load average at the end {load}")
    print(f"{'tier':<12} {'tests':>6} {'passed':>7} {'failed':>7} {'skipped':>8} {'summed':>10} {'slowest':>9}")
    for tier in (*TIERS, "unmarked"):
        rows = [v for v in ran.values() if v["tier"] == tier]
        if not rows:
            continue
        count = {o: sum(1 for r in rows if r["outcome"] == o) for o in ("passed", "failed", "skipped", "error")}
        summed = sum(r["seconds"] for r in rows)
        print(f"{tier:<12} {len(rows):>6} {count['passed']:>7} {count['failed'] + count['error']:>7} "
              f"{count['skipped']:>8} {minutes(summed):>10} {max(r['seconds'] for r in rows):>8.1f}s")
    slow = [v for v in ran.values() if v["slow"]]
    if slow:
        print(f"{'(slow)':<12} {len(slow):>6} {'':>7} {'':>7} {'':>8} {minutes(sum(r['seconds'] for r in slow)):>10}")
    args = record.get("args") or []
    marker = args[args.index("-m") + 1] if "-m" in args[:-1] else None
    tier = marker if marker in TIERS else "all" if marker is None and not any("tests" in a for a in args) else None
    target = TARGETS.get(tier or "")
    if target is not None:
        verdict = "within" if record["wall_seconds"] <= target else "OVER"
        print(f"target for {tier}: {minutes(target)}; this run {minutes(record['wall_seconds'])}: {verdict}")
    print(f"slowest {top}:")
    for nodeid, entry in sorted(ran.items(), key=lambda kv: -kv[1]["seconds"])[:top]:
        mark = " [slow]" if entry["slow"] else ""
        print(f"  {entry['seconds']:8.1f}s  {entry['tier']:<11} {nodeid}{mark}")
    unmarked_slow = [k for k, v in ran.items() if v["seconds"] >= 60 and not v["slow"]]
    if unmarked_slow:
        print("over a minute but not marked slow (tests/conftest.py SLOW):", *unmarked_slow, sep="\n  ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", choices=[*TIERS, "all"], help="run this tier first")
    parser.add_argument("-n", dest="workers", help="pytest-xdist workers for --run (e.g. 2, auto)")
    parser.add_argument("--from", dest="source", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    rc = run_tier(args.run, args.workers) if args.run else 0
    if not args.source.is_file():
        sys.exit(f"no record at {args.source}: run pytest (or `make test`, or --run TIER) first")
    report(json.loads(args.source.read_text()), args.top)
    sys.exit(rc)


if __name__ == "__main__":
    main()
