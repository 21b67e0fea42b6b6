"""What a stack program is asked to build: picklable values, so they cross into worker processes."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

ProgramKind = Literal["cluster", "pool-worker", "controller"]


def new_cluster_token() -> str:
    """A fresh bearer token for the agents of one cluster."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster of `num_nodes` identical nodes on one infra and region."""

    name: str
    infra: str = "local"
    region: str | None = None
    zone: str | None = None
    num_nodes: int = 1
    instance_type: str | None = None
    cpus: str | None = None
    memory: str | None = None
    accelerators: Mapping[str, int] = field(default_factory=dict)
    use_spot: bool = False
    disk_size: int | None = None
    image: str | None = None
    # --- a task's resource features (issue 16); see orchestrator.policy.cloud_features ---
    ports: tuple[str, ...] = ()          # "8080" or "8000-8010": opened in the cluster's firewall from ports_cidr
    ports_cidr: str = "0.0.0.0/0"         # config cloud.ports_cidr (SkyPilot's default: anywhere)
    disk_tier: str | None = None          # low|medium|high|ultra|best: the OS disk's volume type
    network_tier: str | None = None       # best: the cloud's fast network (placement group, gVNIC, accel. net.)
    accelerator_args: Mapping[str, Any] = field(default_factory=dict)  # TPUs: runtime_version, tpu_vm, ...
    pod_config: Mapping[str, Any] = field(default_factory=dict)  # Kubernetes: config.kubernetes.pod_config
    container_image: str | None = None    # image_id: docker:<image>: setup and run go into a container of it
    container_options: tuple[str, ...] = ()  # config.docker.run_options
    labels: Mapping[str, str] = field(default_factory=dict)
    token: str = field(default="", repr=False)
    # Where the local cloud keeps its sandboxes (the Sortie home's `local/`); local infra only.
    local_root: str | None = None
    # --- cloud infras (aws, gcp, azure, kubernetes); the local cloud ignores these ---
    # Team tags from config, put on every resource that takes tags (after `labels`, before Sortie's own).
    tags: Mapping[str, str] = field(default_factory=dict)
    # A stack (`org/project/stack`) whose outputs name the network to use, instead of Sortie's defaults.
    network_stack: str | None = None
    # Which outputs of `network_stack` hold what (keys per cloud, e.g. `subnet`); unset keys use the cloud's default.
    network_outputs: Mapping[str, str] = field(default_factory=dict)
    # What the default firewall admits to the agent port; None: only the private network itself.
    controller_cidr: str | None = None
    agent_port: int = 8470
    # Kubernetes only (config `kubernetes:`): the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config) and
    # the namespace to use as is (default: a namespace per cluster, created and deleted with its stack).
    kubeconfig: str | None = None
    kube_namespace: str | None = None
    # Kubernetes: seconds `up` waits for each pod to be scheduled and ready before it fails (no capacity).
    kube_pod_timeout_s: int = 600
    # Kubernetes: the type of the Service that exposes `ports` on the head pod (config kubernetes.ports).
    kube_ports: str = "loadbalancer"
    ssh_public_key: str | None = None
    # The controller role only: what may reach its SSH port (the dashboard tunnel); nodes never open SSH.
    ssh_cidr: str | None = None
    # "node" (runs the node agent) or "controller" (runs the jobs controller; `token` then holds its secret
    # environment file, `controller_package` what it installs).
    role: str = "node"
    controller_package: str = "sortie"
    # A cloud node that does bucket work itself (COPY, MOUNT_CACHED, S3 MOUNT:
    # `python -m orchestrator.node.node_storage`) pip-installs this (with the s3 extra) into NODE_VENV at boot;
    # None: the agent only (stdlib).
    node_package: str | None = None
    # A cloud node that FUSE-mounts an S3 bucket (MOUNT) installs rclone and fuse3 at boot where it has apt-get
    # and lacks them (without them the mount step fails the task with the reason).
    node_fuse: bool = False
    # AWS: the IAM instance profile nodes get, their own identity for bucket work (issue 17: nodes never get the
    # controller's credentials); None: none attached by Sortie.
    instance_profile: str | None = None
    # AWS (issue 17): the S3 buckets the nodes read and write, as `s3://bucket[/prefix]` (the job's bucket mounts
    # and its part of the intermediate bucket). With no `instance_profile`, the builder makes a role and an
    # instance profile per cluster allowed s3:GetObject/PutObject on exactly those prefixes and s3:ListBucket on
    # exactly those buckets, destroyed with the stack; an explicit `instance_profile` wins (none is made).
    node_buckets: tuple[str, ...] = ()
    # For tags only.
    job_id: str | None = None
    attempt: str | None = None
    user: str | None = None


def cloud_fields(config: Any) -> dict[str, Any]:
    """ClusterSpec fields from the Sortie config's `cloud:` section (a SortieConfig; typed loosely so stack
    programs need not import the orchestrator)."""
    cloud = config.cloud
    return {"tags": dict(cloud.tags), "network_stack": cloud.network_stack,
            "network_outputs": dict(cloud.network_outputs), "controller_cidr": cloud.controller_cidr,
            "ssh_public_key": cloud.ssh_public_key, "instance_profile": getattr(cloud, "node_instance_profile", None),
            "kubeconfig": getattr(getattr(config, "kubernetes", None), "kubeconfig", None),
            "kube_namespace": getattr(getattr(config, "kubernetes", None), "namespace", None),
            "kube_pod_timeout_s": getattr(getattr(config, "kubernetes", None), "pod_timeout_s", 600),
            "kube_ports": getattr(getattr(config, "kubernetes", None), "ports", "loadbalancer"),
            "ports_cidr": getattr(cloud, "ports_cidr", None) or "0.0.0.0/0"}


@dataclass(frozen=True)
class StackProgram:
    """A program and its spec: what the driver hands to a worker process."""

    kind: ProgramKind
    spec: ClusterSpec
    pool: str | None = None
    worker_index: int | None = None

    def build(self) -> Callable[[], None]:
        """The inline Pulumi program (imports Pulumi; call it inside the worker process)."""
        if self.kind == "cluster":
            from stacks.cluster_program import cluster_program

            return lambda: cluster_program(self.spec)
        if self.kind == "controller":
            from stacks.controller_program import controller_program

            return lambda: controller_program(self.spec)
        from stacks.pool_program import pool_worker_program

        return lambda: pool_worker_program(self.spec, self.pool or "", self.worker_index or 0)
