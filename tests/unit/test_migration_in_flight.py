"""An upgrade from the schema before the state machine (0005), with a job in flight, keeps it running: the new
controller finishes it exactly as the old one would have."""

from __future__ import annotations

import json
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from stacks.spec import ClusterSpec, StackProgram
from state.db import MIGRATIONS, make_engine
from state.store import StateStore
from tests.support.controller_harness import CONFIG, FakeAgents, drive
from tests.support.fake_driver import FakeStackDriver


def test_a_running_job_of_schema_0005_finishes_after_the_upgrade(sortie_home: Path) -> None:
    (sortie_home / "config.yaml").write_text(CONFIG)
    engine = make_engine(f"sqlite:///{sortie_home / 'state.db'}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
    driver = FakeStackDriver()
    stack = "sortie-job-1-t0-1"
    up = driver.up(stack, StackProgram("cluster", ClusterSpec(name=stack, token="t")))
    nodes = [{k: n[k] for k in ("rank", "node_id", "ip", "url", "region")} for n in up.outputs["nodes"]]
    now = time.time()
    spec = {"name": "old", "tasks": [{"name": "t", "run": "echo still-here", "setup": None, "num_nodes": 1,
                                      "resources": [{}]}]}
    with engine.begin() as conn:  # what a controller of the old schema left: a job RUNNING on its cluster
        conn.execute(text("INSERT INTO jobs (id, name, user, status, is_pipeline, spec, current_task, cancel_requested,"
                          " controller_failures, backoff_rounds, submitted_at, started_at, updated_at) VALUES (1, "
                          "'old', 'u', 'RUNNING', 0, :spec, 0, 0, 0, 0, :now, :now, :now)"),
                     {"spec": json.dumps(spec), "now": now})
        conn.execute(text("INSERT INTO tasks (job_id, task_index, name, status, resources, recoveries, "
                          "restarts_on_errors) VALUES (1, 0, 't', 'RUNNING', '', 0, 0)"))
        conn.execute(text("INSERT INTO attempts (id, job_id, task_index, number, stack_name, infra, region, zone, "
                          "use_spot, num_nodes, phase, nodes, started_at, missed_polls) VALUES (1, 1, 0, 1, :stack, "
                          "'local', 'region-a', NULL, 0, 1, 'RUNNING', :nodes, :now, 0)"),
                     {"stack": stack, "nodes": json.dumps(nodes), "now": now})
        conn.execute(text("INSERT INTO stacks (name, job_id, attempt_id, kind, status, created_at) VALUES "
                          "(:stack, 1, 1, 'cluster', 'UP', :now)"), {"stack": stack, "now": now})
    engine.dispose()

    store = StateStore(sortie_home)  # opening it upgrades the schema
    agents = FakeAgents(driver)
    drive(sortie_home, store, driver, agents, lambda s: s.job(1).status == "SUCCEEDED" and not s.live_stacks())
    assert [a.number for a in store.attempts(1)] == [1]  # the same attempt finished: no second cluster
    assert [run_id for _node, run_id in agents.started] == ["run-1"]
    assert driver.list_stacks() == []
