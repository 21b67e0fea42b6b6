"""End to end with the real Pulumi engine: local-cloud clusters as ephemeral stacks.

Every test here runs through `make_driver`/`driver`, whose teardown fails the test if a stack, a
lock, a work dir, an agent process or a sandbox is left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import uuid
from pathlib import Path

import pytest

from orchestrator.errors import NoCapacityError, StackLockedError
from orchestrator.infra.agent_client import AgentClient, AgentError
from orchestrator.infra.local_cloud import LocalCloud
from stacks.spec import ClusterSpec, StackProgram, new_cluster_token
from tests.support.agents import leftovers

pytestmark = pytest.mark.e2e


def _cluster(name: str, **kwargs: object) -> StackProgram:
    spec = ClusterSpec(name=name, token=kwargs.pop("token", None) or new_cluster_token(), **kwargs)  # type: ignore[arg-type]
    return StackProgram("cluster", spec)


def _node_ids(outputs: dict) -> list[str]:
    return [n["node_id"] for n in sorted(outputs["nodes"], key=lambda n: n["rank"])]


def test_two_node_cluster_runs_preempts_and_leaves_nothing(driver, sortie_home: Path) -> None:
    program = _cluster("sortie-test-1-1", num_nodes=2)
    up = driver.up("sortie-test-1-1", program)
    assert up.outputs["num_nodes"] == 2
    assert [n["rank"] for n in up.outputs["nodes"]] == [0, 1]
    assert up.outputs["token"] == program.spec.token and "token" in up.secret_keys
    assert up.public_outputs()["token"] == "[secret]"

    # A command on both nodes through their agents, with SkyPilot's env.
    ips = "\n".join(n["ip"] for n in up.outputs["nodes"])
    for node in up.outputs["nodes"]:
        client = AgentClient(node["url"], up.outputs["token"])
        env = {"SKYPILOT_NODE_RANK": str(node["rank"]), "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_IPS": ips}
        run_id = client.run('echo "$SKYPILOT_NODE_RANK/$SKYPILOT_NUM_NODES"; echo "$SKYPILOT_NODE_IPS" | wc -l', env)
        status = client.wait(run_id, timeout=30)
        assert status.exit_code == 0
        assert client.log(run_id)[0].decode().split() == [f"{node['rank']}/2", "2"]

    # The token is a Pulumi secret: never in clear text in the state, the stack files or the log.
    backend_files = [p for p in (sortie_home / "pulumi-backend").rglob("*") if p.is_file()]
    state_texts = [p.read_bytes() for p in backend_files]
    assert any(b"sortie-test-1-1" in t for t in state_texts), "found no state file of the stack"
    for path, text in zip(backend_files, state_texts, strict=True):
        assert program.spec.token.encode() not in text, f"token in clear text in {path}"
    assert program.spec.token not in driver.log_path("sortie-test-1-1").read_text()
    # ... nor in what other users of the machine can read of the agent processes.
    for node in LocalCloud(sortie_home / "local").nodes("sortie-test-1-1"):
        for part in ("environ", "cmdline"):
            assert program.spec.token.encode() not in Path(f"/proc/{node.pid}/{part}").read_bytes()
        assert program.spec.token not in "".join(p.read_text() for p in Path(node.sandbox).glob("*.json"))

    # Preempt node 1: its agent dies at once, and refresh (the infra's word) reports it gone.
    LocalCloud(sortie_home / "local").preempt_cluster("sortie-test-1-1", rank=1)
    with pytest.raises(AgentError, match="unreachable"):
        AgentClient(up.outputs["nodes"][1]["url"], up.outputs["token"]).health()
    refreshed = driver.refresh("sortie-test-1-1")
    assert [r.name for r in refreshed.gone] == ["node-1"]
    assert [r.name for r in refreshed.alive] == ["node-0"]
    assert refreshed.alive[0].id == up.outputs["nodes"][0]["node_id"]
    assert "token" not in refreshed.alive[0].outputs
    assert AgentClient(up.outputs["nodes"][0]["url"], up.outputs["token"]).health()["status"] == "ok"

    driver.destroy("sortie-test-1-1")
    assert leftovers(driver, sortie_home) == []


def test_full_region_fails_with_no_capacity_and_leaves_nothing(make_driver, sortie_home: Path) -> None:
    driver = make_driver("local:\n  regions:\n    - {name: region-a, capacity: 2}\n    - {name: region-b}\n")
    first = driver.up("sortie-cap-1-1", _cluster("sortie-cap-1-1", num_nodes=2))
    with pytest.raises(NoCapacityError) as err:
        driver.up("sortie-cap-2-1", _cluster("sortie-cap-2-1", num_nodes=2))
    assert "[no-capacity]" in str(err.value) and "local/region-a" in str(err.value)
    assert "\n" not in err.value.message
    assert driver.list_stacks() == ["sortie-cap-1-1"]
    cloud = LocalCloud(sortie_home / "local")
    assert sorted(n.node_id for n in cloud.nodes()) == sorted(_node_ids(first.outputs))
    assert not (sortie_home / "stacks" / "sortie-cap-2-1").exists()
    # The other region still has room.
    other = driver.up("sortie-cap-3-1", _cluster("sortie-cap-3-1", num_nodes=1, region="region-b"))
    assert other.outputs["nodes"][0]["region"] == "region-b"
    driver.destroy("sortie-cap-1-1")
    driver.destroy("sortie-cap-3-1")


def test_preview_reports_replacements_and_updates_and_changes_nothing(driver, sortie_home: Path) -> None:
    name = "sortie-prev-1-1"
    base = _cluster(name, num_nodes=2, labels={"team": "a"})
    up = driver.up(name, base)

    def preview(**changes: object) -> dict[str, tuple[str, tuple[str, ...]]]:
        program = StackProgram("cluster", dataclasses.replace(base.spec, **changes))
        return {c.name: (c.op, c.keys) for c in driver.preview(name, program).changes}

    assert preview() == {"node-0": ("same", ()), "node-1": ("same", ())}
    assert preview(labels={"team": "b"}) == {"node-0": ("update", ("labels",)), "node-1": ("update", ("labels",))}
    replaced = preview(region="region-b")
    assert {op for op, _ in replaced.values()} == {"replace"} and all("region" in k for _, k in replaced.values())
    assert preview(num_nodes=3)["node-2"] == ("create", ())
    assert preview(num_nodes=1)["node-1"] == ("delete", ())
    # Previews changed nothing: the same nodes are alive.
    assert [r.id for r in sorted(driver.refresh(name).alive, key=lambda r: r.name)] == _node_ids(up.outputs)

    # What preview said is what up does: labels in place (same nodes), region by replacement.
    relabelled = driver.up(name, StackProgram("cluster", dataclasses.replace(base.spec, labels={"team": "b"})))
    assert _node_ids(relabelled.outputs) == _node_ids(up.outputs)
    node0 = LocalCloud(sortie_home / "local").get(_node_ids(up.outputs)[0])
    assert node0 is not None and node0.labels == {"team": "b"}
    moved = driver.up(name, StackProgram("cluster", dataclasses.replace(base.spec, region="region-b")))
    assert {n["region"] for n in moved.outputs["nodes"]} == {"region-b"}
    assert not set(_node_ids(moved.outputs)) & set(_node_ids(up.outputs))
    assert {n.node_id for n in LocalCloud(sortie_home / "local").nodes()} == set(_node_ids(moved.outputs))
    driver.destroy(name)


def test_preview_of_a_new_stack_creates_no_stack(driver) -> None:
    preview = driver.preview("sortie-new-1-1", _cluster("sortie-new-1-1", num_nodes=2))
    assert preview.counts() == {"create": 2}
    assert driver.list_stacks() == []


def test_stale_lock_of_a_crashed_operation_is_retried_then_cancelled(make_driver, sortie_home: Path) -> None:
    driver = make_driver("pulumi:\n  concurrent_update_retries: 1\n")
    name = "sortie-lock-1-1"
    driver.up(name, _cluster(name, num_nodes=1))
    # What a killed `pulumi up` leaves: a lock file of a process that is gone.
    lock_dir = sortie_home / "pulumi-backend" / ".pulumi" / "locks" / "organization" / "sortie" / name
    lock_dir.mkdir(parents=True, exist_ok=True)
    (lock_dir / f"{uuid.uuid4()}.json").write_text(json.dumps(
        {"pid": 999999, "username": "crashed", "hostname": socket.gethostname(), "timestamp": "2026-01-01T00:00:00Z"}))
    with pytest.raises(StackLockedError, match="locked"):
        driver.refresh(name)
    # A lock whose process is alive (an operation still running) is never cancelled.
    live = lock_dir / f"{uuid.uuid4()}.json"
    live.write_text(json.dumps({"pid": os.getpid(), "hostname": socket.gethostname(), "username": "me",
                                "timestamp": "2026-01-01T00:00:00Z"}))
    assert driver.cancel_stale_locks() == []
    live.unlink()
    assert driver.cancel_stale_locks() == [name]
    assert not list(lock_dir.glob("*.json"))
    assert [r.name for r in driver.refresh(name).alive] == ["node-0"]
    driver.destroy(name)


def test_destroy_of_a_missing_stack_is_a_no_op(driver) -> None:
    driver.destroy("sortie-never-1-1")
    assert driver.list_stacks() == []


def test_dead_agent_reads_as_gone_and_is_reaped(driver, sortie_home: Path) -> None:
    """A node whose agent died without a preemption (a crash) is gone too, and nothing of it stays."""
    import os
    import signal

    name = "sortie-dead-1-1"
    up = driver.up(name, _cluster(name, num_nodes=1))
    cloud = LocalCloud(sortie_home / "local")
    node = cloud.get(_node_ids(up.outputs)[0])
    assert node is not None
    os.kill(node.pid, signal.SIGKILL)
    refreshed = driver.refresh(name)
    assert [r.name for r in refreshed.gone] == ["node-0"]
    assert cloud.nodes() == [] and not Path(node.sandbox).exists()
    driver.destroy(name)


def test_program_error_is_one_line_and_leaves_no_stack(driver) -> None:
    from orchestrator.errors import StackOperationError

    with pytest.raises(StackOperationError) as err:
        driver.up("sortie-bad-1-1", _cluster("sortie-bad-1-1", num_nodes=1, region="region-zz"))
    assert "region-zz" in err.value.message and "\n" not in err.value.message
    assert driver.list_stacks() == []


def _scenario(driver, preempt) -> dict:
    """One story told to any StackDriver; the answers must not depend on which driver it is."""
    name = "sortie-contract-1-1"
    base = _cluster(name, num_nodes=2, labels={"a": "1"})
    story: dict = {}
    up = driver.up(name, base)
    story["up"] = (sorted(up.outputs), sorted(up.secret_keys), [n["rank"] for n in up.outputs["nodes"]])
    for label, change in {"labels": {"labels": {"a": "2"}}, "region": {"region": "region-b"},
                          "grow": {"num_nodes": 3}, "shrink": {"num_nodes": 1}}.items():
        program = StackProgram("cluster", dataclasses.replace(base.spec, **change))
        story[label] = sorted((c.name, c.op, c.keys) for c in driver.preview(name, program).changes)
    preempt(name, 1)
    refreshed = driver.refresh(name)
    story["refresh"] = ([r.name for r in refreshed.alive], [r.name for r in refreshed.gone])
    driver.destroy(name)
    story["after"] = driver.list_stacks()
    return story


def test_fake_driver_tells_the_same_story_as_the_pulumi_driver(driver, sortie_home: Path) -> None:
    from tests.support.fake_driver import FakeStackDriver

    fake = FakeStackDriver()
    cloud = LocalCloud(sortie_home / "local")
    real_story = _scenario(driver, lambda stack, rank: cloud.preempt_cluster(stack, rank))
    fake_story = _scenario(fake, fake.preempt)
    assert fake_story == real_story
    assert real_story["refresh"] == (["node-0"], ["node-1"])
