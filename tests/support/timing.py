"""A pytest plugin (registered by tests/conftest.py): each test's wall time (setup, call and teardown) and its tier,
written to `.pytest_cache/sortie/suite-times.json` at the end of every run, for `bench/suite.py` to print per tier.
`SORTIE_SUITE_TIMES=PATH` writes elsewhere; `=off` not at all."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

TIERS = ("unit", "integration", "e2e")
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = ROOT / ".pytest_cache" / "sortie" / "suite-times.json"


def tier_of(item: pytest.Item) -> str:
    return next((t for t in TIERS if item.get_closest_marker(t) is not None), "unmarked")


class SuiteTimes:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tests: dict[str, dict[str, Any]] = {}
        self.started = time.time()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            self.tests[item.nodeid] = {"tier": tier_of(item), "slow": item.get_closest_marker("slow") is not None,
                                       "seconds": 0.0, "outcome": "not run"}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.tests.get(report.nodeid)
        if entry is None:  # under pytest-xdist this process collected nothing: the workers' reports carry the marks
            tier = next((t for t in TIERS if t in report.keywords), "unmarked")
            entry = self.tests[report.nodeid] = {"tier": tier, "slow": "slow" in report.keywords, "seconds": 0.0,
                                                 "outcome": "not run"}
        entry["seconds"] = round(entry["seconds"] + report.duration, 3)
        if report.failed and report.when != "call":
            entry["outcome"] = "error"
        elif report.when == "call" or report.skipped:
            entry["outcome"] = report.outcome

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not any(e["outcome"] != "not run" for e in self.tests.values()):
            return
        workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT") or getattr(session.config.option, "numprocesses", None)
        record = {"started": self.started, "wall_seconds": round(time.time() - self.started, 1),
                  "args": session.config.invocation_params.args, "workers": workers,
                  "load": list(os.getloadavg()), "cpus": os.cpu_count(), "tests": self.tests}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, self.path)


def register(config: pytest.Config) -> None:
    where = os.environ.get("SORTIE_SUITE_TIMES", "")
    if where == "off" or hasattr(config, "workerinput"):  # an xdist worker: its controller records the whole run
        return
    config.pluginmanager.register(SuiteTimes(Path(where) if where else DEFAULT_PATH), "sortie-suite-times")
