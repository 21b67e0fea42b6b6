"""Infra, an in-memory `StackDriver` for unit tests of the layers above: no engine, no processes.

It models the local cloud's program: one resource per node, the same inputs and the same
replace/update rules as the real provider (`stacks.builders.local`), per-region capacity, and
preemption. A contract test runs the same scenario on this driver and on the Pulumi one.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

from orchestrator.errors import NoCapacityError, StackNotFoundError, StackOperationError, UsageError
from orchestrator.infra.stack_driver import Preview, RefreshResult, ResourceChange, ResourceState, UpResult
from stacks.builders.local import diff_node_inputs, node_inputs
from stacks.cluster_program import validate
from stacks.spec import ClusterSpec, StackProgram

NODE_TYPE = "pulumi-python:dynamic:Resource"


def _urn(stack: str, name: str) -> str:
    return f"urn:pulumi:{stack}::sortie::{NODE_TYPE}::{name}"


class FakeStackDriver:
    """`StackDriver` in memory. `operations` records every call as (op, stack)."""

    def __init__(self, capacity: Mapping[str, int] | None = None, default_region: str = "region-a") -> None:
        self.capacity = dict(capacity or {})
        self.default_region = default_region
        self.stacks: dict[str, dict[str, dict[str, Any]]] = {}
        self.preempted: set[tuple[str, str]] = set()
        self.operations: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._ids = 0

    def _plan(self, program: StackProgram) -> dict[str, dict[str, Any]]:
        spec: ClusterSpec = program.spec
        if program.kind == "pool-worker":
            spec = dataclasses.replace(spec, num_nodes=1, labels={
                **spec.labels, "sortie-pool": program.pool or "", "sortie-worker": str(program.worker_index or 0)})
        region = (spec.region or self.default_region).split("/")[-1]
        return {f"node-{rank}": node_inputs(spec, rank, region, "fake", self.capacity.get(region))
                for rank in range(spec.num_nodes)}

    def _changes(self, stack: str, plan: dict[str, dict[str, Any]]) -> list[ResourceChange]:
        current = self.stacks.get(stack, {})
        changes = []
        for name, inputs in plan.items():
            urn = _urn(stack, name)
            if name not in current:
                changes.append(ResourceChange(urn, NODE_TYPE, name, "create"))
                continue
            replaces, updates = diff_node_inputs(current[name]["inputs"], inputs)
            if replaces:
                changes.append(ResourceChange(urn, NODE_TYPE, name, "replace", tuple(sorted(replaces + updates))))
            elif updates:
                changes.append(ResourceChange(urn, NODE_TYPE, name, "update", tuple(sorted(updates))))
            else:
                changes.append(ResourceChange(urn, NODE_TYPE, name, "same"))
        changes += [ResourceChange(_urn(stack, n), NODE_TYPE, n, "delete") for n in current if n not in plan]
        return changes

    def _in_use(self, region: str, excluding: str) -> int:
        """Nodes holding capacity in a region; a preempted node frees its capacity at once."""
        return sum(1 for name, resources in self.stacks.items() if name != excluding
                   for rname, r in resources.items()
                   if r["inputs"]["region"] == region and (name, rname) not in self.preempted)

    def up(self, stack: str, program: StackProgram, *, cleanup_on_failure: bool = True) -> UpResult:
        with self._lock:
            self.operations.append(("up", stack))
            try:
                validate(program.spec)
            except UsageError as exc:  # the real program fails the same way, inside the engine
                raise StackOperationError(f"up of stack {stack} failed: {exc}", stack) from None
            plan = self._plan(program)
            for region in {inputs["region"] for inputs in plan.values()}:
                limit = self.capacity.get(region)
                wanted = sum(1 for i in plan.values() if i["region"] == region)
                if limit is not None and self._in_use(region, stack) + wanted > limit:
                    if not cleanup_on_failure:
                        self.stacks.setdefault(stack, {})
                    raise NoCapacityError(f"up of stack {stack} failed: [no-capacity] local/{region} is full: "
                                          f"capacity {limit} node(s)", stack)
            current = self.stacks.setdefault(stack, {})
            for change in self._changes(stack, plan):
                if change.op in ("create", "replace"):
                    self._ids += 1
                    current[change.name] = {"inputs": plan[change.name], "id": f"fake-{self._ids}"}
                    self.preempted.discard((stack, change.name))
                elif change.op == "update":
                    current[change.name]["inputs"] = plan[change.name]
                elif change.op == "delete":
                    del current[change.name]
            return self._outputs(stack, program)

    def _outputs(self, stack: str, program: StackProgram) -> UpResult:
        resources = self.stacks[stack]
        nodes = [{"rank": r["inputs"]["rank"], "node_id": r["id"], "host": "127.0.0.1", "ip": "127.0.0.1",
                  "url": f"fake://{r['id']}", "region": r["inputs"]["region"]}
                 for r in sorted(resources.values(), key=lambda r: r["inputs"]["rank"])]
        outputs: dict[str, Any] = {"infra": program.spec.infra, "token": program.spec.token}
        if program.kind == "cluster":
            outputs |= {"cluster": program.spec.name, "num_nodes": len(nodes), "nodes": nodes,
                        "head_ip": nodes[0]["ip"]}
        else:
            outputs |= {"pool": program.pool, "worker_index": program.worker_index, "worker": nodes[0]}
        return UpResult(stack=stack, outputs=outputs, secret_keys=frozenset({"token"}))

    def preview(self, stack: str, program: StackProgram) -> Preview:
        with self._lock:
            self.operations.append(("preview", stack))
            return Preview(stack=stack, changes=tuple(self._changes(stack, self._plan(program))))

    def _require(self, stack: str) -> dict[str, dict[str, Any]]:
        if stack not in self.stacks:
            raise StackNotFoundError(f"stack {stack} does not exist", stack)
        return self.stacks[stack]

    def preempt(self, stack: str, rank: int) -> None:
        """Make a node disappear, as a reclaimed spot VM does (found by the next refresh)."""
        with self._lock:
            self.preempted.add((stack, f"node-{rank}"))

    def refresh(self, stack: str) -> RefreshResult:
        with self._lock:
            self.operations.append(("refresh", stack))
            resources = self._require(stack)
            gone_names = [n for n in resources if (stack, n) in self.preempted]
            gone = tuple(self._state(stack, n, resources.pop(n)) for n in gone_names)
            self.preempted -= {(stack, n) for n in gone_names}
            alive = tuple(self._state(stack, n, r) for n, r in resources.items())
            return RefreshResult(stack=stack, alive=alive, gone=gone)

    @staticmethod
    def _state(stack: str, name: str, resource: dict[str, Any]) -> ResourceState:
        outputs = {k: v for k, v in resource["inputs"].items() if k != "token"}
        return ResourceState(urn=_urn(stack, name), type=NODE_TYPE, name=name, id=resource["id"], outputs=outputs)

    def destroy(self, stack: str, *, remove: bool = True) -> None:
        with self._lock:
            self.operations.append(("destroy", stack))
            if stack not in self.stacks:
                return
            self.stacks[stack] = {}
            self.preempted = {p for p in self.preempted if p[0] != stack}
            if remove:
                del self.stacks[stack]

    def remove(self, stack: str) -> None:
        with self._lock:
            self.operations.append(("remove", stack))
            if self.stacks.get(stack):
                raise StackOperationError(f"stack {stack} still has resources; destroy it first", stack)
            self.stacks.pop(stack, None)

    def list_stacks(self) -> list[str]:
        with self._lock:
            return sorted(self.stacks)

    def log_path(self, stack: str) -> None:
        return None  # no engine, no engine output
