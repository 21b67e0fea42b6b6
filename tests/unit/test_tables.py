"""Snapshot tests of the tables a user reads: "Considered resources" and `show-gpus`. Set
SORTIE_UPDATE_GOLDEN=1 to rewrite the snapshots after an intended change (and review the diff)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

from cli.clouds import considered_tables
from orchestrator.config import SortieConfig
from orchestrator.spec import load_yaml_text

GOLDEN = Path(__file__).parents[1] / "support" / "golden" / "tables"
ENABLED = ("local", "aws", "gcp", "azure")


def render(items: list) -> str:
    console = Console(record=True, width=110, color_system=None)
    for item in items:
        console.print(item)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def check(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("SORTIE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"no snapshot {path}; run with SORTIE_UPDATE_GOLDEN=1 once"
    assert text == path.read_text()


@pytest.mark.parametrize(("name", "yaml"), [
    ("h100x8_two_nodes", "num_nodes: 2\nresources:\n  accelerators: H100:8\nrun: x\n"),
    ("any_of_spot", "resources:\n  any_of:\n    - {accelerators: A100:8, use_spot: true}\n"
                    "    - {accelerators: L4:1}\nrun: x\n"),
    ("cpu_local_wins", "resources:\n  cpus: 4+\nrun: x\n"),
    ("infeasible", "resources:\n  accelerators: H100:16\nrun: x\n"),
])
def test_considered_resources_table(name: str, yaml: str) -> None:
    pipeline = load_yaml_text(yaml)
    check(f"considered_{name}", render(considered_tables(pipeline, SortieConfig(), ENABLED)))
