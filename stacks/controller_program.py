"""The jobs-controller program: one VM on a cloud that runs Sortie's controller daemon against the shared
state DB (`jobs.controller.infra`), built by the same per-infra builders as a cluster."""

from __future__ import annotations

import dataclasses

import pulumi

from stacks.builders import REMOTE_DASHBOARD_PORT, builder_for
from stacks.spec import ClusterSpec


def controller_program(spec: ClusterSpec) -> None:
    controller = dataclasses.replace(spec, num_nodes=1, role="controller",
                                     labels={**spec.labels, "sortie-role": "controller"})
    (node,) = builder_for(controller.infra)(controller)
    pulumi.export("controller", {**node.export(), "dashboard_port": REMOTE_DASHBOARD_PORT})
    pulumi.export("infra", controller.infra)
