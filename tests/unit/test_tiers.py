"""The test tiers (tests/conftest.py): every test carries its tier marker, and the module lists name real modules
(a renamed module must not silently leave its tier or `slow`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import conftest

TESTS = Path(conftest.__file__).resolve().parent


def test_a_unit_test_is_marked_unit(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("unit") is not None
    assert request.node.get_closest_marker("e2e") is None and request.node.get_closest_marker("integration") is None


def test_the_tier_lists_name_existing_modules() -> None:
    e2e = {p.stem for p in (TESTS / "e2e").glob("test_*.py")}
    everything = e2e | {p.stem for p in (TESTS / "unit").glob("test_*.py")}
    assert e2e >= conftest.INTEGRATION, conftest.INTEGRATION - e2e
    assert everything >= conftest.SLOW, conftest.SLOW - everything


def test_each_run_records_its_tests_times_and_tiers(tmp_path: Path) -> None:
    record = tmp_path / "times.json"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/unit/test_timefmt.py"], cwd=TESTS.parent, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "SORTIE_SUITE_TIMES": str(record)})
    assert out.returncode == 0, out.stdout[-2000:]
    data = json.loads(record.read_text())
    tests = data["tests"]
    assert tests and all(t["tier"] == "unit" and t["outcome"] == "passed" and t["seconds"] >= 0
                         for t in tests.values())
    shown = subprocess.run([sys.executable, "bench/suite.py", "--from", str(record)], cwd=TESTS.parent,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines()]
    assert ["unit", str(len(tests)), str(len(tests)), "0", "0"] in [row[:5] for row in rows], shown.stdout
