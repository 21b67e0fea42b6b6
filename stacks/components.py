"""Sortie's cluster as a reusable Pulumi component, for teams' own programs.

    from stacks.components import SortieCluster
    from stacks.spec import ClusterSpec

    cluster = SortieCluster("trainers", ClusterSpec(name="trainers", infra="aws", region="us-east-1",
                                                    num_nodes=2, token=token))
    pulumi.export("head_ip", cluster.head_ip)

The nodes are built by the same per-infra builders as Sortie's own cluster stacks, as children of
the component (the local cloud's nodes excepted: its builder takes no parent). Sortie's own
`cluster_program` does not use the component, so the URNs of existing stacks stay as they are.
"""

from __future__ import annotations

from typing import Any

import pulumi

from stacks.builders import BuiltNode, builder_for
from stacks.cluster_program import validate
from stacks.spec import ClusterSpec

TYPE = "sortie:index:Cluster"


class SortieCluster(pulumi.ComponentResource):
    """`spec.num_nodes` nodes on `spec.infra`, each running the node agent."""

    nodes: pulumi.Output[list[dict[str, Any]]]
    head_ip: pulumi.Output[str]
    built: list[BuiltNode]

    def __init__(self, name: str, spec: ClusterSpec, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(TYPE, name, None, opts)
        validate(spec)
        self.built = builder_for(spec.infra)(spec, pulumi.ResourceOptions(parent=self))
        self.nodes = pulumi.Output.all(*(pulumi.Output.from_input(node.export()) for node in self.built))
        self.head_ip = self.built[0].ip
        self.register_outputs({"nodes": self.nodes, "head_ip": self.head_ip})
