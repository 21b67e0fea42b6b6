"""What every reconciler of the controller shares: the state, the stack driver, the config, the logs, the
bounded pools of background operations, and the way to reach a node's agent.

Where this sits: built once by the daemon (`orchestrator.controller.daemon.Controller`), handed to each
reconciler (jobs, pools and workers, the stacks janitor, the storage janitor). Nothing here decides anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.config import SortieConfig
from orchestrator.controller.node_events import NodeEvents, NodeWatchers, WatchSignal
from orchestrator.controller.ops import Finished, LoopOperations, OperationPool
from orchestrator.infra.agent_async import NodeAgent, SyncAgentOnLoop
from orchestrator.infra.agent_client import AgentClient
from orchestrator.infra.stack_driver import StackDriver, copy_engine_output
from orchestrator.job_logs import JobLogs
from state.leases import Leases
from state.store import StateStore

log = logging.getLogger("sortie.controller")
T = TypeVar("T")
Connect = Callable[[str, str], AgentClient]  # (agent URL, cluster token) -> a client


def connect_agent(url: str, token: str) -> AgentClient:
    return AgentClient(url, token, timeout=10)


@dataclass
class ControllerContext:
    store: StateStore
    driver: StackDriver
    config: SortieConfig
    home: Path
    logs: JobLogs
    stack_ops: OperationPool
    agent_ops: OperationPool  # file syncs, MOUNT_CACHED flushes, graceful stops, pool releases: threads
    node_io: OperationPool  # issue 15: polls, run starts, log copies, health checks: coroutines on the hub's loop
    connect: Connect = connect_agent
    watchers: NodeWatchers | None = None  # issue 15: one watch per live node (node_events.py)
    # issue 14: this replica's leases; None where one controller drives everything (unit tests, the harness)
    leases: Leases | None = None
    early_refreshes: set[str] = field(default_factory=set)  # stacks refreshed on a suspicion (issue 15)

    @classmethod
    def create(cls, store: StateStore, driver: StackDriver, config: SortieConfig, home: Path,
               wake: Callable[[], None] | None = None, *, inline: bool = False,
               connect: Connect = connect_agent, leases: Leases | None = None) -> ControllerContext:
        """`inline`: operations run at once on the ticker's thread (unit tests, the crash-point harness)."""
        hub = NodeEvents(wake, watch_timeout=config.controller.watch_timeout_seconds,
                         confirm_seconds=config.controller.loss_confirm_seconds,
                         io_connections=config.controller.agent_connections)
        return cls(store, driver, config, home, JobLogs(home, config.controller.logs_dir),
                   OperationPool(0 if inline else config.pulumi.operation_slots, "stack-op", wake),
                   OperationPool(0 if inline else config.controller.agent_workers, "agent-op", wake),
                   LoopOperations(None if inline else hub, wake), connect, NodeWatchers(hub), leases)

    def holds(self, lease: str) -> bool:
        """Whether this replica holds (or just took) the lease `lease`; always, without leases."""
        return self.leases is None or self.leases.claim(lease)

    def clients(self, nodes: list[dict[str, Any]] | None, token_enc: str | None) -> list[tuple[dict[str, Any],
                                                                                                 AgentClient]]:
        """A client per node, by rank."""
        token = self.store.box.open(token_enc)
        return [(n, self.connect(n["url"], token)) for n in sorted(nodes or [], key=lambda n: n["rank"])]

    def node_agents(self, nodes: list[dict[str, Any]] | None,
                    token_enc: str | None) -> list[tuple[dict[str, Any], NodeAgent]]:
        """An agent client per node, by rank, for coroutines on `node_io`: the hub's shared session for real
        agents; a test's own clients (`connect`) behind the same face, on a thread (or in place, inline)."""
        loop = self.node_io.on_loop
        if loop and self.watchers is not None and self.connect is connect_agent:
            hub, token = self.watchers.hub, self.store.box.open(token_enc)
            return [(n, hub.agent(n["url"], token)) for n in sorted(nodes or [], key=lambda n: n["rank"])]
        return [(n, SyncAgentOnLoop(client, threaded=loop)) for n, client in self.clients(nodes, token_enc)]

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """From a coroutine on `node_io`: `fn(*args)`, work that blocks (the state DB, decryption), on a thread
        so the loop never waits on it; in place when inline."""
        if self.node_io.on_loop:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def stack_op(self, op: str, stack: str, fn: Callable[[], Any], log_path: Path) -> Finished | None:
        """A stack operation's result once it finished, else None after making sure it runs; the engine's output
        goes to `log_path` (a job's controller log, a pool's log)."""
        return self.stack_ops.ensure((op, stack), copy_engine_output, self.driver, stack, fn,
                                     lambda data: self.logs.append(log_path, data))

    def watch(self, owner: Any, nodes: list[dict[str, Any]] | None, token_enc: str | None,
              run: str | None = None) -> WatchSignal:
        """Issue 15: what the nodes' watches saw since `owner`'s last look (news, lost ranks, quiet)."""
        if self.watchers is None:
            return WatchSignal(False, (), False)
        return self.watchers.look(owner, nodes or [], lambda: self.store.box.open(token_enc), run)

    def notice(self, nodes: list[dict[str, Any]] | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Issue 24: the first of `nodes` whose agent gave a preemption notice, with the notice."""
        if self.watchers is None:
            return None
        for node in nodes or []:
            notice = self.watchers.hub.notice(node["url"])
            if notice is not None:
                return node, notice
        return None

    def run_ended(self, node: dict[str, Any], run: str) -> bool:
        """Whether the node's watch saw `run` end (or never saw it start)."""
        seen = self.watchers.hub.latest(node["url"]) if self.watchers is not None else None
        return seen is None or run not in seen.runs or seen.runs[run].state != "running"

    def confirm_loss_now(self, owner: Any, stack: str, signal: WatchSignal) -> bool:
        """Issue 15: a node of `stack` reported lost by its watch: refresh now (while one is in flight, or at most
        once per `confirm_again_seconds` per owner)."""
        return bool(signal.lost_ranks) and self.watchers is not None and (
            self.stack_ops.busy(("refresh", stack)) or self.watchers.may_confirm(owner))

    def refresh_early(self, stack: str, start: Callable[[], Any]) -> None:
        """Issue 15: a node's watch broke and its agent does not answer a probe: `start` the infra's refresh of
        `stack` now, while the hub confirms the loss, so the decision has its answer when the loss is confirmed.
        Nothing is decided from it before then; a suspicion the node clears drops it (`drop_early_refresh`)."""
        if not self.stack_ops.busy(("refresh", stack)) and stack not in self.early_refreshes:
            self.early_refreshes.add(stack)
            start()

    def drop_early_refresh(self, stack: str) -> None:
        """The node answered again: an early refresh that finished is handed to nobody (one still running is left
        to finish; its result answers the next suspicion or is dropped the same way)."""
        if stack in self.early_refreshes and not self.stack_ops.running(("refresh", stack)):
            self.stack_ops.discard(("refresh", stack))
            self.early_refreshes.discard(stack)

    def poll_every(self, signal: WatchSignal) -> float:
        interval = self.config.controller.poll_interval_seconds
        return self.watchers.poll_interval(signal, interval) if self.watchers is not None else interval

    def busy(self) -> bool:
        return bool(self.stack_ops.in_flight() or self.agent_ops.in_flight() or self.node_io.in_flight())

    def shutdown(self) -> None:
        self.stack_ops.shutdown()
        self.agent_ops.shutdown()
        self.node_io.shutdown()
        if self.watchers is not None:
            self.watchers.hub.close()


def pool_log(home: Path, pool: str) -> Path:
    return home / "logs" / "pools" / f"{pool}.log"


def note_pool(ctx: ControllerContext, pool: str, line: str) -> None:
    ctx.logs.append(pool_log(ctx.home, pool), f"{time.strftime('%H:%M:%S')} {line}\n".encode())
    log.info("pool %s: %s", pool, line)
