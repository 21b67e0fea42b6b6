"""The pool reconciler: each tick, converge every pool's workers on its spec and size, and move each worker
one step (stack up, files and setup, health, destroy). Pool jobs themselves are driven by the job
reconciler (`Reconciler`), which asks `assign` for a free READY worker.

Each worker is its own stack (`stacks/pool_program.py`), named `<prefix>-pool-<pool>-w<number>`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.agent_client import AgentClient, AgentError
from orchestrator.cloud_features import attempt_features  # issue 16
from orchestrator.controller.node_files import (
    NodeFiles,
    NodeStorageError,
    node_fuse_for,
    node_package_for,
    node_python,
    task_steps,
)
from orchestrator.errors import NoCapacityError
from orchestrator.placement import Infeasible, place
from orchestrator.pools import PoolActions, PoolPolicy, WorkerView, decide_pool
from orchestrator.stack_driver import copy_engine_output
from stacks.spec import ClusterSpec, StackProgram, cloud_fields, new_cluster_token

if TYPE_CHECKING:
    from orchestrator.config import SortieConfig
    from orchestrator.controller.reconciler import Reconciler
    from state.models import JobRow, PoolRow, WorkerRow

log = logging.getLogger("sortie.pools")
FAILED_RETRY_SECONDS = 10.0  # a pool whose worker just failed waits this long before making another


def policy_of(pool: PoolRow) -> PoolPolicy:
    return PoolPolicy(workers=pool.workers, min_workers=pool.min_workers, max_workers=pool.max_workers,
                      idle_timeout=pool.idle_timeout, jobs_per_worker=pool.jobs_per_worker)


class PoolWorkers:
    def __init__(self, owner: Reconciler) -> None:
        self.r = owner
        self.store = owner.store
        self._last_health: dict[int, float] = {}
        self._last_failure: dict[str, float] = {}
        self._free: dict[int, int] = {}  # this tick: free job slots per READY worker

    def pool_log(self, pool: str) -> Path:
        return self.store.home / "logs" / "pools" / f"{pool}.log"

    def note(self, pool: str, line: str) -> None:
        self.r.logs.append(self.pool_log(pool), f"{time.strftime('%H:%M:%S')} {line}\n".encode())
        log.info("pool %s: %s", pool, line)

    # --- the tick ---------------------------------------------------------------------------------------

    def tick(self) -> int:
        """One pass over every pool; returns how many pools exist (the controller stays up while any does)."""
        self._free = {}
        pools = self.store.pools()
        for pool in pools:
            try:
                self._pool(pool)
            except Exception:  # one pool's trouble never stops the others
                log.exception("pool %s: controller error", pool.name)
        return len(pools)

    def _pool(self, pool: PoolRow) -> None:
        workers = self.store.workers(pool.name)
        jobs_on = self.store.jobs_on_workers([w.id for w in workers])
        for worker in workers:
            self._step(pool, worker, len(jobs_on.get(worker.id, [])))
        workers = self.store.workers(pool.name)
        jobs = self.store.pool_jobs(pool.name)
        now = time.time()
        if jobs:
            self.store.update_pool(pool.name, last_busy_at=now)
        idle_for = None if jobs else now - (pool.last_busy_at or pool.created_at)
        views = [WorkerView(w.id, w.number, w.stack_name, w.spec_hash, w.status, len(jobs_on.get(w.id, [])))
                 for w in workers]
        actions = decide_pool(policy_of(pool), pool.spec_hash, views, len(jobs), idle_for, down=pool.status == "DOWN")
        self._apply(pool, workers, actions)
        for worker in workers:
            if worker.status == "READY" and worker.spec_hash == pool.spec_hash:
                self._free[worker.id] = pool.jobs_per_worker - len(jobs_on.get(worker.id, []))
        if pool.status == "DOWN" and not workers:
            self._clean_files(pool)
            self.store.update_pool(pool.name, status="TERMINATED")
            self.note(pool.name, "every worker destroyed; pool terminated")

    def _clean_files(self, pool: PoolRow) -> None:
        """The staged workdir and file mounts of every apply of the pool, and buckets it made non-persistent."""
        from orchestrator.storage.staging import clean

        storage = pool.storage or {}
        for cleanup in [*storage.get("older", []), *([storage["cleanup"]] if storage.get("cleanup") else [])]:
            removed = clean({"cleanup": cleanup}, self.r.config, self.store.home)
            if removed:
                self.note(pool.name, f"removed {', '.join(removed)}")

    def _apply(self, pool: PoolRow, workers: list[WorkerRow], actions: PoolActions) -> None:
        by_id = {w.id: w for w in workers}
        for worker_id in actions.drain:
            if by_id[worker_id].status != "DRAINING":
                self.store.update_worker(worker_id, status="DRAINING")
                self.note(pool.name, f"worker {by_id[worker_id].number}: draining (finishes its jobs, then goes)")
        for worker_id in actions.destroy:
            if by_id[worker_id].status != "TERMINATING":
                self.store.update_worker(worker_id, status="TERMINATING")
                self.store.set_stack(by_id[worker_id].stack_name, "DESTROYING")
                self.note(pool.name, f"worker {by_id[worker_id].number}: destroying {by_id[worker_id].stack_name}")
        if actions.create and time.time() - self._last_failure.get(pool.name, 0.0) >= FAILED_RETRY_SECONDS:
            for _ in range(actions.create):
                self._create(pool)

    def _create(self, pool: PoolRow) -> None:
        task = pool.spec
        choice = place(task["resources"], self.r.config)
        if isinstance(choice, Infeasible):
            self._last_failure[pool.name] = time.time()
            self.note(pool.name, f"cannot place a worker: {choice.reason}")
            return
        worker = self.store.create_worker(pool.name, spec_hash=pool.spec_hash,
                                          stack_prefix=self.r.config.pulumi.stack_prefix, infra=choice.infra,
                                          region=choice.region, use_spot=choice.use_spot,
                                          price_per_hour=choice.price_per_hour,
                                          token_enc=self.store.box.seal(new_cluster_token()))
        self.note(pool.name, f"worker {worker.number}: creating {worker.stack_name} in {choice.infra}/{choice.region}")

    # --- one worker ---------------------------------------------------------------------------------------

    def _step(self, pool: PoolRow, worker: WorkerRow, jobs: int) -> None:
        handler: dict[str, Callable[[PoolRow, WorkerRow], None]] = {
            "PROVISIONING": self._provisioning, "SETTING_UP": self._setting_up, "READY": self._health,
            "DRAINING": self._health, "TERMINATING": self._terminating,
        }
        if worker.status in handler:
            handler[worker.status](pool, worker)

    def _program(self, pool: PoolRow, worker: WorkerRow) -> StackProgram:
        steps = task_steps(pool.storage, 0)
        return worker_program(pool.name, pool.spec, worker.stack_name, worker.number, worker.infra, worker.region,
                              worker.use_spot, self.store.box.open(worker.token_enc), self.store.home, self.r.config,
                              node_package=node_package_for(steps, worker.infra, self.r.config),
                              node_fuse=node_fuse_for(steps, worker.infra))

    def _op(self, pool: str, op: str, stack: str, fn: Callable[[], Any]) -> Any:
        """The result of a stack operation once done, else None after making sure it runs; engine output goes to
        the pool's log."""
        key = (op, stack)
        result = self.r.stack_ops.collect(key)
        if result is None and not self.r.stack_ops.busy(key):
            self.r.stack_ops.submit(key, self._logged, pool, stack, fn)
        return result

    def _logged(self, pool: str, stack: str, fn: Callable[[], Any]) -> Any:
        return copy_engine_output(self.r.driver, stack, fn, lambda data: self.r.logs.append(self.pool_log(pool), data))

    def _provisioning(self, pool: PoolRow, worker: WorkerRow) -> None:
        program = self._program(pool, worker)
        result = self._op(pool.name, "up", worker.stack_name, lambda: self.r.driver.up(worker.stack_name, program))
        if result is None:
            return
        if not result.ok:
            cleaned = "cleanup failed" not in str(result.error)
            self.store.set_stack(worker.stack_name, "DESTROYED" if cleaned else "FAILED", str(result.error))
            why = "no capacity" if isinstance(result.error, NoCapacityError) else "up failed"
            self.fail(pool, worker, f"{why}: {result.error}", destroyed=cleaned)
            return
        out = result.value.outputs
        nodes = [{k: n[k] for k in ("rank", "node_id", "ip", "url", "region")}
                 for n in (out["nodes"] if "nodes" in out else [out["worker"]])]
        self.store.update_worker(worker.id, nodes=nodes, status="SETTING_UP")
        self.store.set_stack(worker.stack_name, "UP")
        self.note(pool.name, f"worker {worker.number}: up ({len(nodes)} node(s)); setting up")

    def clients(self, worker: WorkerRow) -> list[tuple[dict[str, Any], AgentClient]]:
        token = self.store.box.open(worker.token_enc)
        return [(n, AgentClient(n["url"], token, timeout=10))
                for n in sorted(worker.nodes or [], key=lambda n: n["rank"])]

    def _setup(self, pool: PoolRow, worker: WorkerRow) -> None:
        """Files and setup on every node of the worker, once."""
        from orchestrator.run_env import node_env

        files = NodeFiles(self.r.config, self.store.home, task_steps(pool.storage, 0), worker.id,
                          python=node_python(worker.infra))
        setup = pool.spec.get("setup")
        clients = self.clients(worker)
        ips = [n["ip"] for n, _ in clients]
        for _node, client in clients:
            files.put(client, lambda line, n=worker.number: self.note(pool.name, f"worker {n}: {line}"))
        if not setup:
            return
        for node, client in clients:
            env = node_env(envs=pool.spec.get("envs") or {}, secrets={}, job_id=0, job_name=pool.name, task_index=0,
                           submitted_at=pool.created_at, rank=node["rank"], ips=ips, accelerators={})
            try:
                client.run(setup, env=env, run_id=f"setup-w{worker.id}")
            except AgentError as exc:
                if exc.status != 409:
                    raise
        for node, client in clients:
            status = client.wait(f"setup-w{worker.id}", timeout=3600, interval=0.3)
            output, _ = client.log(f"setup-w{worker.id}", 0)
            for line in output.decode(errors="replace").splitlines():
                self.note(pool.name, f"worker {worker.number} (setup, rank {node['rank']}): {line}")
            if status.exit_code != 0:
                raise NodeStorageError(f"setup exited with {status.exit_code} on rank {node['rank']}")

    def _setting_up(self, pool: PoolRow, worker: WorkerRow) -> None:
        key = ("worker-setup", worker.id)
        result = self.r.agent_ops.collect(key)
        if result is None:
            if not self.r.agent_ops.busy(key):
                self.r.agent_ops.submit(key, self._setup, pool, worker)
            return
        if not result.ok:
            self.fail(pool, worker, f"setup failed: {result.error}")
            return
        now = time.time()
        self.store.update_worker(worker.id, status="READY", ready_at=now, idle_since=now)
        self.note(pool.name, f"worker {worker.number}: READY")

    def _health(self, pool: PoolRow, worker: WorkerRow) -> None:
        """READY and DRAINING workers: a health poll now and then; a worker whose agent keeps missing them and
        whose node the infra no longer has (refresh) is FAILED, destroyed and replaced."""
        key = ("worker-health", worker.id)
        result = self.r.agent_ops.collect(key)
        if result is None:
            due = time.time() - self._last_health.get(worker.id, 0.0) >= self.r.config.controller.poll_interval_seconds
            if due and not self.r.agent_ops.busy(key):
                self._last_health[worker.id] = time.time()
                self.r.agent_ops.submit(key, lambda: [c.health() for _, c in self.clients(worker)])
            return
        if result.ok:
            if worker.missed_polls:
                self.store.update_worker(worker.id, missed_polls=0)
            return
        misses = worker.missed_polls + 1
        self.store.update_worker(worker.id, missed_polls=misses)
        if misses >= self.r.config.controller.grace_misses:
            self.lost(pool, worker)

    def lost(self, pool: PoolRow, worker: WorkerRow) -> None:
        """Ask the infra whether the worker's node is gone; if so the worker is FAILED (and replaced)."""
        refreshed = self._op(pool.name, "refresh", worker.stack_name, lambda: self.r.driver.refresh(worker.stack_name))
        if refreshed is None:
            return
        if refreshed.ok and refreshed.value.gone:
            self.fail(pool, worker, "node gone (preempted or dead, says refresh)")

    def fail(self, pool: PoolRow, worker: WorkerRow, why: str, destroyed: bool = False) -> None:
        self._last_failure[pool.name] = time.time()
        status = "TERMINATED" if destroyed else "FAILED"
        self.store.update_worker(worker.id, status=status, failure_reason=why,
                                 **({"ended_at": time.time()} if destroyed else {}))
        self.note(pool.name, f"worker {worker.number}: {status}: {why}")

    def _terminating(self, pool: PoolRow, worker: WorkerRow) -> None:
        result = self._op(pool.name, "destroy", worker.stack_name, lambda: self.r.driver.destroy(worker.stack_name))
        if result is None:
            return
        if not result.ok:
            self.store.set_stack(worker.stack_name, "FAILED", str(result.error))
            self.note(pool.name, f"worker {worker.number}: destroy failed, retrying: {result.error}")
            return
        self.store.set_stack(worker.stack_name, "DESTROYED")
        self.store.update_worker(worker.id, status="TERMINATED", ended_at=time.time())
        self.note(pool.name, f"worker {worker.number}: destroyed")

    # --- pool jobs ------------------------------------------------------------------------------------------

    def assign(self, job: JobRow) -> WorkerRow | None:
        """A READY worker of the job's pool with a free slot, taken (FIFO: the tick visits jobs by id)."""
        for worker_id, free in self._free.items():
            if free <= 0:
                continue
            worker = next((w for w in self.store.workers(job.pool) if w.id == worker_id), None)
            if worker is None or worker.status != "READY":
                continue
            self._free[worker_id] = free - 1
            return worker
        return None

    def release(self, job: JobRow, attempt_id: int) -> None:
        """After a pool job: remove its scratch directory on the worker, so the next job starts clean."""
        worker = next((w for w in self.store.workers(job.pool) if w.id == job.worker_id), None)
        if worker is None or worker.status not in ("READY", "DRAINING"):
            return
        for _, client in self.clients(worker):
            with contextlib.suppress(AgentError):  # a lost worker is replaced anyway
                client.run(f"rm -rf {job_dir(job.id)}", run_id=f"clean-{attempt_id}")
        self.store.update_worker(worker.id, idle_since=time.time())


def worker_program(pool: str, task: dict[str, Any], stack: str, number: int, infra: str | None, region: str | None,
                   use_spot: bool, token: str, home: Path, config: SortieConfig | None = None,
                   node_package: str | None = None, node_fuse: bool = False) -> StackProgram:
    """The stack program of one worker (also what `pool apply` previews; a pool with files is recreated at every
    apply, so a preview without `node_package` and `node_fuse`, which staging decides, shows no false change)."""
    accelerators = (task["resources"][0].get("accelerators") or {}) if task["resources"] else {}
    spec = ClusterSpec(name=stack, infra=infra or "local", region=region, num_nodes=int(task.get("num_nodes") or 1),
                       use_spot=use_spot, accelerators={k: int(v) for k, v in accelerators.items()},
                       labels={"sortie-pool": pool}, token=token, local_root=str(home / "local"),
                       node_package=node_package, node_fuse=node_fuse, **(cloud_fields(config) if config else {}),
                       **attempt_features(task, infra or "local", region))  # issue 16: ports, tiers, images
    return StackProgram("pool-worker", spec, pool=pool, worker_index=number)


def job_dir(job_id: int) -> str:
    """A pool job's scratch directory on its worker ($SORTIE_JOB_DIR, also $TMPDIR), removed after the job."""
    return f"$HOME/.sortie-jobs/{job_id}"
