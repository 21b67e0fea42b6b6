"""GCP nodes: one Compute Engine instance per node, booted with the node agent (imports pulumi_gcp).

Per node: a `gcp.compute.Instance` (spot: `provisioning_model=SPOT`, preemptible, deleted when
reclaimed, so a reclaimed node reads as gone), a boot disk of `disk_size` GB, GPUs as guest
accelerators (which need `on_host_maintenance=TERMINATE`), and the agent's boot script as the
`startup-script` metadata value, a secret Output since it holds the token. Labels follow GCP's
rules (lowercase, `[a-z0-9_-]`, 63 characters).

Network: by default the project's `default` network with an ephemeral external IP per node (for
outbound traffic) and one firewall rule per cluster admitting the agent port from `controller_cidr`
(else from the default network's internal range, 10.128.0.0/9) to the cluster's network tag. With
`network_stack`, network and subnetwork come from that stack's outputs (`network`, `subnetwork`),
nodes get no external IP and Sortie makes no firewall rule.
"""

from __future__ import annotations

import re

import pulumi
import pulumi_gcp as gcp

from orchestrator.errors import UsageError
from orchestrator.policy.cloud_features import disk_settings
from stacks.builders import (
    DEFAULT_DISK_GB,
    SSH_PORT,
    BuiltNode,
    CloudNode,
    accelerator,
    agent_url,
    dns_label,
    location,
    merge_opts,
    network_output_names,
    secret_boot_script,
    sortie_tags,
    ssh_source,
)
from stacks.spec import ClusterSpec

DEFAULT_MACHINE_TYPE = "n2-standard-4"
DEFAULT_NETWORK = "default"
SSH_USER = "sortie"  # the login of `ssh-keys` metadata
DEFAULT_INTERNAL_RANGE = "10.128.0.0/9"  # the subnets of an auto-mode network such as `default`
NETWORK_OUTPUTS = {"network": "network", "subnetwork": "subnetwork"}
CPU_IMAGE = "ubuntu-os-cloud/ubuntu-2204-lts"
GPU_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-nvidia-570"
# accelerator -> (GCP accelerator type, machine type per count); N1 machines take T4/V100/P100/P4.
GPUS: dict[str, tuple[str, dict[int, str]]] = {
    "T4": ("nvidia-tesla-t4", {1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32"}),
    "V100": ("nvidia-tesla-v100", {1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32", 8: "n1-standard-64"}),
    "P100": ("nvidia-tesla-p100", {1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32"}),
    "P4": ("nvidia-tesla-p4", {1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32"}),
    "L4": ("nvidia-l4", {1: "g2-standard-4", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"}),
    "A100": ("nvidia-tesla-a100", {n: f"a2-highgpu-{n}g" for n in (1, 2, 4, 8)}),
    "A100-80GB": ("nvidia-a100-80gb", {n: f"a2-ultragpu-{n}g" for n in (1, 2, 4, 8)}),
    "H100": ("nvidia-h100-80gb", {n: f"a3-highgpu-{n}g" for n in (1, 2, 4, 8)}),
    "H200": ("nvidia-h200-141gb", {8: "a3-ultragpu-8g"}),
    "B200": ("nvidia-b200", {8: "a4-highgpu-8g"}),
}


def machine(spec: ClusterSpec) -> tuple[str, list[dict[str, object]]]:
    """(machine type, guest accelerators) of the spec's nodes."""
    acc = accelerator(spec)
    if acc is None:
        return spec.instance_type or DEFAULT_MACHINE_TYPE, []
    name, count = acc
    gpu_type, machines = GPUS.get(name.upper(), (name.lower(), {}))
    machine_type = spec.instance_type or machines.get(count)
    if machine_type is None:
        raise UsageError(f"cluster {spec.name}: no default GCP machine type for {name}:{count}; set instance_type")
    return machine_type, [{"type": gpu_type, "count": count}]


def gcp_labels(tags: dict[str, str]) -> dict[str, str]:
    """Tags as GCP labels: lowercase keys (starting with a letter) and values of `[a-z0-9_-]`, 63 at most."""
    labels: dict[str, str] = {}
    for key, value in tags.items():
        k = re.sub(r"[^a-z0-9_-]", "_", key.lower())[:63]
        if not k or not k[0].isalpha():
            k = f"k_{k}"[:63]
        labels[k] = re.sub(r"[^a-z0-9_-]", "_", value.lower())[:63]
    return labels


def build_gcp_nodes(spec: ClusterSpec, opts: pulumi.ResourceOptions | None = None) -> list[BuiltNode]:
    region, zone = location(spec, "gcp")
    machine_type, gpus = ("", []) if tpu_type(spec) else machine(spec)
    labels = gcp_labels(sortie_tags(spec))
    base = merge_opts(opts)
    zone_in: pulumi.Input[str] | None = zone
    if zone is None and region:
        zones = gcp.compute.get_zones_output(region=region, status="UP", opts=pulumi.InvokeOptions(parent=base.parent))
        zone_in = zones.names.apply(lambda names: sorted(names)[0])
    net_tag = dns_label(f"sortie-{spec.name}")
    network: pulumi.Input[str] = DEFAULT_NETWORK
    subnetwork: pulumi.Input[str] | None = None
    if spec.network_stack:
        names = network_output_names(spec, NETWORK_OUTPUTS)
        ref = pulumi.StackReference(f"{spec.name}-network", stack_name=spec.network_stack, opts=base)
        network = ref.require_output(names["network"])
        subnetwork = ref.require_output(names["subnetwork"])
    else:
        gcp.compute.Firewall(
            dns_label(f"{spec.name}-agent"), network=DEFAULT_NETWORK, direction="INGRESS",
            description=f"Sortie cluster {spec.name}: the node agent port only",
            allows=[{"protocol": "tcp", "ports": [str(spec.agent_port)]}],
            source_ranges=[spec.controller_cidr or DEFAULT_INTERNAL_RANGE], target_tags=[net_tag], opts=base,
        )
        if ssh_cidr := ssh_source(spec):
            gcp.compute.Firewall(
                dns_label(f"{spec.name}-ssh"), network=DEFAULT_NETWORK, direction="INGRESS",
                description=f"Sortie controller {spec.name}: SSH (the dashboard tunnel)",
                allows=[{"protocol": "tcp", "ports": [str(SSH_PORT)]}],
                source_ranges=[ssh_cidr], target_tags=[net_tag], opts=base,
            )
    if spec.ports:
        gcp.compute.Firewall(
            dns_label(f"{spec.name}-ports"), network=network, direction="INGRESS",
            description=f"Sortie cluster {spec.name}: the task's ports",
            allows=[{"protocol": "tcp", "ports": [str(p) for p in spec.ports]}],
            source_ranges=[spec.ports_cidr], target_tags=[net_tag], opts=base,
        )
    if tpu_type(spec):
        return _tpu_nodes(spec, region, zone_in, network, subnetwork, labels, net_tag, base)
    on_maintenance = "TERMINATE" if gpus else "MIGRATE"
    scheduling = ({"provisioning_model": "SPOT", "preemptible": True, "automatic_restart": False,
                   "on_host_maintenance": "TERMINATE", "instance_termination_action": "DELETE"}
                  if spec.use_spot else
                  {"provisioning_model": "STANDARD", "preemptible": False, "automatic_restart": True,
                   "on_host_maintenance": on_maintenance})
    image = spec.image or (GPU_IMAGE if gpus else CPU_IMAGE)
    disk_type = (disk_settings("gcp", spec.disk_tier, spec.disk_size or DEFAULT_DISK_GB) or {}).get("type",
                                                                                                   "pd-balanced")
    nodes: list[BuiltNode] = []
    for rank in range(spec.num_nodes):
        metadata: dict[str, pulumi.Input[str]] = {"startup-script": secret_boot_script(spec, rank)}
        if spec.ssh_public_key:
            metadata["ssh-keys"] = f"{SSH_USER}:{spec.ssh_public_key.strip()}"
        interface: dict[str, object] = {"network": network}
        if spec.network_tier == "best":
            interface["nic_type"] = "GVNIC"
        if subnetwork is not None:
            interface["subnetwork"] = subnetwork
        else:
            interface["access_configs"] = [{}]
        instance = gcp.compute.Instance(
            dns_label(f"{spec.name}-node-{rank}"),
            machine_type=machine_type, zone=zone_in,
            boot_disk={"auto_delete": True,
                       "initialize_params": {"image": image, "size": spec.disk_size or DEFAULT_DISK_GB,
                                             "type": disk_type, "labels": labels}},
            network_interfaces=[interface], scheduling=scheduling, guest_accelerators=gpus or None,
            metadata=metadata, labels={**labels, "sortie-rank": str(rank)}, tags=[net_tag],
            allow_stopping_for_update=True,
            opts=merge_opts(base, additional_secret_outputs=["metadata", "metadataStartupScript"]),
        )
        ip = instance.network_interfaces.apply(lambda nics: nics[0].network_ip)
        node_zone = instance.zone
        nodes.append(CloudNode(
            rank=rank, node_id=instance.instance_id, host=ip, ip=ip, url=agent_url(ip, spec.agent_port),
            region=pulumi.Output.from_input(region) if region else node_zone.apply(lambda z: z.rsplit("-", 1)[0]),
            zone=node_zone, instance_type=pulumi.Output.from_input(machine_type), spot=spec.use_spot,
            public_ip=instance.network_interfaces.apply(_nat_ip), ssh_user=SSH_USER,
        ))
    return nodes


def _nat_ip(nics: list) -> str | None:
    """The first interface's external address, if it has one (the default network's nodes do)."""
    configs = (nics[0].access_configs if nics else None) or []
    return (configs[0].nat_ip or None) if configs else None


# SkyPilot's TPU names (tpu-v5e-8) -> GCP accelerator types; v5e is "v5litepod" in GCP's API.
_TPU_GENERATIONS = {"v5e": "v5litepod", "v6e": "v6e", "v5p": "v5p", "v4": "v4", "v3": "v3", "v2": "v2"}
DEFAULT_TPU_RUNTIME = {"v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e",
                       "v4": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v2": "tpu-ubuntu2204-base"}


def tpu_type(spec: ClusterSpec) -> str | None:
    """The GCP accelerator type of a `tpu-...` accelerator (tpu-v5e-8 -> v5litepod-8), else None."""
    name = next((n for n in spec.accelerators if n.lower().startswith("tpu-")), None)
    if name is None:
        return None
    generation, _, cores = name.lower().removeprefix("tpu-").partition("-")
    return f"{_TPU_GENERATIONS.get(generation, generation)}-{cores}" if cores else None


def _tpu_nodes(spec: ClusterSpec, region: str | None, zone: pulumi.Input[str] | None, network: pulumi.Input[str],
               subnetwork: pulumi.Input[str] | None, labels: dict[str, str], net_tag: str,
               base: pulumi.ResourceOptions) -> list[BuiltNode]:
    """A TPU VM per node (`accelerator_args`: runtime_version), booted with the node agent."""
    accelerator_type = tpu_type(spec) or ""
    args = dict(spec.accelerator_args)
    if args.get("tpu_vm") is False:
        raise UsageError(f"cluster {spec.name}: TPU nodes (tpu_vm: false) are not supported yet; use a TPU VM")
    runtime = args.get("runtime_version") or DEFAULT_TPU_RUNTIME.get(accelerator_type.split("-")[0],
                                                                      "tpu-ubuntu2204-base")
    nodes: list[BuiltNode] = []
    for rank in range(spec.num_nodes):
        network_config: dict[str, object] = {"network": network, "enable_external_ips": subnetwork is None}
        if subnetwork is not None:
            network_config["subnetwork"] = subnetwork
        vm_name = dns_label(f"{spec.name}-tpu-{rank}")
        vm = gcp.tpu.V2Vm(
            vm_name, name=vm_name, zone=zone, accelerator_type=accelerator_type,
            runtime_version=runtime, network_config=network_config, tags=[net_tag],
            labels={**labels, "sortie-rank": str(rank)},
            metadata={"startup-script": secret_boot_script(spec, rank)},
            scheduling_config={"spot": True} if spec.use_spot else None,
            opts=merge_opts(base, additional_secret_outputs=["metadata"]),
        )
        ip = vm.network_endpoints.apply(lambda eps: eps[0].ip_address if eps else None)
        nodes.append(CloudNode(
            rank=rank, node_id=vm.name, host=ip, ip=ip, url=agent_url(ip, spec.agent_port),
            region=pulumi.Output.from_input(region) if region else vm.zone.apply(lambda z: z.rsplit("-", 1)[0]),
            zone=vm.zone, instance_type=pulumi.Output.from_input(accelerator_type), spot=spec.use_spot,
            public_ip=vm.network_endpoints.apply(
                lambda eps: (eps[0].access_configs[0].external_ip if eps and eps[0].access_configs else None)),
            ssh_user=SSH_USER,
        ))
    return nodes
