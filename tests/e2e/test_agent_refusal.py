"""A deterministic refusal by a node's agent (a 4xx) fails the task; it is never taken for a lost node
(issue 17, item 4)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.controller.daemon import Controller
from orchestrator.controller.decide import agent_refusal
from orchestrator.infra.agent_client import AgentError
from orchestrator.infra.stack_driver import UpResult
from orchestrator.job_status import JobStatus
from stacks.spec import StackProgram
from state.store import StateStore
from tests.support.fake_driver import FakeStackDriver


@pytest.mark.parametrize(("status", "stage", "expected"), [
    (400, "run", JobStatus.FAILED_PRECHECKS), (400, "setup", JobStatus.FAILED_SETUP),
    (409, "sync", None), (400, "sync", JobStatus.FAILED_SETUP), (413, "run", JobStatus.FAILED_PRECHECKS),
    (401, "run", None), (404, "run", None), (429, "run", None), (500, "run", None), (507, "sync", None),
    (None, "run", None),
])
def test_agent_refusal_classifies_by_status(status: int | None, stage: str, expected: JobStatus | None) -> None:
    assert agent_refusal(AgentError("agent said no", status), stage) == expected  # type: ignore[arg-type]
    assert agent_refusal(None, "run") is None
    assert agent_refusal(OSError("boom"), "run") is None


def test_a_run_the_agent_refuses_fails_once_and_is_not_relaunched(sortie_home: Path, start_agent,
                                                                  tmp_path: Path) -> None:
    """`envs: {A: "a\\0b"}` (refused at parse time now; here stored as an older Sortie stored it) got a 400
    from the agent and went through create/destroy cycles until cancelled."""
    started: list[object] = []

    class AgentDriver(FakeStackDriver):
        def up(self, stack: str, program: StackProgram, *, cleanup_on_failure: bool = True) -> UpResult:
            result = super().up(stack, program, cleanup_on_failure=cleanup_on_failure)
            agent = start_agent(sandbox=tmp_path / f"node-{len(started)}", token=program.spec.token)
            started.append(agent)
            for node in result.outputs.get("nodes") or []:
                node["url"] = agent.url
            return result

    store = StateStore(sortie_home)
    (job_id,) = store.submit({"name": "j", "tasks": [{"name": "t", "run": "echo hi", "num_nodes": 1,
                                                      "envs": {"A": "a\0b"}, "resources": [{}]}]},
                             [{}], user="u")
    driver = AgentDriver()
    reconciler = Controller(store, driver, load_config(sortie_home), sortie_home)
    deadline = time.monotonic() + 60
    while not JobStatus(store.job(job_id).status).terminal:
        reconciler.tick()
        assert time.monotonic() < deadline, store.job(job_id).status
        time.sleep(0.05)
    job = store.job(job_id)
    assert job.status == JobStatus.FAILED_PRECHECKS, (job.status, job.failure_reason)
    assert "null byte" in (job.failure_reason or "") and "400" in (job.failure_reason or "")
    assert [op for op, _ in driver.operations if op == "up"] == ["up"]
    assert not [e for e in store.events(job_id) if e.what in ("preempted", "recovering")]
