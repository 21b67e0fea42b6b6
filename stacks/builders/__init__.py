"""Per-infra node builders behind one signature: `build(spec, opts=None) -> list[BuiltNode]`.

A builder declares the Pulumi resources of `spec.num_nodes` nodes and returns, per node, the
outputs the cluster program exports. `opts` (optional) holds the options every resource it makes
starts from, e.g. `parent=` when a `SortieCluster` component calls it.

Cloud builders (aws, gcp, azure, kubernetes) load lazily: this module imports no provider SDK;
`builder_for("aws")` imports `stacks.builders.aws` (and with it `pulumi_aws`) then. What they share
lives here: the tags every resource carries, where a node is, and the boot script that installs the
node agent.
"""

from __future__ import annotations

import importlib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pulumi

from orchestrator.errors import UsageError
from orchestrator.infra.agent_bundle import UNPACK_AGENT
from stacks.spec import ClusterSpec

# Where the controller VM's dashboard listens, on its loopback (the SSH tunnel's far end).
REMOTE_DASHBOARD_PORT = 8765
SSH_PORT = 22


@dataclass(frozen=True)
class BuiltNode:
    """Outputs of one node, as every builder reports them."""

    rank: int
    node_id: pulumi.Output[str]
    host: pulumi.Output[str]
    ip: pulumi.Output[str]
    url: pulumi.Output[str]
    region: pulumi.Output[str | None]  # None: a Kubernetes cluster reached through the default context

    def export(self) -> dict[str, object]:
        return {"rank": self.rank, "node_id": self.node_id, "host": self.host, "ip": self.ip,
                "url": self.url, "region": self.region}


@dataclass(frozen=True)
class CloudNode(BuiltNode):
    """A cloud node: also where it is, what it is, and whether it is spot capacity."""

    zone: pulumi.Output[str | None]
    instance_type: pulumi.Output[str | None]
    spot: bool
    # Where SSH reaches it from outside its network (None: no public address), and as whom.
    public_ip: pulumi.Output[str | None] | None = None
    ssh_user: str | None = None
    # Where the task's `ports` are reached when that is not `<public_ip or ip>:<port>` (a Kubernetes Service):
    # {"8080": "host:port"}; exported only when set.
    endpoints: pulumi.Output[dict[str, str]] | None = None

    def export(self) -> dict[str, object]:
        out = {**super().export(), "zone": self.zone, "instance_type": self.instance_type, "spot": self.spot,
               "public_ip": self.public_ip, "ssh_user": self.ssh_user, "ssh_port": SSH_PORT}
        if self.endpoints is not None:
            out["endpoints"] = self.endpoints
        return out


class NodeBuilder(Protocol):
    def __call__(self, spec: ClusterSpec, opts: pulumi.ResourceOptions | None = None) -> list[BuiltNode]: ...


def _local(spec: ClusterSpec, opts: pulumi.ResourceOptions | None = None) -> list[BuiltNode]:
    # The local builder takes no options: its nodes stay where they are (no parent), so the URNs of
    # existing local stacks never change.
    from stacks.builders.local import build_local_nodes

    return build_local_nodes(spec)


@dataclass(frozen=True)
class LazyBuilder:
    """A builder in a module imported only when first needed (it imports its cloud's SDK)."""

    module: str
    function: str
    extra: str  # the `sortie[...]` extra that installs the SDK

    def load(self) -> NodeBuilder:
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not exc.name.startswith("pulumi_"):
                raise
            raise UsageError(f"infra {self.extra!r} needs the {exc.name} package: "
                             f"pip install 'sortie[{self.extra}]'") from None
        builder: NodeBuilder = getattr(module, self.function)
        return builder

    def __call__(self, spec: ClusterSpec, opts: pulumi.ResourceOptions | None = None) -> list[BuiltNode]:
        return self.load()(spec, opts)


BUILDERS: dict[str, NodeBuilder] = {
    "local": _local,
    "aws": LazyBuilder("stacks.builders.aws", "build_aws_nodes", "aws"),
    "gcp": LazyBuilder("stacks.builders.gcp", "build_gcp_nodes", "gcp"),
    "azure": LazyBuilder("stacks.builders.azure", "build_azure_nodes", "azure"),
    "kubernetes": LazyBuilder("stacks.builders.kubernetes", "build_kubernetes_nodes", "kubernetes"),
}
_ALIASES = {"k8s": "kubernetes"}


def builder_for(infra: str) -> NodeBuilder:
    cloud = infra.split("/", 1)[0]
    cloud = _ALIASES.get(cloud, cloud)
    try:
        builder = BUILDERS[cloud]
    except KeyError:
        known = ", ".join(sorted(BUILDERS))
        raise UsageError(f"infra {infra!r} has no stack builder yet (available: {known})") from None
    return builder.load() if isinstance(builder, LazyBuilder) else builder


# --- what cloud builders share -----------------------------------------------------------------------------------

DEFAULT_DISK_GB = 256
AGENT_DIR = "/opt/sortie"
AGENT_ZIPAPP = f"{AGENT_DIR}/agent.pyz"  # the node agent (orchestrator.infra.agent_bundle)
# Where a node that does bucket work has Sortie (`spec.node_package`); writable on every infra (a pod's volume).
NODE_VENV = "/var/lib/sortie/venv"
NODE_PYTHON = f"{NODE_VENV}/bin/python"
SANDBOX_DIR = "/var/lib/sortie/sandbox"
TOKEN_FILE = "/etc/sortie/token"
_HEREDOC_END = "SORTIE_AGENT_EOF"


def sortie_tags(spec: ClusterSpec) -> dict[str, str]:
    """Tags for every resource of the cluster: team tags, then the spec's labels, then Sortie's own
    (which win, so nothing can pass for, or hide, Sortie ownership)."""
    own = {"sortie": "owner", "sortie-cluster": spec.name}
    for key, value in (("sortie-job", spec.job_id), ("sortie-attempt", spec.attempt), ("sortie-user", spec.user)):
        if value:
            own[key] = str(value)
    return {**{str(k): str(v) for k, v in spec.tags.items()}, **{str(k): str(v) for k, v in spec.labels.items()},
            **own}


def location(spec: ClusterSpec, cloud: str) -> tuple[str | None, str | None]:
    """(region, zone) of the spec; `region` may also be an infra string like `aws/us-east-1/us-east-1a`."""
    region, zone = spec.region, spec.zone
    if region and "/" in region and cloud != "kubernetes":
        parts = region.split("/")
        if parts[0] in (cloud, *(k for k, v in _ALIASES.items() if v == cloud)):
            parts = parts[1:]
        region = parts[0] if parts and parts[0] not in ("", "*") else None
        if len(parts) > 1 and parts[1] not in ("", "*"):
            zone = zone or parts[1]
    elif region and cloud == "kubernetes" and region.startswith(("kubernetes/", "k8s/")):
        region = region.split("/", 1)[1] or None
    return region or None, zone or None


def network_output_names(spec: ClusterSpec, defaults: Mapping[str, str]) -> dict[str, str]:
    """Which outputs of the network stack to read: the cloud's defaults, overridden per key by the spec."""
    unknown = sorted(set(spec.network_outputs) - set(defaults))
    if unknown:
        raise UsageError(f"cluster {spec.name}: unknown network output keys {unknown} "
                         f"(this cloud reads {sorted(defaults)})")
    return {**defaults, **spec.network_outputs}


def accelerator(spec: ClusterSpec) -> tuple[str, int] | None:
    """The one accelerator kind a node has, if any (clouds attach one kind per node)."""
    wanted = [(name, int(count)) for name, count in spec.accelerators.items() if int(count) > 0]
    if len(wanted) > 1:
        raise UsageError(f"cluster {spec.name}: one accelerator kind per node, got {dict(spec.accelerators)}")
    return wanted[0] if wanted else None


def dns_label(text: str, limit: int = 63) -> str:
    """`text` as a lowercase RFC 1123 label (names of GCP and Kubernetes resources)."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = f"s-{label}".rstrip("-")
    return label[:limit].rstrip("-")


def agent_source() -> str:
    """The node agent, packed now (at program time) to ship in the node's boot script: its zipapp, bzip2-compressed,
    as base64 lines (`orchestrator.infra.agent_bundle.packed_agent`)."""
    from orchestrator.infra.agent_bundle import packed_agent

    return packed_agent()


def agent_command(spec: ClusterSpec, node_id: str, *, token_stdin: bool) -> list[str]:
    """The agent's command line on a node."""
    command = ["python3", AGENT_ZIPAPP, "--sandbox", SANDBOX_DIR, "--host", "0.0.0.0",
               "--port", str(spec.agent_port), "--node-id", node_id]
    if spec.container_image and spec.infra.split("/", 1)[0] != "kubernetes":  # a pod's image is the task's own
        command += ["--container-image", spec.container_image, "--container-engine", "docker",
                    *[f"--container-option={option}" for option in spec.container_options]]
    command += notice_flags(spec)
    return [*command, "--token-stdin"] if token_stdin else command


def notice_flags(spec: ClusterSpec) -> list[str]:
    """The agent watches for its cloud's preemption notice (issue 24): a spot VM's metadata; a pod's SIGTERM (the
    pod's default termination grace period, 30 s)."""
    from orchestrator.infra.agent_bundle import AGENT_MODULES

    cloud = spec.infra.split("/", 1)[0]
    if "notices" not in AGENT_MODULES:  # not in the zipapp yet (EC2's user data): the flag would be ignored
        return []
    if cloud == "kubernetes":
        return ["--notices", "kubernetes", "--notice-grace", "30"]
    return ["--notices", cloud] if spec.use_spot and cloud in ("aws", "gcp", "azure") else []


def container_engine_install(spec: ClusterSpec) -> str:
    """Shell lines that make sure a cloud node has docker for its task's container (the clouds' GPU images ship
    it with the NVIDIA container toolkit; a plain image gets Debian/Ubuntu's docker.io)."""
    if not spec.container_image:
        return ""
    return ("command -v docker >/dev/null || { command -v apt-get >/dev/null && apt-get update -y "
            "&& apt-get install -y docker.io; } || true\n"
            "systemctl start docker 2>/dev/null || true\n")


def node_package_install(spec: ClusterSpec) -> str:
    """Shell lines that install `spec.node_package[s3]` into NODE_VENV once (nothing without one): what a node
    needs to run its bucket steps (`python -m orchestrator.node.node_storage`); with `spec.node_fuse`, rclone and fuse3
    for its S3 MOUNTs too (from apt, where it has apt-get; a failure here is reported by the mount step)."""
    if not spec.node_package:
        return ""
    package = shlex.quote(f"{spec.node_package}[s3]")
    fuse = ("command -v rclone >/dev/null || { command -v apt-get >/dev/null && apt-get update -y "
            "&& apt-get install -y rclone fuse3; } || true\n") if spec.node_fuse else ""
    venv = (f"if [ ! -x {NODE_PYTHON} ]; then\n"
            f"  python3 -m venv {NODE_VENV} 2>/dev/null || {{ (command -v apt-get >/dev/null && apt-get update -y "
            f"&& apt-get install -y python3-venv) || true; python3 -m venv {NODE_VENV}; }}\n"
            f"  {NODE_VENV}/bin/pip install --quiet {package}\n"
            "fi\n")
    return fuse + venv


def boot_script(spec: ClusterSpec, rank: int, token: str, source: str) -> str:
    """A boot script (cloud-init user-data / startup script) that installs the agent as a systemd
    service reading its token, from a root-only file, on stdin. It holds the token: only ever build
    it inside an `apply` on a secret Output, so what carries it stays secret."""
    command = " ".join(shlex.quote(part) for part in agent_command(spec, f"{spec.name}-{rank}", token_stdin=True))
    installs = node_package_install(spec) + container_engine_install(spec)
    return f"""#!/bin/bash
# Sortie node bootstrap: the node agent as a systemd service (runs at every boot; idempotent).
set -euo pipefail
umask 077
mkdir -p {AGENT_DIR} {SANDBOX_DIR} {Path(TOKEN_FILE).parent}
{UNPACK_AGENT} > {AGENT_ZIPAPP} <<'{_HEREDOC_END}'
{source.rstrip()}
{_HEREDOC_END}
printf '%s\\n' {shlex.quote(token)} > {TOKEN_FILE}
{installs}cat > /etc/systemd/system/sortie-agent.service <<'SORTIE_UNIT_EOF'
[Unit]
Description=Sortie node agent
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/bin/env {command}
StandardInput=file:{TOKEN_FILE}
Environment=HOME=/root
Restart=on-failure
RestartSec=2
# Runs live in their own process groups and outlive an agent restart, as their state on disk does.
KillMode=process

[Install]
WantedBy=multi-user.target
SORTIE_UNIT_EOF
systemctl daemon-reload
systemctl enable sortie-agent.service
systemctl restart sortie-agent.service
"""


def ssh_source(spec: ClusterSpec) -> str | None:
    """What the default firewall admits to SSH: `spec.ssh_cidr` on the controller VM (the dashboard tunnel);
    nothing on nodes (the controller reaches their agents over the private network)."""
    return (spec.ssh_cidr or "0.0.0.0/0") if spec.role == "controller" else None


@dataclass(frozen=True)
class Inbound:
    """One inbound rule of a cluster's default network, said once for every cloud; each builder writes it in its
    cloud's form (a security group's ingress, a network security group's rule)."""

    kind: str  # "agent", "ssh" or "ports"
    low: int
    high: int
    source: str | None  # a CIDR; None: the cloud's own private network (the VPC, the VirtualNetwork)
    description: str

    @property
    def port_range(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


def inbound_rules(spec: ClusterSpec) -> list[Inbound]:
    """What reaches a node: the agent's port from the controller (`controller_cidr`, else the private network),
    SSH on a controller VM (`ssh_source`), and the task's ports from `ports_cidr`."""
    from orchestrator.policy.cloud_features import port_ranges

    rules = [Inbound("agent", spec.agent_port, spec.agent_port, spec.controller_cidr or None,
                     "Sortie controller to node agent")]
    if ssh_cidr := ssh_source(spec):
        rules.append(Inbound("ssh", SSH_PORT, SSH_PORT, ssh_cidr,
                             "SSH to the Sortie controller (the dashboard tunnel)"))
    rules += [Inbound("ports", low, high, spec.ports_cidr, "the task's ports") for low, high in port_ranges(spec.ports)]
    return rules


def controller_boot_script(spec: ClusterSpec, secret_env: str) -> str:
    """The boot script of a jobs controller VM: Sortie installed in a venv, its secret environment (the shared
    state DB URL, the config) in a root-only file, the controller daemon and the dashboard (on loopback) as
    systemd services."""
    extras = ",".join(["postgres", "dashboard", spec.infra]) if spec.infra != "local" else "postgres,dashboard"
    package = f"{spec.controller_package}[{extras}]"
    return f"""#!/bin/bash
# Sortie jobs controller bootstrap (runs at every boot; idempotent).
set -euo pipefail
umask 077
mkdir -p /etc/sortie /var/lib/sortie
cat > /etc/sortie/controller.env <<'{_HEREDOC_END}'
{secret_env.rstrip()}
{_HEREDOC_END}
if [ ! -x /opt/sortie/venv/bin/sortie ]; then
  (command -v apt-get >/dev/null && apt-get update -y && apt-get install -y python3-venv) || true
  python3 -m venv /opt/sortie/venv
  /opt/sortie/venv/bin/pip install --quiet {shlex.quote(package)}
fi
set -a; . /etc/sortie/controller.env; set +a
if [ -n "${{SORTIE_CONFIG_B64:-}}" ]; then
  printf '%s' "$SORTIE_CONFIG_B64" | base64 -d > /var/lib/sortie/config.yaml
fi
SORTIE_HOME=/var/lib/sortie /opt/sortie/venv/bin/sortie engine install
cat > /etc/systemd/system/sortie-controller.service <<'SORTIE_UNIT_EOF'
[Unit]
Description=Sortie jobs controller
Wants=network-online.target
After=network-online.target

[Service]
EnvironmentFile=/etc/sortie/controller.env
Environment=SORTIE_HOME=/var/lib/sortie
ExecStart=/opt/sortie/venv/bin/python -m orchestrator.controller.daemon
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
SORTIE_UNIT_EOF
cat > /etc/systemd/system/sortie-dashboard.service <<'SORTIE_UNIT_EOF'
[Unit]
Description=Sortie dashboard (loopback only; `sortie dashboard` reaches it through an SSH tunnel)
After=sortie-controller.service

[Service]
EnvironmentFile=/etc/sortie/controller.env
Environment=SORTIE_HOME=/var/lib/sortie
ExecStart=/opt/sortie/venv/bin/python -m orchestrator.dashboard.server --host 127.0.0.1 --port {REMOTE_DASHBOARD_PORT}
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
SORTIE_UNIT_EOF
systemctl daemon-reload
systemctl enable sortie-controller.service sortie-dashboard.service
systemctl restart sortie-controller.service sortie-dashboard.service
"""


def secret_boot_script(spec: ClusterSpec, rank: int) -> pulumi.Output[str]:
    """The boot script of node `rank` as a secret Output (the agent source is read now). A controller VM
    (`spec.role`) gets the controller's instead, with `spec.token` as its secret environment."""
    if spec.role == "controller":
        return pulumi.Output.secret(spec.token).apply(lambda env: controller_boot_script(spec, env))
    source = agent_source()
    return pulumi.Output.secret(spec.token).apply(lambda token: boot_script(spec, rank, token, source))


def merge_opts(opts: pulumi.ResourceOptions | None, **extra: Any) -> pulumi.ResourceOptions:
    """`opts` (a builder's caller's options) with `extra` on top."""
    return pulumi.ResourceOptions.merge(opts or pulumi.ResourceOptions(), pulumi.ResourceOptions(**extra))


def agent_url(ip: pulumi.Input[str], port: int) -> pulumi.Output[str]:
    return pulumi.Output.concat("http://", ip, f":{port}")
