"""Setup and run on every node of an attempt: start them (idempotently, under fixed run ids), copy their logs
as they grow, and judge what the nodes say.

Where this sits: called by the job reconciler (`orchestrator.controller.jobs`) for attempts in SETTING_UP and
RUNNING. Nothing here writes a status: it answers "still going", "every node exited with these codes", or "a
node looks lost", and the job reconciler applies that through the named transitions.

A run is started when a poll finds it missing on a node (the agent answers 404), so a restarted controller
starts what never started and re-attaches to what did; the agent refuses a second start of one run id (409).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from orchestrator.controller.context import ControllerContext
from orchestrator.controller.decide import NodeRun, RunsVerdict, agent_refusal, judge_runs
from orchestrator.controller.node_reports import report_node_errors
from orchestrator.controller.ops import Finished, run_here
from orchestrator.infra.agent_async import NodeAgent, SyncAgentOnLoop
from orchestrator.infra.agent_client import AgentError
from orchestrator.policy.run_env import job_rank_env, node_env, pool_job_env
from state.group_rules import is_group
from state.machine import JobStatus
from state.models import AttemptRow, JobRow


class RunRefused(Exception):
    """The agent refused to start a run for good (a 4xx other than "already started"): `status` is the task's end."""

    def __init__(self, status: JobStatus, error: AgentError) -> None:
        super().__init__(str(error))
        self.status = status
        self.error = error


def run_id(kind: str, attempt: AttemptRow) -> str:
    return f"{kind}-{attempt.id}"


def job_user(job: JobRow) -> str | None:
    """A pool job's user key on its worker (issue 17: each pool job runs as a user of its own there)."""
    return f"job-{job.id}" if job.pool else None


def job_dir(job_id: int) -> str:
    """A pool job's scratch directory on its worker ($SORTIE_JOB_DIR, also $TMPDIR), removed after the job."""
    return f"$HOME/.sortie-jobs/{job_id}"


class NodeRuns:
    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx
        self._polled_at: dict[tuple[int, str], float] = {}  # when each attempt's runs were last polled (pacing)

    def _commands(self, job: JobRow, attempt: AttemptRow, kind: str) -> dict[int, tuple[str, dict[str, str]]]:
        """Per rank: the command and its environment."""
        task = job.spec["tasks"][attempt.task_index]
        secrets = self.ctx.store.secrets(job)[attempt.task_index]
        ips = [n["ip"] for n in sorted(attempt.nodes or [], key=lambda n: n["rank"])]
        accelerators = (task["resources"][0].get("accelerators") or {}) if task["resources"] else {}
        found = {}
        group = self._group_env(job) if is_group(job.spec) else None
        for node in attempt.nodes or []:
            env = node_env(envs=task.get("envs") or {}, secrets=secrets, job_id=job.id, job_name=job.name,
                           task_index=attempt.task_index, submitted_at=job.submitted_at, rank=node["rank"], ips=ips,
                           accelerators=accelerators, task_name=task.get("name"), is_pipeline=job.is_pipeline)
            command = task[kind]
            if job.pool:
                pool = self.ctx.store.pool(job.pool)
                worker_resources = (pool.spec.get("resources") or [{}])[0] if pool else {}
                env.update(pool_job_env(job_rank=job.job_rank or 0, num_jobs=job.num_jobs or 1, slot=attempt.slot or 0,
                                        jobs_per_worker=pool.jobs_per_worker if pool else 1,
                                        accelerators=worker_resources.get("accelerators") or {}))
                scratch = job_dir(job.id)
                command = (f'mkdir -p "{scratch}" && export SORTIE_JOB_DIR="{scratch}" TMPDIR="{scratch}"\n'
                           f"{command}")
            elif job.job_rank is not None:  # one of `launch --num-jobs N` on fresh clusters
                env.update(job_rank_env(job_rank=job.job_rank, num_jobs=job.num_jobs or 1))
            if group is not None:
                env.update(group)
            found[node["rank"]] = (command, env)
        return found

    def _group_env(self, job: JobRow) -> dict[str, str]:
        """A job group's task learns of the others: SkyPilot's `SKYPILOT_JOBGROUP_NAME`, and (Sortie's) each
        task's head address `SORTIE_JOBGROUP_HOST_<TASK>` and `SORTIE_JOBGROUP_HOSTS`, lines of
        `<ip> <task>-<rank>.<group>` (SkyPilot's hostnames, in /etc/hosts form), from the attempts in progress."""
        name = job.name or job.spec.get("name") or f"job-{job.id}"
        env = {"SKYPILOT_JOBGROUP_NAME": name, "SORTIE_JOBGROUP_NAME": name}
        lines = []
        for other in self.ctx.store.open_attempts_of([job.id]).get(job.id, []):
            nodes = sorted(other.nodes or [], key=lambda n: n["rank"])
            if not nodes:
                continue
            task_name = job.spec["tasks"][other.task_index].get("name") or f"task{other.task_index}"
            env[f"SORTIE_JOBGROUP_HOST_{re.sub(r'[^A-Za-z0-9]', '_', task_name).upper()}"] = nodes[0]["ip"]
            lines += [f"{n['ip']} {task_name}-{n['rank']}.{name}" for n in nodes]
        env["SORTIE_JOBGROUP_HOSTS"] = "\n".join(lines)
        return env

    async def _poll(self, job: JobRow, attempt: AttemptRow, kind: str,
                    agents: list[tuple[dict[str, Any], NodeAgent]]) -> list[NodeRun]:
        """(On the controller's loop.) Each node's run: started if missing, its status, then its new log bytes (read
        after the status, so an exited run's log is whole). The nodes are asked at once."""
        name = run_id(kind, attempt)
        commands: list[dict[int, tuple[str, dict[str, str]]]] = []  # worked out once, off the loop, if needed

        async def command(rank: int) -> tuple[str, dict[str, str]]:
            if not commands:
                commands.append(await self.ctx.off_loop(self._commands, job, attempt, kind))
            return commands[0][rank]

        async def one(node: dict[str, Any], agent: NodeAgent) -> NodeRun:
            rank = node["rank"]
            try:
                try:
                    status = await agent.status(name)
                except AgentError as exc:
                    if exc.status != 404:
                        raise
                    text, env = await command(rank)
                    try:
                        await agent.start(text, name, env=env, user=job_user(job))
                    except AgentError as refused:
                        final = agent_refusal(refused, "run" if kind == "run" else "setup")
                        if final is not None:
                            raise RunRefused(final, refused) from None
                        raise
                    status = await agent.status(name)
                await self._copy_log(job, attempt, kind, rank, agent, name)
                return NodeRun(rank, status.state, status.exit_code, status.node_error)  # type: ignore[arg-type]
            except AgentError:
                return NodeRun(rank, "unreachable")

        return list(await asyncio.gather(*(one(node, agent) for node, agent in agents)))

    async def _copy_log(self, job: JobRow, attempt: AttemptRow, kind: str, rank: int, agent: NodeAgent,
                        name: str) -> None:
        path = self.ctx.logs.run_log(job.id, attempt.task_index, attempt.number, kind, rank)
        offset = path.stat().st_size if path.exists() else 0
        while True:
            data, offset = await agent.log(name, offset)
            if not data:
                break
            self.ctx.logs.append(path, data)

    def drive(self, job: JobRow, attempt: AttemptRow, kind: str) -> RunsVerdict | None:
        """Poll every node (at once on news from the watch, else once per poll interval); None until a poll has
        come back. Records the missed polls of unreachable nodes."""
        op_key = ("poll", attempt.id, kind)
        came_back: RunsVerdict | None = None
        if self.ctx.node_io.busy(op_key):
            came_back = self._judge(job, attempt, self.ctx.node_io.ensure(op_key, self._poll, job, attempt, kind, []))
            if came_back is None or came_back.kind != "wait":
                return came_back
            # "still going": what the watch saw while the poll was out (an exit) is looked at now, not next tick
        # issue 15: a change the watch saw polls now; a node it reports lost is refreshed now
        watch = self.ctx.watch(("attempt", attempt.id), attempt.nodes, attempt.token_enc, run_id(kind, attempt))
        if self.ctx.confirm_loss_now(("attempt", attempt.id), attempt.stack_name, watch):
            return RunsVerdict("node_lost", lost_ranks=watch.lost_ranks)
        if watch.suspect_ranks:  # the hub probes them; a poll now would only miss
            return RunsVerdict("node_suspect", lost_ranks=watch.suspect_ranks)
        key = (attempt.id, kind)
        if time.time() < self._polled_at.get(key, 0.0) + self.ctx.poll_every(watch) and not watch.news:
            return came_back
        self._polled_at[key] = time.time()
        agents = self.ctx.node_agents(attempt.nodes, attempt.token_enc)
        return self._judge(job, attempt, self.ctx.node_io.ensure(op_key, self._poll, job, attempt, kind, agents)) \
            or came_back

    def _judge(self, job: JobRow, attempt: AttemptRow, polled: Finished | None) -> RunsVerdict | None:
        """What a poll that came back says (None: not back yet)."""
        if polled is None:
            return None
        if not polled.ok:
            raise polled.error  # type: ignore[misc]
        nodes: list[NodeRun] = polled.value
        report_node_errors(self.ctx.store, job, nodes)  # a full disk on a node is said, not silent
        verdict = judge_runs(nodes, attempt.missed_polls, self.ctx.config.controller.grace_misses)
        misses = attempt.missed_polls + 1 if any(n.state == "unreachable" for n in nodes) else 0
        if misses != attempt.missed_polls:
            self.ctx.store.record_missed_polls(attempt.id, misses)
            attempt.missed_polls = misses
        if verdict.kind == "done":
            self.forget(attempt.id)
        return verdict

    def forget(self, attempt_id: int) -> None:
        for key in [k for k in self._polled_at if k[0] == attempt_id]:
            del self._polled_at[key]

    def stop(self, attempt: AttemptRow, kind: str = "run", job: JobRow | None = None) -> list[Any]:
        """(In the agent pool: the agent's cancel waits out the run's SIGTERM grace.) Cancel the attempt's run on
        every node that answers (a pool job's end: the worker stays). With `job`, the run's last log lines (what it
        said on SIGTERM) are copied too, before the nodes go."""
        async def stop_all() -> list[Any]:
            stopped = []
            for node, client in self.ctx.clients(attempt.nodes, attempt.token_enc):
                agent = SyncAgentOnLoop(client, threaded=False)
                try:
                    stopped.append(await agent.cancel(run_id(kind, attempt)))
                    if job is not None:
                        await self._copy_log(job, attempt, kind, node["rank"], agent, run_id(kind, attempt))
                except AgentError:
                    continue
            return stopped

        return run_here(stop_all())
