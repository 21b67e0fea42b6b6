"""The cloud-independent parts of the Pulumi programs, run under `pulumi.runtime.set_mocks`.

No engine, no provider process, no credentials: the mock monitor receives every resource
registration (with its inputs serialized exactly as the engine would get them) and answers with
fake outputs. The real program code runs unchanged, including the dynamic provider's serialization.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dill
import pulumi
import pulumi.dynamic
import pytest

from orchestrator.errors import SortieError, UsageError
from stacks.builders.local import LocalNodeProvider
from stacks.cluster_program import cluster_program
from stacks.pool_program import pool_worker_program
from stacks.spec import ClusterSpec, StackProgram
from tests.support.pulumi_mocks import run_and_resolve

NODE_TYPE = "pulumi-python:dynamic:Resource"
SECRET_SIG = "4dabf18193072939515e22adb298388d"  # Pulumi's marker of a secret value on the wire
TOKEN = "tok-" + "x" * 40


class RecordingMocks(pulumi.runtime.Mocks):
    """Records each registered resource and answers with its inputs plus fake node outputs."""

    def __init__(self) -> None:
        self.resources: list[tuple[str, str, dict[str, Any]]] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append((args.typ, args.name, dict(args.inputs)))
        outputs = {"node_id": f"{args.name}-nid", "host": f"{args.name}.host", "ip": f"10.0.0.{len(self.resources)}",
                   "url": f"http://{args.name}:8080", "port": 8080, "pid": 1234, "sandbox": f"/sb/{args.name}"}
        return f"{args.name}-id", {**args.inputs, **outputs}

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}

    def by_name(self) -> dict[str, dict[str, Any]]:
        return {name: inputs for _typ, name, inputs in self.resources}


class Harness:
    """Runs a program under fresh mocks and resolves what it exported to (value, is_secret) pairs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mocks = RecordingMocks()
        pulumi.runtime.set_mocks(self.mocks, project="sortie", stack="test", preview=False)
        self.exported: dict[str, Any] = {}
        self.exports: dict[str, tuple[Any, bool]] = {}
        # What LocalNode hands to pulumi.dynamic.Resource, before any serialization.
        self.resource_calls: list[tuple[str, dict[str, Any], pulumi.ResourceOptions | None]] = []
        monkeypatch.setattr(pulumi, "export", self._export)
        original_init = pulumi.dynamic.Resource.__init__
        calls = self.resource_calls

        def spying_init(res: Any, provider: Any, name: str, props: Any, opts: Any = None) -> None:
            calls.append((name, dict(props), opts))
            original_init(res, provider, name, props, opts)

        monkeypatch.setattr(pulumi.dynamic.Resource, "__init__", spying_init)

    def _export(self, name: str, value: Any) -> None:
        assert name not in self.exported, f"exported twice: {name}"
        self.exported[name] = value

    def run(self, program: Callable[[], None]) -> dict[str, tuple[Any, bool]]:
        self.exports.update(run_and_resolve(program, self.exported))
        return self.exports


@pytest.fixture
def harness(sortie_home: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(monkeypatch)


def write_config(home: Path, text: str) -> None:
    (home / "config.yaml").write_text(text)


def spec(**kwargs: Any) -> ClusterSpec:
    return ClusterSpec(**{"name": "c1", "token": TOKEN, **kwargs})


def is_wire_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(SECRET_SIG) is not None and "value" in value


# --- the cluster program ---------------------------------------------------------------------------------------------


def test_cluster_of_three_registers_three_dynamic_nodes(harness: Harness) -> None:
    labels = {"team": "ml", "sortie-job": "42"}
    harness.run(lambda: cluster_program(spec(num_nodes=3, labels=labels)))

    # Resources register asynchronously: compare as sorted, not in registration order.
    assert sorted((t, n) for t, n, _ in harness.mocks.resources) == [(NODE_TYPE, f"node-{i}") for i in range(3)]
    for rank, (_typ, _name, inputs) in enumerate(sorted(harness.mocks.resources, key=lambda r: r[1])):
        assert inputs["rank"] == rank
        assert inputs["cluster"] == "c1"
        assert inputs["region"] == "region-a"
        assert inputs["labels"] == labels
        assert inputs["accelerators"] == {}
        assert "__provider" in inputs


def test_cluster_exports_nodes_ranks_count_and_secret_token(harness: Harness) -> None:
    exports = harness.run(lambda: cluster_program(spec(num_nodes=3)))

    nodes, nodes_secret = exports["nodes"]
    assert len(nodes) == 3
    assert [n["rank"] for n in nodes] == [0, 1, 2]
    assert [n["node_id"] for n in nodes] == ["node-0-nid", "node-1-nid", "node-2-nid"]
    assert {n["region"] for n in nodes} == {"region-a"}
    assert not nodes_secret
    assert exports["num_nodes"] == (3, False)
    assert exports["cluster"] == ("c1", False)
    assert exports["infra"] == ("local", False)
    assert exports["head_ip"] == (nodes[0]["ip"], False)
    assert exports["token"] == (TOKEN, True)
    assert set(exports) == {"cluster", "infra", "num_nodes", "nodes", "head_ip", "token"}


def test_token_reaches_each_node_only_as_a_secret(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec(num_nodes=2)))

    # On the wire (what the engine would store): every node's token input is marked secret.
    for _typ, name, inputs in harness.mocks.resources:
        assert is_wire_secret(inputs["token"]), f"{name}: token input not secret: {inputs['token']!r}"
        assert inputs["token"]["value"] == TOKEN
        plain = {k: v for k, v in inputs.items() if k not in ("token", "__provider")}
        assert TOKEN not in repr(plain)

    # In the program: the token handed to the resource is a secret Output, and stays secret in outputs.
    assert [name for name, _props, _opts in harness.resource_calls] == ["node-0", "node-1"]
    secrets: list[tuple[Any, bool]] = []

    async def settle() -> None:
        for _name, props, opts in harness.resource_calls:
            token = props["token"]
            assert isinstance(token, pulumi.Output)
            secrets.append((await token.future(), await token.is_secret()))
            assert opts is not None and "token" in (opts.additional_secret_outputs or [])

    pulumi.runtime.test(lambda: settle())()
    assert secrets == [(TOKEN, True), (TOKEN, True)]


def test_provider_is_serialized_by_reference(harness: Harness) -> None:
    """The engine's provider process must find `LocalNodeProvider` by import: it is pickled by reference."""
    harness.run(lambda: cluster_program(spec(num_nodes=1)))

    (_typ, _name, inputs), = harness.mocks.resources
    serialized = inputs["__provider"]
    if is_wire_secret(serialized):
        serialized = serialized["value"]
    provider = dill.loads(base64.b64decode(serialized))
    assert type(provider) is LocalNodeProvider


@pytest.mark.parametrize("region", ["region-b", "local/region-b"])
def test_region_puts_every_node_there(harness: Harness, region: str) -> None:
    exports = harness.run(lambda: cluster_program(spec(num_nodes=2, region=region)))

    assert [inputs["region"] for _t, _n, inputs in harness.mocks.resources] == ["region-b", "region-b"]
    assert [n["region"] for n in exports["nodes"][0]] == ["region-b", "region-b"]


def test_undeclared_accelerator_is_a_usage_error(harness: Harness) -> None:
    with pytest.raises(UsageError, match="H100"):
        cluster_program(spec(num_nodes=1, accelerators={"H100": 1}))
    assert harness.mocks.resources == []


def test_too_many_accelerators_is_a_usage_error(harness: Harness, sortie_home: Path) -> None:
    write_config(sortie_home, "local:\n  regions:\n    - name: region-a\n      accelerators: {H100: 8}\n")
    with pytest.raises(UsageError, match="H100:16"):
        cluster_program(spec(num_nodes=1, accelerators={"H100": 16}))
    assert harness.mocks.resources == []


def test_declared_accelerator_builds_nodes(harness: Harness, sortie_home: Path) -> None:
    write_config(sortie_home, "local:\n  regions:\n    - name: region-a\n      accelerators: {H100: 8}\n")
    exports = harness.run(lambda: cluster_program(spec(num_nodes=2, accelerators={"H100": 1})))

    assert sorted(n for _t, n, _i in harness.mocks.resources) == ["node-0", "node-1"]
    assert all(inputs["accelerators"] == {"H100": 1} for _t, _n, inputs in harness.mocks.resources)
    assert exports["num_nodes"] == (2, False)


def test_capacity_of_the_region_is_an_input(harness: Harness, sortie_home: Path) -> None:
    write_config(sortie_home, "local:\n  regions:\n    - name: region-a\n      capacity: 5\n")
    harness.run(lambda: cluster_program(spec(num_nodes=1)))

    (_typ, _name, inputs), = harness.mocks.resources
    assert inputs["capacity"] == 5


def test_local_root_defaults_under_the_home(harness: Harness, sortie_home: Path) -> None:
    harness.run(lambda: cluster_program(spec(num_nodes=1)))
    (_typ, _name, inputs), = harness.mocks.resources
    assert Path(inputs["root"]) == sortie_home.resolve() / "local"


def test_unknown_region_is_an_error_naming_it(harness: Harness) -> None:
    with pytest.raises(SortieError, match="region-zz"):
        cluster_program(spec(num_nodes=1, region="region-zz"))
    assert harness.mocks.resources == []


def test_infra_without_builder_is_a_usage_error(harness: Harness) -> None:
    with pytest.raises(UsageError, match=r"'lambda' has no stack builder"):
        cluster_program(spec(num_nodes=1, infra="lambda"))
    assert harness.mocks.resources == []


@pytest.mark.parametrize("bad", [{"num_nodes": 0}, {"num_nodes": -1}, {"token": ""}],
                         ids=["zero-nodes", "negative-nodes", "no-token"])
def test_invalid_spec_is_a_usage_error(harness: Harness, bad: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match="c1"):
        cluster_program(spec(**bad))
    assert harness.mocks.resources == []
    assert harness.exported == {}


def test_stack_program_build_runs_the_cluster_program(harness: Harness) -> None:
    exports = harness.run(StackProgram("cluster", spec(num_nodes=2)).build())
    assert sorted(n for _t, n, _i in harness.mocks.resources) == ["node-0", "node-1"]
    assert exports["num_nodes"] == (2, False)


# --- the pool-worker program -----------------------------------------------------------------------------------------


def test_pool_worker_builds_one_labelled_node(harness: Harness) -> None:
    exports = harness.run(lambda: pool_worker_program(spec(num_nodes=4, labels={"team": "ml"}), "gpu-pool", 2))

    assert [(t, n) for t, n, _ in harness.mocks.resources] == [(NODE_TYPE, "node-0")]
    inputs = harness.mocks.by_name()["node-0"]
    assert inputs["labels"] == {"team": "ml", "sortie-pool": "gpu-pool", "sortie-worker": "2"}
    assert inputs["rank"] == 0
    assert is_wire_secret(inputs["token"])

    assert exports["pool"] == ("gpu-pool", False)
    assert exports["worker_index"] == (2, False)
    worker, _ = exports["worker"]
    assert worker["rank"] == 0
    assert worker["node_id"] == "node-0-nid"
    assert exports["token"] == (TOKEN, True)


def test_pool_worker_via_stack_program(harness: Harness) -> None:
    exports = harness.run(StackProgram("pool-worker", spec(), pool="p", worker_index=1).build())
    assert harness.mocks.by_name()["node-0"]["labels"] == {"sortie-pool": "p", "sortie-worker": "1"}
    assert exports["pool"] == ("p", False)
    assert exports["worker_index"] == (1, False)


def test_pool_worker_without_token_is_a_usage_error(harness: Harness) -> None:
    with pytest.raises(UsageError):
        pool_worker_program(spec(token=""), "gpu-pool", 0)
    assert harness.mocks.resources == []
