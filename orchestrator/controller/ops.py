"""Keyed background operations of the controller: stack operations and agent calls run in bounded pools, so
the ticker never blocks. Where this sits: under every reconciler, which asks `ensure(key, fn, *args)` each tick
until the operation's result comes back once.

`workers=0` runs each operation at once on the caller's thread (unit tests and the crash-point harness: one
tick then does exactly what it asks, in order).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from orchestrator.controller.node_events import NodeEvents

T = TypeVar("T")


@dataclass(frozen=True)
class Finished:
    """A finished operation: its value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class OperationPool:
    """At most one operation per key; bounded workers."""

    def __init__(self, workers: int, name: str, on_done: Callable[[], None] | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) if workers > 0 else None
        self._futures: dict[Hashable, Future[Any]] = {}
        self._lock = threading.Lock()
        self._on_done = on_done

    def ensure(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> Finished | None:
        """The result of the operation `key` once it has finished (handed over once, then forgotten); until then
        None, after making sure `fn(*args)` runs under that key."""
        with self._lock:
            future = self._futures.get(key)
            if future is None:
                future = self._start(fn, args)
                self._futures[key] = future
                started = True
            else:
                started = False
            if not future.done():
                if started and self._on_done is not None:  # a finished operation wakes the ticker at once
                    on_done = self._on_done
                    future.add_done_callback(lambda _f: on_done())
                return None
            del self._futures[key]
        error = future.exception()
        return Finished(error=error) if error is not None else Finished(value=future.result())

    def _start(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # a BaseException (a crash, an exit) goes on up, as it would kill the process
            future.set_exception(exc)
        return future

    def discard(self, key: Hashable) -> None:
        """Forget the finished operation `key` unread (a refresh asked for on a suspicion that the node's next
        answer cleared). One still running is left alone: no second operation may start under its key."""
        with self._lock:
            future = self._futures.get(key)
            if future is not None and future.done():
                del self._futures[key]

    def running(self, key: Hashable) -> bool:
        """Started and not finished yet."""
        with self._lock:
            future = self._futures.get(key)
            return future is not None and not future.done()

    @property
    def on_loop(self) -> bool:
        """The operations are coroutines on the node-events loop (`LoopOperations`); threads or inline here."""
        return False

    def busy(self, key: Hashable) -> bool:
        """Started and its result not yet handed over."""
        with self._lock:
            return key in self._futures

    def in_flight(self) -> int:
        with self._lock:
            return sum(1 for f in self._futures.values() if not f.done())

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class LoopOperations(OperationPool):
    """Keyed coroutines on the node-events loop (issue 15: the controller's node I/O is asyncio), with the same
    `ensure`/`busy` as the thread pools. Without a hub (`inline`), each runs to its end at once on the caller's
    thread, in a loop of its own."""

    def __init__(self, hub: NodeEvents | None, on_done: Callable[[], None] | None = None) -> None:
        super().__init__(0, "node-io", on_done)
        self._hub = hub

    @property
    def on_loop(self) -> bool:
        """The coroutines run on the hub's loop (not inline)."""
        return self._hub is not None

    def _start(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        if self._hub is not None:
            try:
                return self._hub.submit(fn, *args)
            except RuntimeError as exc:  # the loop is closed: the controller is stopping
                future: Future[Any] = Future()
                future.set_exception(exc)
                return future
        return super()._start(lambda *a: run_here(fn(*a)), args)


def run_here(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to its end on this thread, in a loop of its own that it leaves to nobody (unlike
    `asyncio.run`, the thread's current loop, which other libraries ask for, is left as it was)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()
