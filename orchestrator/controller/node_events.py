"""Node events: one asyncio loop, in a thread of its own, holding one watch (the agent's GET /watch) per live node.

The reconcilers never wait on a node: they ask this hub, which is thread-safe and answers from memory.

- `ensure_watch(key, url, token)` keeps a long poll open to the node's agent; every answer is applied to what the
  hub knows of the node's runs (state, exit code, log offset) and, when something changed, `wake()` is called so
  the ticker runs at once rather than at its next interval.
- A quiet watch comes back empty after `watch_timeout` seconds: that is the heartbeat. A watch that breaks
  (refused, reset, or no answer within the heartbeat and a margin) makes the hub probe the agent (GET /health) at
  once and again every `PROBE_EVERY` seconds. A node that answers is fine (one dropped connection never loses a
  job); one that has not answered for `confirm_seconds` is reported `lost`, and the reconciler then asks the infra
  (refresh) before anything is recovered.
- An agent without /watch (404: an older agent on a long-lived pool worker) is put in `poll` mode and left to the
  reconcilers' polls. The controller log says which mode each node is in.
- The reconcilers' own node I/O (polls, run starts, log copies, health checks) runs on the same loop too:
  `submit(coroutine)` with `agent(url, token)` clients over one bounded session (`ops.LoopOperations`).
- Sequence numbers go on from where the hub was; an agent whose journal no longer has them (or a new node at the
  same address) answers `reset` with every run's status, so no change is lost either way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Hashable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from orchestrator.infra.agent_async import AsyncAgentClient

T = TypeVar("T")

log = logging.getLogger("sortie.node_events")
WATCH_TIMEOUT = 20.0  # seconds an agent holds a quiet watch: the heartbeat
WATCH_MARGIN = 5.0  # no answer this long past the heartbeat (less for a heartbeat under 10 s): the watch is broken
CONFIRM_SECONDS = 2.0  # a broken watch whose agent does not answer probes this long: the node is reported lost
PROBE_TIMEOUT = 2.0
PROBE_EVERY = 0.25  # while confirming; slower (up to PROBE_BACKOFF_MAX) once the node is reported lost
PROBE_BACKOFF_MAX = 5.0
EXPIRE_SECONDS = 120.0  # a watch nobody asked about for this long is closed
RUNS_KEPT = 256  # runs remembered per node (a pool worker runs many jobs over its life)
CONNECT_SLOTS = 32  # new watches opening at once (the rest wait their turn: no connection storm)
MAX_WATCHES = 20_000
IO_CONNECTIONS = 64  # connections open at once for the reconcilers' calls on the loop (polls, starts, log copies)

Mode = Literal["connecting", "watch", "poll"]


@dataclass
class RunSeen:
    """What the watch said last about one run."""

    state: str = "running"  # running | exited | cancelled
    exit_code: int | None = None
    log_offset: int = 0
    ended_at: float | None = None  # the agent's clock, as in exit.json
    seen_at: float = 0.0  # when the hub learnt of the last change (this machine's clock)
    version: int = 0  # goes up with every change


@dataclass
class NodeSeen:
    """A copy of what the hub knows of one node."""

    url: str
    mode: Mode = "connecting"
    lost: bool = False  # watch broken and no answer to probes for `confirm_seconds`
    suspect_since: float | None = None  # the watch broke and no probe has answered yet
    unanswered: bool = False  # ... and a probe since has failed too
    seq: int = 0
    epoch: str | None = None
    version: int = 0  # goes up with every change of a run or of `lost`
    runs: dict[str, RunSeen] = field(default_factory=dict)
    notice: dict[str, Any] | None = None  # the agent's preemption notice ({"source", "deadline"}), once given


@dataclass
class _Node:
    seen: NodeSeen
    token: str
    touched: float
    task: asyncio.Task[None] | None = None
    dropped: bool = False


class NodeEvents:
    """The hub: `ensure_watch`, `drop`, `latest`, `version`; `close` at the end."""

    def __init__(self, wake: Callable[[], None] | None = None, *, watch_timeout: float = WATCH_TIMEOUT,
                 confirm_seconds: float = CONFIRM_SECONDS, max_watches: int = MAX_WATCHES,
                 io_connections: int = IO_CONNECTIONS) -> None:
        self.wake = wake
        self.io_connections = io_connections
        self.watch_timeout = watch_timeout
        self.confirm_seconds = confirm_seconds
        self.max_watches = max_watches
        self._nodes: dict[Hashable, _Node] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closed = False

    # --- the thread-safe API ---------------------------------------------------------------------------

    def ensure_watch(self, key: Hashable, url: str, token: str | Callable[[], str], since: int = 0) -> bool:
        """Watch the node at `url` under `key` (again: only marks it wanted). A url the hub cannot watch (not
        http) is put in poll mode. `token` may be a callable, called only when a watch starts. False when the
        hub is full or closed."""
        now = time.monotonic()
        with self._lock:
            node = self._nodes.get(key)
            if node is not None and node.seen.url == url and not node.dropped:
                node.touched = now
                return True
            if self._closed or (node is None and len(self._nodes) >= self.max_watches):
                return False
            if node is not None:
                node.dropped = True
            node = _Node(NodeSeen(url, seq=since), token if isinstance(token, str) else token(), now)
            self._nodes[key] = node
        if not url.startswith(("http://", "https://")):
            node.seen.mode = "poll"
            return True
        self._start()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._begin, key, node)
        return True

    def drop(self, key: Hashable) -> None:
        with self._lock:
            node = self._nodes.pop(key, None)
        if node is not None:
            node.dropped = True
            if node.task is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(node.task.cancel)

    def latest(self, key: Hashable) -> NodeSeen | None:
        with self._lock:
            node = self._nodes.get(key)
            if node is None:
                return None
            seen = node.seen
            return replace(seen, runs={k: replace(v) for k, v in seen.runs.items()})

    def version(self, key: Hashable, run_id: str | None = None) -> tuple[int, bool, bool]:
        """A cheap look: the version of one run (or of the whole node), whether the node is reported lost, and
        whether it is watched and healthy (the watch is its heartbeat)."""
        with self._lock:
            node = self._nodes.get(key)
            if node is None:
                return (0, False, False)
            seen = node.seen
            healthy = seen.mode == "watch" and seen.suspect_since is None and not seen.lost
            if run_id is None:
                return (seen.version, seen.lost, healthy)
            run = seen.runs.get(run_id)
            return (run.version if run else 0, seen.lost, healthy)

    def suspect(self, key: Hashable) -> bool:
        """The node's watch broke and a probe since has failed too (not yet reported lost)."""
        with self._lock:
            node = self._nodes.get(key)
            return node is not None and node.seen.unanswered and not node.seen.lost

    def notice(self, key: Hashable) -> dict[str, Any] | None:
        """The node's preemption notice ({"source", "deadline", "detected_at"}), if its agent gave one."""
        with self._lock:
            node = self._nodes.get(key)
            return dict(node.seen.notice) if node is not None and node.seen.notice else None

    def submit(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> concurrent.futures.Future[T]:
        """Run the coroutine `fn(*args)` on the hub's loop (the reconcilers' node I/O); its future, from any
        thread."""
        if self._closed:
            raise RuntimeError("the node-events loop is closed")
        self._start()
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(*args), self._loop)

    def agent(self, url: str, token: str, timeout: float = 10.0) -> AsyncAgentClient:
        """A client of the agent at `url` for coroutines run by `submit`: the loop's shared session, with
        keep-alive connections and at most `io_connections` open at once."""
        self._start()
        return AsyncAgentClient(self._io_session, url, token, timeout)

    def modes(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for node in self._nodes.values():
                counts[node.seen.mode] = counts.get(node.seen.mode, 0) + 1
            return counts

    def __len__(self) -> int:
        with self._lock:
            return len(self._nodes)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            nodes = list(self._nodes.values())
            self._nodes.clear()
        for node in nodes:
            node.dropped = True
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join(timeout=10)

    # --- the loop ----------------------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run_loop, name="node-events", daemon=True)
            self._thread.start()
        self._ready.wait()

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._stop_event = asyncio.Event()
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        import aiohttp
        import yarl

        self._aiohttp, self._yarl = aiohttp, yarl
        resolver = aiohttp.ThreadedResolver()
        # Watches hold a connection each (one per node); probes have a small pool of their own, so a full watch
        # pool never delays a probe. Keep-alive: a node's next watch reuses its connection.
        self._watch_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            limit=self.max_watches + 16, limit_per_host=0, resolver=resolver, keepalive_timeout=self.watch_timeout * 3))
        self._probe_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            limit=64, limit_per_host=0, resolver=resolver, force_close=True))
        self._io_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            limit=self.io_connections, limit_per_host=0, resolver=resolver, keepalive_timeout=30))
        self._connect_slots = asyncio.Semaphore(CONNECT_SLOTS)
        self._probe_timeout = aiohttp.ClientTimeout(total=None, sock_connect=PROBE_TIMEOUT, sock_read=PROBE_TIMEOUT)
        self._ready.set()
        janitor = asyncio.ensure_future(self._expire())
        await self._stop_event.wait()
        janitor.cancel()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._watch_session.close()
        await self._probe_session.close()
        await self._io_session.close()

    def _begin(self, key: Hashable, node: _Node) -> None:
        if not node.dropped:
            node.task = asyncio.ensure_future(self._watch(key, node))

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            now = time.monotonic()
            with self._lock:
                stale = [k for k, n in self._nodes.items() if now - n.touched > EXPIRE_SECONDS]
            for key in stale:
                self.drop(key)

    async def _watch(self, key: Hashable, node: _Node) -> None:
        aiohttp, yarl = self._aiohttp, self._yarl
        headers = {"Authorization": f"Bearer {node.token}"}
        # Read and connect timeouts, not a total: waiting for a pooled connection is no sign of a lost node.
        margin = min(WATCH_MARGIN, max(1.0, self.watch_timeout / 2))
        held = aiohttp.ClientTimeout(total=None, sock_connect=WATCH_MARGIN, sock_read=self.watch_timeout + margin)
        at_once = aiohttp.ClientTimeout(total=None, sock_connect=WATCH_MARGIN, sock_read=WATCH_MARGIN)
        first = True
        while not node.dropped:
            seen = node.seen
            wait = 0.0 if first else self.watch_timeout  # the first answer at once: what happened so far
            epoch = f"&epoch={seen.epoch}" if seen.epoch and seen.epoch.isalnum() else ""
            url = yarl.URL(f"{seen.url}/watch?since={seen.seq}&timeout={wait}{epoch}", encoded=True)
            try:
                async with contextlib.AsyncExitStack() as stack:
                    if first:
                        await stack.enter_async_context(self._connect_slots)
                    limit = at_once if first else held
                    async with self._watch_session.get(url, headers=headers, timeout=limit) as resp:
                        if resp.status in (404, 401, 403):
                            self._set_mode(node, "poll", f"its agent answered /watch with {resp.status}")
                            return
                        resp.raise_for_status()
                        body = json.loads(await resp.read())
                self._apply(node, body)
                first = False
            except asyncio.CancelledError:
                raise
            except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError) as exc:
                if not await self._confirm(node, headers, exc):
                    return
                first = True

    def _set_mode(self, node: _Node, mode: Mode, why: str) -> None:
        if node.seen.mode != mode:
            node.seen.mode = mode
            log.info("node %s: %s mode (%s)", node.seen.url, mode, why)

    def _apply(self, node: _Node, body: dict[str, Any]) -> None:
        now = time.time()
        changed = False
        with self._lock:
            seen = node.seen
            if body.get("reset"):
                for status in body.get("runs") or []:
                    run = seen.runs.setdefault(status["run_id"], RunSeen())
                    run.state, run.exit_code = status["state"], status["exit_code"]
                    run.log_offset, run.ended_at = status.get("log_size", 0), status.get("ended_at")
                    run.seen_at, run.version = now, run.version + 1
                changed = True
            for event in body["events"]:
                if event["kind"] == "notice":  # the node goes soon: recovery starts now (issue 24)
                    seen.notice = {k: event.get(k) for k in ("source", "deadline", "detected_at")}
                    changed = True
                    continue
                if event["kind"] == "node":  # issue 28: the node's disk filled or freed; a poll now says which
                    changed = True
                    continue
                known = seen.runs.pop(event["run_id"]) if event["run_id"] in seen.runs else RunSeen()
                run = seen.runs[event["run_id"]] = known  # newest last
                kind = event["kind"]
                if kind == "started":
                    run.state = "running"
                elif kind == "log":
                    run.log_offset = max(run.log_offset, int(event["offset"]))
                elif kind in ("exited", "cancelled"):
                    run.state, run.exit_code, run.ended_at = kind, event.get("exit_code"), event.get("ended_at")
                run.seen_at, run.version = now, run.version + 1
                changed = True
            while len(seen.runs) > RUNS_KEPT:
                seen.runs.pop(next(iter(seen.runs)))
            seen.seq, seen.epoch = int(body["seq"]), body["epoch"]
            if seen.lost or seen.suspect_since is not None:
                if seen.lost:
                    log.info("node %s: answers its watch again; no longer lost", seen.url)
                seen.lost, seen.suspect_since, seen.unanswered = False, None, False
                changed = True
            if changed:
                seen.version += 1
        self._set_mode(node, "watch", "its agent has /watch")
        if changed and self.wake is not None:
            self.wake()

    async def _probe(self, node: _Node, headers: dict[str, str]) -> bool:
        aiohttp = self._aiohttp
        try:
            async with self._probe_session.get(f"{node.seen.url}/health", headers=headers,
                                               timeout=self._probe_timeout) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def _confirm(self, node: _Node, headers: dict[str, str], error: BaseException) -> bool:
        """The watch broke: probe until the agent answers (True: watch again) or the node is dropped (False).
        Past `confirm_seconds` without an answer the node is reported lost (once) and probed ever more slowly."""
        seen = node.seen
        began = time.monotonic()
        with self._lock:
            if seen.suspect_since is None:
                seen.suspect_since = began
        log.info("node %s: watch broke (%s); probing", seen.url, type(error).__name__ if not str(error) else error)
        delay = PROBE_EVERY
        while not node.dropped:
            if await self._probe(node, headers):
                with self._lock:
                    was_lost = seen.lost
                    seen.suspect_since, seen.unanswered = None, False
                    if was_lost:
                        seen.lost = False
                        seen.version += 1
                log.info("node %s: answers its probe%s", seen.url, "; no longer lost" if was_lost else "")
                if was_lost and self.wake is not None:
                    self.wake()
                return True
            if not seen.unanswered:  # the first probe failed too: the reconciler may ask the infra already
                with self._lock:
                    seen.unanswered = True
                if self.wake is not None:
                    self.wake()
            if not seen.lost and time.monotonic() - began >= self.confirm_seconds:
                with self._lock:
                    seen.lost = True
                    seen.version += 1
                log.warning("node %s: no answer for %.1fs after its watch broke: reported lost (the infra decides)",
                            seen.url, time.monotonic() - began)
                if self.wake is not None:
                    self.wake()
            if seen.lost:
                delay = min(delay * 2, PROBE_BACKOFF_MAX)
            await asyncio.sleep(delay)
        return False



@dataclass(frozen=True)
class WatchSignal:
    """What the hub says about the nodes of one attempt (or worker) since the owner's last look."""

    news: bool  # a run of theirs changed (or a node was lost or found): poll now
    lost_ranks: tuple[int, ...]  # nodes reported lost: ask the infra (refresh) now
    quiet: bool  # every node is watched and healthy: the watch is the heartbeat, polls can wait
    suspect_ranks: tuple[int, ...] = ()  # watches broken, probes not answered yet: the infra may be asked already


class NodeWatchers:
    """The reconcilers' side of the hub: one look per attempt or worker per tick, with what changed since."""

    def __init__(self, hub: NodeEvents, confirm_again_seconds: float = 15.0) -> None:
        self.hub = hub
        self.confirm_again_seconds = confirm_again_seconds
        self._seen: dict[Hashable, tuple[Any, ...]] = {}
        self._confirmed_at: dict[Hashable, float] = {}

    def look(self, owner: Hashable, nodes: Iterable[dict[str, Any]], token: Callable[[], str],
             run_id: str | None = None) -> WatchSignal:
        """Watch every node (`rank`, `url`) and say what changed since this owner's last look."""
        marks, lost, suspect, quiet = [], [], [], True
        for node in nodes:
            url = node["url"]
            self.hub.ensure_watch(url, url, token)
            version, is_lost, healthy = self.hub.version(url, run_id)
            quiet = quiet and healthy
            marks.append((version, is_lost))
            if is_lost:
                lost.append(int(node["rank"]))
            elif not healthy and self.hub.suspect(url):
                suspect.append(int(node["rank"]))
        mark = tuple(marks)
        news = self._seen.get(owner) not in (None, mark)
        self._seen[owner] = mark
        return WatchSignal(news, tuple(lost), quiet, tuple(suspect))

    def may_confirm(self, owner: Hashable) -> bool:
        """True at most once per `confirm_again_seconds` per owner: a node the infra still has, but that does not
        answer, is not refreshed again on every tick."""
        now = time.monotonic()
        if now - self._confirmed_at.get(owner, -1e9) < self.confirm_again_seconds:
            return False
        self._confirmed_at[owner] = now
        return True

    def forget(self, owner: Hashable, nodes: Iterable[dict[str, Any]] = ()) -> None:
        """The owner is done; its nodes are no longer watched (a pool worker's, torn down; a cluster's)."""
        self._seen.pop(owner, None)
        self._confirmed_at.pop(owner, None)
        for node in nodes:
            self.hub.drop(node["url"])

    def poll_interval(self, signal: WatchSignal, interval: float) -> float:
        """How long the owner's periodic poll waits: as configured, or 6 times that while the watch is the
        heartbeat (a safety net; news polls at once)."""
        return interval * 6 if signal.quiet else interval
