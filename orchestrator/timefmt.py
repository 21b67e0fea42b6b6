"""Shared base, how times read in tables and pages: the CLI's and the dashboard's one way."""

from __future__ import annotations

import time


def ago(ts: float | None) -> str:
    """`3 mins ago`, `a few secs ago`, `-` for no time."""
    if not ts:
        return "-"
    delta = max(time.time() - ts, 0)
    for unit, size in (("day", 86400), ("hr", 3600), ("min", 60)):
        if delta >= size:
            n = int(delta // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "a few secs ago"


def duration(start: float | None, end: float | None = None) -> str:
    """`1h 2m 3s`, `2m 3s` or `3s` from start to end (or now); `-` without a start."""
    if not start:
        return "-"
    return seconds((end or time.time()) - start)


def seconds(span: float | None) -> str:
    """A span of seconds as `1h 2m 3s`, `2m 3s` or `3s` (never negative); `-` for none."""
    if span is None:
        return "-"
    total = int(max(span, 0))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes}m {secs}s" if hours else (f"{minutes}m {secs}s" if minutes else f"{secs}s")


def clock(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"
