"""The pool-worker program: one node of a pool, built by the same per-infra builders as a cluster."""

from __future__ import annotations

import dataclasses

import pulumi

from stacks.builders import builder_for
from stacks.cluster_program import validate
from stacks.spec import ClusterSpec


def pool_worker_program(spec: ClusterSpec, pool: str, worker_index: int) -> None:
    worker = dataclasses.replace(spec, num_nodes=1,
                                 labels={**spec.labels, "sortie-pool": pool, "sortie-worker": str(worker_index)})
    validate(worker)
    (node,) = builder_for(worker.infra)(worker)
    pulumi.export("pool", pool)
    pulumi.export("worker_index", worker_index)
    pulumi.export("infra", worker.infra)
    pulumi.export("worker", node.export())
    pulumi.export("token", pulumi.Output.secret(worker.token))
