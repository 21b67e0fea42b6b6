"""`docs/state-machine.md` is the picture of `state.machine.TRANSITIONS`, regenerated, never hand-edited."""

from __future__ import annotations

from pathlib import Path

from state.diagram import diagram, page

ROOT = Path(__file__).resolve().parents[2]


def test_the_state_machine_page_is_the_tables_picture() -> None:
    current = (ROOT / "docs" / "state-machine.md").read_text()
    assert current == page(), "docs/state-machine.md is stale: .venv/bin/python -m state.diagram > " \
                              "docs/state-machine.md"


def test_the_diagram_draws_every_table_and_its_moves() -> None:
    pool = diagram("pool")
    assert "[*] --> ACTIVE: apply_pool" in pool and "ACTIVE --> DOWN: pool_down" in pool
    assert "DOWN --> ACTIVE" not in pool  # a pool going down is not applied again
    assert "PROVISIONING --> SYNCING: attempt_provisioned" in diagram("attempt")
    assert "RUNNING --> ENDED: end_attempt, end_task, finish_job" in diagram("job")
