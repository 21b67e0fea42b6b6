"""The cluster program: N nodes on one infra, exporting addresses, ranks, IPs and the agent token."""

from __future__ import annotations

import pulumi

from orchestrator.errors import UsageError
from stacks.builders import builder_for
from stacks.spec import ClusterSpec


def validate(spec: ClusterSpec) -> None:
    if spec.num_nodes < 1:
        raise UsageError(f"cluster {spec.name}: num_nodes must be >= 1, got {spec.num_nodes}")
    if not spec.token:
        raise UsageError(f"cluster {spec.name}: an agent token is required")


def cluster_program(spec: ClusterSpec) -> None:
    validate(spec)
    nodes = builder_for(spec.infra)(spec)
    pulumi.export("cluster", spec.name)
    pulumi.export("infra", spec.infra)
    pulumi.export("num_nodes", len(nodes))
    pulumi.export("nodes", [node.export() for node in nodes])
    pulumi.export("head_ip", nodes[0].ip)
    pulumi.export("token", pulumi.Output.secret(spec.token))
