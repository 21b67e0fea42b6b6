"""How spans and times read in tables and pages (orchestrator/timefmt.py)."""

from __future__ import annotations

import pytest

from orchestrator import timefmt


@pytest.mark.parametrize(("span", "text"), [
    (None, "-"), (0, "0s"), (59.9, "59s"), (61, "1m 1s"), (3600, "1h 0m 0s"), (3 * 3600 + 125, "3h 2m 5s"),
    (-5, "0s"),  # clock skew never prints a negative span
])
def test_seconds(span: float | None, text: str) -> None:
    assert timefmt.seconds(span) == text


def test_duration_is_the_span_between_two_times() -> None:
    assert timefmt.duration(1000.0, 1125.0) == "2m 5s"
    assert timefmt.duration(None, 1125.0) == "-"
    assert timefmt.duration(2000.0, 1000.0) == "0s"
