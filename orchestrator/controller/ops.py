"""Keyed background operations: the ticker submits, later ticks collect. Never blocks the ticker."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Finished:
    """A finished operation: its value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class OperationPool:
    """At most one operation per key; bounded workers. `collect(key)` hands a finished result over once."""

    def __init__(self, workers: int, name: str, on_done: Callable[[], None] | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._futures: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self._on_done = on_done

    def submit(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> bool:
        """Start `fn(*args)` under `key` unless an operation of that key is already running or uncollected."""
        with self._lock:
            if key in self._futures:
                return False
            future = self._pool.submit(fn, *args)
            self._futures[key] = future
        if self._on_done is not None:  # a finished operation wakes the ticker: no waiting for the next tick
            on_done = self._on_done
            future.add_done_callback(lambda _f: on_done())
        return True

    def running(self, key: Hashable) -> bool:
        with self._lock:
            future = self._futures.get(key)
        return future is not None and not future.done()

    def busy(self, key: Hashable) -> bool:
        """Submitted and not yet collected."""
        with self._lock:
            return key in self._futures

    def collect(self, key: Hashable) -> Finished | None:
        """The result of a finished operation (removing it), or None while none has finished."""
        with self._lock:
            future = self._futures.get(key)
            if future is None or not future.done():
                return None
            del self._futures[key]
        error = future.exception()
        return Finished(error=error) if error is not None else Finished(value=future.result())

    def in_flight(self) -> int:
        with self._lock:
            return sum(1 for f in self._futures.values() if not f.done())

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
