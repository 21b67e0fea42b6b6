"""Policy, the environment of `setup` and `run` on every node: the task's envs and secrets, and SkyPilot's variables in
SkyPilot's formats, each with a SORTIE_* twin."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence


def task_id(submitted_at: float, job_name: str | None, job_id: int, task_index: int,
            task_name: str | None = None, is_pipeline: bool = False) -> str:
    """SkyPilot's managed-job task id, the same across every recovery of the task:
    `sky-managed-2026-11-25-12-34-56-123456_<name>_<job id>-<task index>` for one task, and
    `sky-managed-..._<pipeline>_<task name>_<job id>-<task index>` for a task of a pipeline."""
    stamp = time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime(submitted_at))
    micros = round((submitted_at % 1) * 1_000_000) % 1_000_000
    name = job_name or "sortie-job"
    if is_pipeline:
        name = f"{name}_{task_name or f'task{task_index}'}"
    return f"sky-managed-{stamp}-{micros:06d}_{name}_{job_id}-{task_index}"


def _gpus(accelerators: Mapping[str, float]) -> str:
    count = sum(accelerators.values()) if accelerators else 0
    return str(int(count)) if float(count).is_integer() else str(count)


def node_env(*, envs: Mapping[str, str], secrets: Mapping[str, str], job_id: int, job_name: str | None,
             task_index: int, submitted_at: float, rank: int, ips: Sequence[str],
             accelerators: Mapping[str, float], task_name: str | None = None,
             is_pipeline: bool = False) -> dict[str, str]:
    sky = {
        "TASK_ID": task_id(submitted_at, job_name, job_id, task_index, task_name, is_pipeline),
        "JOB_ID": str(job_id),
        "NODE_RANK": str(rank),
        "NODE_IPS": "\n".join(ips),
        "NUM_NODES": str(len(ips)),
        "NUM_GPUS_PER_NODE": _gpus(accelerators),
    }
    env = {**envs, **secrets}
    for key, value in sky.items():
        env[f"SKYPILOT_{key}"] = value
        env[f"SORTIE_{key}"] = value
    return env


def job_rank_env(*, job_rank: int, num_jobs: int) -> dict[str, str]:
    """A job's rank among the jobs of one `launch --num-jobs N` (on a pool or on fresh clusters)."""
    env: dict[str, str] = {}
    for key, value in {"JOB_RANK": str(job_rank), "NUM_JOBS": str(num_jobs)}.items():
        env[f"SKYPILOT_{key}"] = value
        env[f"SORTIE_{key}"] = value
    return env


def pool_job_env(*, job_rank: int, num_jobs: int, slot: int, jobs_per_worker: int,
                 accelerators: Mapping[str, float]) -> dict[str, str]:
    """What a pool job adds: its rank among the jobs of one `launch -p`, and, with several jobs per worker, its
    share of the worker's accelerators (`CUDA_VISIBLE_DEVICES` and `SKYPILOT_NUM_GPUS_PER_NODE`)."""
    env = job_rank_env(job_rank=job_rank, num_jobs=num_jobs)
    total = int(sum(accelerators.values())) if accelerators else 0
    if total and jobs_per_worker > 1:
        per_job = max(total // jobs_per_worker, 1)
        first = (slot * per_job) % total
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(first, min(first + per_job, total)))
        for prefix in ("SKYPILOT", "SORTIE"):
            env[f"{prefix}_NUM_GPUS_PER_NODE"] = str(per_job)
    return env
