"""`FakeStackDriver` behaves as the real local cloud behind `PulumiStackDriver` would."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

from orchestrator.errors import NoCapacityError, StackNotFoundError, StackOperationError
from orchestrator.infra.pulumi_driver import PulumiStackDriver
from orchestrator.infra.stack_driver import StackDriver, UpResult, stack_name
from stacks.spec import ClusterSpec, StackProgram
from tests.support.fake_driver import NODE_TYPE, FakeStackDriver

TOKEN = "fake-token-" + "y" * 32
SPEC = ClusterSpec(name="c1", num_nodes=2, labels={"team": "ml"}, token=TOKEN)


def cluster(**changes: Any) -> StackProgram:
    return StackProgram("cluster", dataclasses.replace(SPEC, **changes))


def node_ids(result: UpResult) -> list[str]:
    return [n["node_id"] for n in result.outputs["nodes"]]


# --- up --------------------------------------------------------------------------------------------------------------


def test_up_of_two_nodes() -> None:
    driver = FakeStackDriver()
    result = driver.up("s1", cluster())

    assert result.stack == "s1"
    nodes = result.outputs["nodes"]
    assert len(nodes) == 2
    assert [n["rank"] for n in nodes] == [0, 1]
    assert {n["region"] for n in nodes} == {"region-a"}
    assert len(set(node_ids(result))) == 2
    assert result.outputs["num_nodes"] == 2
    assert result.outputs["cluster"] == "c1"
    assert result.outputs["head_ip"] == nodes[0]["ip"]
    assert result.outputs["token"] == TOKEN
    assert "token" in result.secret_keys
    assert driver.list_stacks() == ["s1"]
    assert driver.operations == [("up", "s1")]


def test_public_outputs_mask_the_token() -> None:
    result = FakeStackDriver().up("s1", cluster())
    public = result.public_outputs()
    assert public["token"] == "[secret]"
    assert TOKEN not in repr(public)
    assert public["nodes"] == result.outputs["nodes"]


def test_up_again_with_same_spec_keeps_nodes() -> None:
    driver = FakeStackDriver()
    first = driver.up("s1", cluster())
    second = driver.up("s1", cluster())
    assert node_ids(second) == node_ids(first)


# --- preview ---------------------------------------------------------------------------------------------------------


def test_preview_of_unchanged_spec_is_all_same() -> None:
    driver = FakeStackDriver()
    driver.up("s1", cluster())
    preview = driver.preview("s1", cluster())

    assert [c.op for c in preview.changes] == ["same", "same"]
    assert [c.name for c in preview.changes] == ["node-0", "node-1"]
    assert all(c.type == NODE_TYPE for c in preview.changes)
    assert not preview.has_changes
    assert preview.counts() == {}


def test_preview_of_new_stack_creates_every_node_and_makes_no_stack() -> None:
    driver = FakeStackDriver()
    preview = driver.preview("s1", cluster())
    assert [(c.name, c.op) for c in preview.changes] == [("node-0", "create"), ("node-1", "create")]
    assert preview.counts() == {"create": 2}
    assert driver.list_stacks() == []


def test_preview_label_change_updates_in_place() -> None:
    driver = FakeStackDriver()
    driver.up("s1", cluster())
    preview = driver.preview("s1", cluster(labels={"team": "infra"}))

    assert [(c.name, c.op, c.keys) for c in preview.changes] == [
        ("node-0", "update", ("labels",)), ("node-1", "update", ("labels",))]
    assert preview.has_changes
    assert preview.counts() == {"update": 2}


def test_preview_region_change_replaces() -> None:
    driver = FakeStackDriver()
    driver.up("s1", cluster())
    preview = driver.preview("s1", cluster(region="region-b"))

    assert [c.op for c in preview.changes] == ["replace", "replace"]
    assert all("region" in c.keys for c in preview.changes)
    assert len(preview.by_op("replace")) == 2


def test_preview_more_nodes_creates_the_new_one() -> None:
    driver = FakeStackDriver()
    driver.up("s1", cluster())
    preview = driver.preview("s1", cluster(num_nodes=3))

    assert {c.name: c.op for c in preview.changes} == {"node-0": "same", "node-1": "same", "node-2": "create"}
    assert [c.name for c in preview.by_op("create")] == ["node-2"]


def test_preview_fewer_nodes_deletes_the_last_one() -> None:
    driver = FakeStackDriver()
    driver.up("s1", cluster())
    preview = driver.preview("s1", cluster(num_nodes=1))

    assert {c.name: c.op for c in preview.changes} == {"node-0": "same", "node-1": "delete"}
    assert preview.counts() == {"delete": 1}


def test_preview_changes_nothing() -> None:
    driver = FakeStackDriver()
    before = node_ids(driver.up("s1", cluster()))
    for program in (cluster(labels={"x": "y"}), cluster(region="region-b"), cluster(num_nodes=3),
                    cluster(num_nodes=1)):
        driver.preview("s1", program)
    after = driver.up("s1", cluster())
    assert node_ids(after) == before
    assert driver.preview("s1", cluster()).has_changes is False


def test_up_applies_what_preview_said() -> None:
    driver = FakeStackDriver()
    before = node_ids(driver.up("s1", cluster()))

    relabelled = driver.up("s1", cluster(labels={"team": "infra"}))
    assert node_ids(relabelled) == before  # update in place keeps the nodes

    moved = driver.up("s1", cluster(region="region-b"))
    assert not set(node_ids(moved)) & set(before)  # replace makes new nodes
    assert {n["region"] for n in moved.outputs["nodes"]} == {"region-b"}

    shrunk = driver.up("s1", cluster(region="region-b", num_nodes=1))
    assert node_ids(shrunk) == node_ids(moved)[:1]


# --- capacity --------------------------------------------------------------------------------------------------------


def test_capacity_of_a_region_is_enforced() -> None:
    driver = FakeStackDriver(capacity={"region-a": 2})
    driver.up("s1", cluster())

    with pytest.raises(NoCapacityError) as info:
        driver.up("s2", cluster(name="c2"))
    assert "[no-capacity]" in str(info.value)
    assert info.value.stack == "s2"
    assert "s2" not in driver.list_stacks()
    assert driver.list_stacks() == ["s1"]

    other = driver.up("s3", cluster(name="c3", region="region-b"))
    assert {n["region"] for n in other.outputs["nodes"]} == {"region-b"}
    assert driver.list_stacks() == ["s1", "s3"]


def test_capacity_is_freed_by_destroy() -> None:
    driver = FakeStackDriver(capacity={"region-a": 2})
    driver.up("s1", cluster())
    driver.destroy("s1")
    assert len(driver.up("s2", cluster(name="c2")).outputs["nodes"]) == 2


def test_failed_up_without_cleanup_keeps_an_empty_stack() -> None:
    driver = FakeStackDriver(capacity={"region-a": 1})
    with pytest.raises(NoCapacityError):
        driver.up("s1", cluster(), cleanup_on_failure=False)
    assert driver.list_stacks() == ["s1"]
    driver.remove("s1")
    assert driver.list_stacks() == []


# --- preemption and refresh ------------------------------------------------------------------------------------------


def test_preempted_node_is_gone_at_the_next_refresh_only() -> None:
    driver = FakeStackDriver()
    up = driver.up("s1", cluster())
    driver.preempt("s1", 1)

    first = driver.refresh("s1")
    assert [r.name for r in first.gone] == ["node-1"]
    assert [r.name for r in first.alive] == ["node-0"]
    assert first.gone[0].id == node_ids(up)[1]
    assert all("token" not in r.outputs for r in first.alive + first.gone)

    second = driver.refresh("s1")
    assert second.gone == ()
    assert [r.name for r in second.alive] == ["node-0"]


def test_node_recreated_after_preemption_is_alive() -> None:
    driver = FakeStackDriver()
    driver.up("s1", cluster())
    driver.preempt("s1", 1)
    assert [r.name for r in driver.refresh("s1").gone] == ["node-1"]

    recreated = driver.up("s1", cluster())  # the recovery path: up brings node-1 back as a new node
    assert len(recreated.outputs["nodes"]) == 2

    after = driver.refresh("s1")
    assert after.gone == ()
    assert [r.name for r in after.alive] == ["node-0", "node-1"]


def test_preempted_node_frees_its_capacity() -> None:
    driver = FakeStackDriver(capacity={"region-a": 2})
    driver.up("s1", cluster())
    driver.preempt("s1", 1)
    result = driver.up("s2", cluster(name="c2", num_nodes=1))
    assert len(result.outputs["nodes"]) == 1


def test_refresh_of_unknown_stack_raises() -> None:
    with pytest.raises(StackNotFoundError) as info:
        FakeStackDriver().refresh("nope")
    assert info.value.stack == "nope"


# --- destroy and remove ----------------------------------------------------------------------------------------------


def test_destroy_removes_the_stack() -> None:
    driver = FakeStackDriver()
    driver.up("s1", cluster())
    driver.destroy("s1")
    assert driver.list_stacks() == []
    with pytest.raises(StackNotFoundError):
        driver.refresh("s1")


def test_destroy_without_remove_keeps_an_empty_stack() -> None:
    driver = FakeStackDriver()
    driver.up("s1", cluster())
    driver.destroy("s1", remove=False)
    assert driver.list_stacks() == ["s1"]
    refreshed = driver.refresh("s1")
    assert refreshed.alive == () and refreshed.gone == ()


def test_destroy_of_unknown_stack_is_a_no_op() -> None:
    driver = FakeStackDriver()
    driver.up("s1", cluster())
    driver.destroy("nope")
    assert driver.list_stacks() == ["s1"]
    assert ("destroy", "nope") in driver.operations


def test_remove_of_stack_with_resources_is_refused() -> None:
    driver = FakeStackDriver()
    driver.up("s1", cluster())
    with pytest.raises(StackOperationError, match="s1"):
        driver.remove("s1")
    assert driver.list_stacks() == ["s1"]


# --- invalid specs: the real program refuses them, and a failed up leaves no stack ---------------------------------


def test_up_with_no_nodes_fails_cleanly() -> None:
    driver = FakeStackDriver()
    with pytest.raises(StackOperationError):
        driver.up("s1", cluster(num_nodes=0))
    assert driver.list_stacks() == []


def test_up_without_token_fails() -> None:
    driver = FakeStackDriver()
    with pytest.raises(StackOperationError):
        driver.up("s1", cluster(token=""))
    assert driver.list_stacks() == []


# --- pool workers ----------------------------------------------------------------------------------------------------


def test_pool_worker_is_one_labelled_node() -> None:
    driver = FakeStackDriver()
    program = StackProgram("pool-worker", SPEC, pool="p", worker_index=1)
    result = driver.up("pool-p-1", program)

    assert result.outputs["pool"] == "p"
    assert result.outputs["worker_index"] == 1
    assert result.outputs["worker"]["rank"] == 0
    assert "nodes" not in result.outputs
    assert result.public_outputs()["token"] == "[secret]"

    (node,) = driver.refresh("pool-p-1").alive
    assert node.name == "node-0"
    assert node.outputs["labels"] == {"team": "ml", "sortie-pool": "p", "sortie-worker": "1"}


# --- names and the protocol ------------------------------------------------------------------------------------------


def test_stack_name() -> None:
    assert stack_name("sortie", "job", 42, 1) == "sortie-job-42-1"
    assert stack_name("sortie", "pool", "gpu", 3) == "sortie-pool-gpu-3"


DRIVER_METHODS = ("up", "preview", "refresh", "destroy", "remove", "list_stacks")


def _params(cls: type, method: str) -> list[tuple[str, Any]]:
    signature = inspect.signature(getattr(cls, method))
    return [(p.name, p.kind) for p in signature.parameters.values() if p.name != "self"]


@pytest.mark.parametrize("method", DRIVER_METHODS)
def test_fake_and_pulumi_driver_share_the_protocol(method: str) -> None:
    assert callable(getattr(FakeStackDriver, method, None))
    assert callable(getattr(PulumiStackDriver, method, None))
    protocol = _params(StackDriver, method)
    assert _params(FakeStackDriver, method) == protocol
    assert _params(PulumiStackDriver, method) == protocol


def test_fake_driver_is_usable_as_a_stack_driver() -> None:
    driver: StackDriver = FakeStackDriver()
    driver.up("s1", cluster(num_nodes=1))
    assert driver.list_stacks() == ["s1"]
