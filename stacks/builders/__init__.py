"""Per-infra node builders behind one signature: `build(spec) -> list[BuiltNode]`.

A builder declares the Pulumi resources of `spec.num_nodes` nodes and returns, per node, the
outputs the cluster program exports. Only `local` exists now; cloud builders plug in here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pulumi

from orchestrator.errors import UsageError
from stacks.spec import ClusterSpec


@dataclass(frozen=True)
class BuiltNode:
    """Outputs of one node, as every builder reports them."""

    rank: int
    node_id: pulumi.Output[str]
    host: pulumi.Output[str]
    ip: pulumi.Output[str]
    url: pulumi.Output[str]
    region: pulumi.Output[str]

    def export(self) -> dict[str, object]:
        return {"rank": self.rank, "node_id": self.node_id, "host": self.host, "ip": self.ip,
                "url": self.url, "region": self.region}


NodeBuilder = Callable[[ClusterSpec], list[BuiltNode]]


def _local(spec: ClusterSpec) -> list[BuiltNode]:
    from stacks.builders.local import build_local_nodes

    return build_local_nodes(spec)


BUILDERS: dict[str, NodeBuilder] = {"local": _local}


def builder_for(infra: str) -> NodeBuilder:
    cloud = infra.split("/", 1)[0]
    try:
        return BUILDERS[cloud]
    except KeyError:
        known = ", ".join(sorted(BUILDERS))
        raise UsageError(f"infra {infra!r} has no stack builder yet (available: {known})") from None
