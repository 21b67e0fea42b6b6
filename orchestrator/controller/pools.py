"""The pool reconciler: each tick, converge every pool's workers on its spec and size (the pure
`orchestrator.policy.pools.decide_pool`), and move each worker one step (stack up, files and setup, health, destroy)
through the named transitions of `state.pool_transitions`.

Where this sits: composed by the daemon (`Controller`) before the job reconciler, over the shared
`ControllerContext`. Pool jobs themselves are driven by the job reconciler, which asks `free_worker` for a READY
worker with a free slot (read from the state, not from memory) and assigns it in one guarded transition.

Each worker is its own stack (`stacks/pool_program.py`), named `<prefix>-pool-<pool>-w<number>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from orchestrator.controller.context import ControllerContext, note_pool, pool_log
from orchestrator.controller.node_files import (
    NodeFiles,
    NodeStorageError,
    node_buckets_for,
    node_fuse_for,
    node_package_for,
    node_python,
    task_steps,
)
from orchestrator.controller.ops import Finished
from orchestrator.controller.runs import job_dir
from orchestrator.errors import NoCapacityError, StackOperationError
from orchestrator.infra.agent_async import NodeAgent
from orchestrator.infra.agent_client import AgentError
from orchestrator.policy.placement import Infeasible, place
from orchestrator.policy.pools import PoolActions, WorkerView, decide_pool, policy_of, worker_program
from stacks.spec import StackProgram, new_cluster_token
from state.machine import PoolStatus, TransitionError, WorkerStatus
from state.pool_transitions import pool_lease

if TYPE_CHECKING:
    from state.models import AttemptRow, JobRow, PoolRow, WorkerRow

log = logging.getLogger("sortie.pools")
FAILED_RETRY_SECONDS = 10.0  # a pool whose worker just failed waits this long before making another


class PoolReconciler:
    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self._health_at: dict[int, float] = {}  # pacing of health polls
        self._failed_at: dict[str, float] = {}  # pacing of new workers after a failure

    def note(self, pool: str, line: str) -> None:
        note_pool(self.ctx, pool, line)

    # --- the tick ---------------------------------------------------------------------------------------

    def tick(self) -> int:
        """One pass over every pool; returns how many pools exist (the controller stays up while any does)."""
        pools = self.store.pools()
        for pool in pools:
            if not self.ctx.holds(pool_lease(pool.name)):  # issue 14: another replica drives this pool
                continue
            try:
                self._pool(pool)
            except TransitionError as exc:
                log.warning("pool %s: %s; re-reading", pool.name, exc)
            except Exception:  # one pool's trouble never stops the others
                log.exception("pool %s: controller error", pool.name)
        return len(pools)

    def _pool(self, pool: PoolRow) -> None:
        workers = self.store.workers(pool.name)
        jobs_on = self.store.jobs_on_workers([w.id for w in workers])
        for worker in workers:
            self._step(pool, worker)
        workers = self.store.workers(pool.name)
        jobs = self.store.pool_jobs(pool.name)
        now = time.time()
        if jobs:
            self.store.pool_busy(pool.name)
        idle_for = None if jobs else now - (pool.last_busy_at or pool.created_at)
        views = [WorkerView(w.id, w.number, w.stack_name, w.spec_hash, w.status, len(jobs_on.get(w.id, [])))
                 for w in workers]
        actions = decide_pool(policy_of(pool), pool.spec_hash, views, len(jobs), idle_for,
                              down=pool.status == PoolStatus.DOWN)
        self._apply(pool, workers, actions)
        if pool.status == PoolStatus.DOWN and not workers:
            self._clean_files(pool)
            self.store.pool_terminated(pool.name)
            if self.ctx.leases is not None:
                self.ctx.leases.drop(pool_lease(pool.name))
            self.note(pool.name, "every worker destroyed; pool terminated")

    def _clean_files(self, pool: PoolRow) -> None:
        """The staged workdir and file mounts of every apply of the pool, and buckets it made non-persistent."""
        from orchestrator.storage.staging import clean

        storage = pool.storage or {}
        for cleanup in [*storage.get("older", []), *([storage["cleanup"]] if storage.get("cleanup") else [])]:
            removed = clean({"cleanup": cleanup}, self.ctx.config, self.ctx.home)
            if removed:
                self.note(pool.name, f"removed {', '.join(removed)}")

    def _apply(self, pool: PoolRow, workers: list[WorkerRow], actions: PoolActions) -> None:
        by_id = {w.id: w for w in workers}
        for worker_id in actions.drain:
            worker = by_id[worker_id]
            if worker.status == WorkerStatus.READY:
                self.store.drain_worker(worker)
                self.note(pool.name, f"worker {worker.number}: draining (finishes its jobs, then goes)")
        for worker_id in actions.destroy:
            worker = by_id[worker_id]
            if worker.status != WorkerStatus.TERMINATING:
                self.store.terminate_worker(worker, f"destroying {worker.stack_name}")
                self.note(pool.name, f"worker {worker.number}: destroying {worker.stack_name}")
        if actions.create and time.time() - self._failed_at.get(pool.name, 0.0) >= FAILED_RETRY_SECONDS:
            for _ in range(actions.create):
                self._create(pool)

    def _create(self, pool: PoolRow) -> None:
        choice = place(pool.spec["resources"], self.ctx.config)
        if isinstance(choice, Infeasible):
            self._failed_at[pool.name] = time.time()
            self.note(pool.name, f"cannot place a worker: {choice.reason}")
            return
        worker = self.store.create_worker(pool.name, spec_hash=pool.spec_hash,
                                          stack_prefix=self.ctx.config.pulumi.stack_prefix, infra=choice.infra,
                                          region=choice.region, use_spot=choice.use_spot,
                                          price_per_hour=choice.price_per_hour,
                                          token_enc=self.store.box.seal(new_cluster_token()))
        self.note(pool.name, f"worker {worker.number}: creating {worker.stack_name} in {choice.infra}/{choice.region}")

    # --- one worker ---------------------------------------------------------------------------------------

    def _step(self, pool: PoolRow, worker: WorkerRow) -> None:
        handler: dict[str, Callable[[PoolRow, WorkerRow], None]] = {
            WorkerStatus.PROVISIONING: self._provisioning, WorkerStatus.SETTING_UP: self._setting_up,
            WorkerStatus.READY: self._health, WorkerStatus.DRAINING: self._health,
            WorkerStatus.TERMINATING: self._terminating,
        }
        if worker.status in handler:
            handler[worker.status](pool, worker)

    def _program(self, pool: PoolRow, worker: WorkerRow) -> StackProgram:
        steps = task_steps(pool.storage, 0)
        config = self.ctx.config
        return worker_program(pool.name, pool.spec, worker.stack_name, worker.number, worker.infra, worker.region,
                              worker.use_spot, self.store.box.open(worker.token_enc), self.ctx.home, config,
                              node_package=node_package_for(steps, worker.infra, config),
                              node_fuse=node_fuse_for(steps, worker.infra),
                              node_buckets=node_buckets_for(steps, worker.infra))  # issue 17: its own profile

    def _op(self, pool: str, op: str, stack: str, fn: Callable[[], Any]) -> Finished | None:
        return self.ctx.stack_op(op, stack, fn, pool_log(self.ctx.home, pool))

    def _provisioning(self, pool: PoolRow, worker: WorkerRow) -> None:
        program = self._program(pool, worker)
        result = self._op(pool.name, "up", worker.stack_name, lambda: self.ctx.driver.up(worker.stack_name, program))
        if result is None:
            return
        if not result.ok:
            error = result.error
            cleaned = not (isinstance(error, StackOperationError) and error.cleanup_failed)
            why = f"{'no capacity' if isinstance(error, NoCapacityError) else 'up failed'}: {error}"
            self._failed_at[pool.name] = time.time()
            self.store.fail_worker(worker, why, destroyed=cleaned)
            self.note(pool.name, f"worker {worker.number}: failed: {why}")
            return
        out = result.value.outputs
        nodes = [{k: n[k] for k in ("rank", "node_id", "ip", "url", "region")}
                 for n in (out["nodes"] if "nodes" in out else [out["worker"]])]
        self.store.worker_provisioned(worker, nodes)
        self.note(pool.name, f"worker {worker.number}: up ({len(nodes)} node(s)); setting up")

    def _setup(self, pool: PoolRow, worker: WorkerRow) -> None:
        """Files and setup on every node of the worker, once (a second start of the setup run is refused by the
        agent, so a restarted controller waits for the first)."""
        from orchestrator.policy.run_env import node_env

        files = NodeFiles(self.ctx.config, self.ctx.home, task_steps(pool.storage, 0), worker.id,
                          python=node_python(worker.infra), infra=worker.infra)
        setup = pool.spec.get("setup")
        clients = self.ctx.clients(worker.nodes, worker.token_enc)
        ips = [n["ip"] for n, _ in clients]
        def note(line: str) -> None:
            self.note(pool.name, f"worker {worker.number}: {line}")

        for _node, client in clients:
            files.put(client, note)
        if not setup:
            return
        run_id = f"setup-w{worker.id}"
        for node, client in clients:
            env = node_env(envs=pool.spec.get("envs") or {}, secrets={}, job_id=0, job_name=pool.name, task_index=0,
                           submitted_at=pool.created_at, rank=node["rank"], ips=ips, accelerators={})
            client.start(setup, run_id, env=env)
        for node, client in clients:
            status = client.wait(run_id, timeout=3600, interval=0.3)
            output, _ = client.log(run_id, 0)
            for line in output.decode(errors="replace").splitlines():
                self.note(pool.name, f"worker {worker.number} (setup, rank {node['rank']}): {line}")
            if status.exit_code != 0:
                raise NodeStorageError(f"setup exited with {status.exit_code} on rank {node['rank']}")

    def _setting_up(self, pool: PoolRow, worker: WorkerRow) -> None:
        result = self.ctx.agent_ops.ensure(("worker-setup", worker.id), self._setup, pool, worker)
        if result is None:
            return
        if not result.ok:
            self._fail(pool, worker, f"setup failed: {result.error}")
            return
        self.store.worker_ready(worker)
        self.note(pool.name, f"worker {worker.number}: READY")

    def _health(self, pool: PoolRow, worker: WorkerRow) -> None:
        """READY and DRAINING workers: a health poll now and then; a worker whose agent keeps missing them and
        whose node the infra no longer has (refresh) is FAILED, destroyed and replaced."""
        key = ("worker-health", worker.id)
        agents: list[tuple[dict[str, Any], NodeAgent]] = []  # only for a health check that starts now
        if not self.ctx.node_io.busy(key):
            # issue 15: the watch is the heartbeat; a node it reports lost is refreshed now
            watch = self.ctx.watch(("worker", worker.id), worker.nodes, worker.token_enc)
            if self.ctx.confirm_loss_now(("worker", worker.id), worker.stack_name, watch):
                if not self.store.jobs_on_workers([worker.id]).get(worker.id):  # else its job's refresh decides
                    self._confirm_lost(pool, worker)
                return
            if time.time() - self._health_at.get(worker.id, 0.0) < self.ctx.poll_every(watch):
                return
            self._health_at[worker.id] = time.time()
            agents = self.ctx.node_agents(worker.nodes, worker.token_enc)
        result = self.ctx.node_io.ensure(key, health_of, agents)
        if result is None:
            return
        if result.ok:
            if worker.missed_polls:
                self.store.record_worker_health(worker.id, missed_polls=0)
            return
        misses = worker.missed_polls + 1
        self.store.record_worker_health(worker.id, missed_polls=misses)
        if misses >= self.ctx.config.controller.grace_misses:
            self._confirm_lost(pool, worker)

    def _confirm_lost(self, pool: PoolRow, worker: WorkerRow) -> None:
        """Ask the infra whether the worker's node is gone; if so the worker is FAILED (and replaced)."""
        refreshed = self._op(pool.name, "refresh", worker.stack_name,
                             lambda: self.ctx.driver.refresh(worker.stack_name))
        if refreshed is not None and refreshed.ok and refreshed.value.gone:
            self._fail(pool, worker, "node gone (preempted or dead, says refresh)")

    def _fail(self, pool: PoolRow, worker: WorkerRow, why: str) -> None:
        self._failed_at[pool.name] = time.time()
        self.store.fail_worker(worker, why)
        self.note(pool.name, f"worker {worker.number}: FAILED: {why}")

    def _terminating(self, pool: PoolRow, worker: WorkerRow) -> None:
        result = self._op(pool.name, "destroy", worker.stack_name, lambda: self.ctx.driver.destroy(worker.stack_name))
        if result is None:
            return
        if not result.ok:
            self.store.stack_failed(worker.stack_name, str(result.error))
            self.note(pool.name, f"worker {worker.number}: destroy failed, retrying: {result.error}")
            return
        self.store.worker_terminated(worker)
        if self.ctx.watchers is not None:  # issue 15
            self.ctx.watchers.forget(("worker", worker.id), worker.nodes or [])
        self.note(pool.name, f"worker {worker.number}: destroyed")

    # --- pool jobs ------------------------------------------------------------------------------------------

    def free_worker(self, pool: PoolRow) -> WorkerRow | None:
        """A READY worker of the pool's current spec with a free job slot (the fewest jobs first)."""
        workers = [w for w in self.store.workers(pool.name)
                   if w.status == WorkerStatus.READY and w.spec_hash == pool.spec_hash]
        jobs_on = self.store.jobs_on_workers([w.id for w in workers])
        free = [w for w in workers if len(jobs_on.get(w.id, [])) < pool.jobs_per_worker]
        return min(free, key=lambda w: (len(jobs_on.get(w.id, [])), w.number)) if free else None

    def worker_lost(self, job: JobRow, why: str) -> None:
        """The job's worker was lost under it: FAILED at once (then destroyed and replaced), so the job's recovery
        never lands on it again."""
        worker = next((w for w in self.store.workers(job.pool) if w.id == job.worker_id), None)
        pool = self.store.pool(job.pool or "")
        if worker is not None and pool is not None and worker.status in (WorkerStatus.READY, WorkerStatus.DRAINING):
            self._fail(pool, worker, why)

    def release(self, job: JobRow, attempt: AttemptRow) -> None:
        """A pool job's end on a worker that stays: its run stopped, its scratch directory removed, its user (on a
        node with node users) removed with its files (agent calls, in the agent pool)."""
        worker = next((w for w in self.store.workers(job.pool) if w.id == job.worker_id), None)
        if worker is None or worker.status not in (WorkerStatus.READY, WorkerStatus.DRAINING):
            return
        for _, client in self.ctx.clients(worker.nodes, worker.token_enc):
            with contextlib.suppress(AgentError):  # a lost worker is replaced anyway
                client.cancel(f"run-{attempt.id}")
            with contextlib.suppress(AgentError):
                client.start(f"rm -rf {job_dir(job.id)}", f"clean-{attempt.id}")
            with contextlib.suppress(AgentError):  # issue 17: the job's own user, its files and account
                client.remove_user(f"job-{job.id}")
        self.store.record_worker_health(worker.id, idle_since=time.time())


async def health_of(agents: list[tuple[dict[str, Any], NodeAgent]]) -> list[dict[str, Any]]:
    """(On the controller's loop.) Every node's health at once; the first agent that does not answer raises."""
    return list(await asyncio.gather(*(agent.health() for _, agent in agents)))
