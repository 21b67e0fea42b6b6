"""`sortie stacks`: the stacks Sortie owns with their owners, tags, and `gc` of orphans; real engine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from stacks.spec import ClusterSpec, StackProgram, new_cluster_token
from tests.support.e2e import Sortie

pytestmark = pytest.mark.e2e


def test_orphans_are_listed_then_destroyed_only_when_asked(make_driver, sortie_home: Path) -> None:
    from orchestrator.infra.engine import require_engine

    driver = make_driver("pulumi:\n  stack_tags: {team: ml}\n")
    cli = Sortie(sortie_home)
    name = "sortie-job-999-t0-1"  # a stack no job knows: what a lost state DB would leave
    driver.up(name, StackProgram("cluster", ClusterSpec(name=name, token=new_cluster_token(),
                                                        local_root=str(sortie_home / "local"))))
    listed = json.loads(cli.run("stacks", "ls", "--json").stdout)
    assert listed == [{"stack": name, "owner": None}]
    tags = json.loads(subprocess.run(
        [str(require_engine().path), "stack", "tag", "ls", "--json", "--stack", name], env=driver._env,
        cwd=sortie_home / "stacks" / name, capture_output=True, text=True, check=True).stdout)
    assert tags["team"] == "ml" and tags["sortie:owner"] == "sortie" and tags["sortie:kind"] == "cluster"
    dry = cli.run("stacks", "gc", "--dry-run").stdout
    assert name in dry and "Nothing destroyed." in dry and driver.list_stacks() == [name]
    refused = cli.run("stacks", "gc", input_text="n\n").stdout
    assert "Nothing destroyed." in refused and driver.list_stacks() == [name]
    done = cli.run("stacks", "gc", "-y").stdout
    assert f"destroyed {name}" in done and driver.list_stacks() == []
    assert "No orphan stacks." in cli.run("stacks", "gc").stdout
