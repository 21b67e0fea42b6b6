"""Azure nodes: one virtual machine per node, booted with the node agent (imports pulumi_azure_native).

Per node: a network interface and a `compute.VirtualMachine` (spot: `priority=Spot`,
`eviction_policy=Delete`, pay up to the on-demand price: `billing_profile.max_price=-1`), an OS disk
of `disk_size` GB, and the agent's boot script as base64 `custom_data` (cloud-init), a secret
Output since it holds the token. Logins: `ssh_public_key` if given, else a key derived from the
token (Azure wants one; passwords stay off), for the admin user `sortie`.

Network: by default one resource group per cluster holding a virtual network, a subnet, a network
security group admitting the agent port from `controller_cidr` (else from the `VirtualNetwork`
service tag only) and nothing else inbound, and a public IP per node (for outbound traffic). With
`network_stack`, the resource group and subnet come from that stack's outputs (`resourceGroupName`,
`subnetId`); Sortie then makes neither a network nor a security group nor public IPs.
"""

from __future__ import annotations

import base64
import hashlib

import pulumi
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pulumi_azure_native import compute, network, resources

from orchestrator.errors import UsageError
from orchestrator.policy.cloud_features import disk_settings
from stacks.builders import (
    DEFAULT_DISK_GB,
    BuiltNode,
    CloudNode,
    accelerator,
    agent_url,
    dns_label,
    inbound_rules,
    location,
    merge_opts,
    network_output_names,
    secret_boot_script,
    sortie_tags,
)
from stacks.spec import ClusterSpec

DEFAULT_VM_SIZE = "Standard_D4s_v5"
ADMIN_USER = "sortie"
NETWORK_OUTPUTS = {"resource_group": "resourceGroupName", "subnet": "subnetId"}
VNET_RANGE = "10.80.0.0/16"
SUBNET_RANGE = "10.80.0.0/20"
CUSTOM_DATA_LIMIT = 64 * 1024  # base64 characters Azure takes
CPU_IMAGE = {"publisher": "Canonical", "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts-gen2",
             "version": "latest"}
GPU_IMAGE = {"publisher": "microsoft-dsvm", "offer": "ubuntu-hpc", "sku": "2204", "version": "latest"}
GPU_VM_SIZES: dict[str, dict[int, str]] = {
    "T4": {1: "Standard_NC4as_T4_v3", 4: "Standard_NC64as_T4_v3"},
    "V100": {1: "Standard_NC6s_v3", 2: "Standard_NC12s_v3", 4: "Standard_NC24s_v3"},
    "A100": {1: "Standard_NC24ads_A100_v4", 2: "Standard_NC48ads_A100_v4", 4: "Standard_NC96ads_A100_v4",
             8: "Standard_ND96asr_v4"},
    "A100-80GB": {8: "Standard_ND96amsr_A100_v4"},
    "H100": {1: "Standard_NC40ads_H100_v5", 2: "Standard_NC80adis_H100_v5", 8: "Standard_ND96isr_H100_v5"},
}


def vm_size(spec: ClusterSpec) -> str:
    if spec.instance_type:
        return spec.instance_type
    acc = accelerator(spec)
    if acc is None:
        return DEFAULT_VM_SIZE
    name, count = acc
    found = GPU_VM_SIZES.get(name.upper(), {}).get(count)
    if found is None:
        raise UsageError(f"cluster {spec.name}: no default Azure VM size for {name}:{count}; set instance_type")
    return found


def image_reference(spec: ClusterSpec) -> dict[str, str]:
    """`spec.image` as `publisher:offer:sku:version` or a resource id (`/subscriptions/...`), else a default."""
    if not spec.image:
        return GPU_IMAGE if accelerator(spec) else CPU_IMAGE
    if spec.image.startswith("/"):
        return {"id": spec.image}
    parts = spec.image.split(":")
    if len(parts) != 4:
        raise UsageError(f"cluster {spec.name}: Azure image {spec.image!r} is neither publisher:offer:sku:version "
                         "nor a resource id")
    return dict(zip(("publisher", "offer", "sku", "version"), parts, strict=True))


def admin_public_key(spec: ClusterSpec) -> str:
    """The admin's SSH key: the spec's, else an Ed25519 key derived from the token (no one logs in with it
    who does not hold the token, and it is the same at every `up`, so it never forces a new VM)."""
    if spec.ssh_public_key:
        return spec.ssh_public_key.strip()
    seed = hashlib.sha256(f"sortie-azure-admin\0{spec.token}".encode()).digest()
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def custom_data(script: str) -> str:
    encoded = base64.b64encode(script.encode()).decode()
    if len(encoded) > CUSTOM_DATA_LIMIT:
        raise UsageError(f"the node boot script is {len(encoded)} base64 characters; Azure takes {CUSTOM_DATA_LIMIT}")
    return encoded


def _security_rules(spec: ClusterSpec) -> list[dict[str, object]]:
    """`inbound_rules` as a network security group's rules: the agent (100), SSH (110), then the ports (200 on)."""
    found: list[dict[str, object]] = []
    named = {"agent": ("sortie-agent", 100), "ssh": ("sortie-controller-ssh", 110)}
    ports = 0
    for rule in inbound_rules(spec):
        if rule.kind == "ports":
            name, priority = f"sortie-port-{rule.low}-{rule.high}", 200 + ports
            source = "*" if rule.source == "0.0.0.0/0" else rule.source
            ports += 1
        else:
            (name, priority), source = named[rule.kind], rule.source or "VirtualNetwork"
        found.append({"name": name, "priority": priority, "direction": "Inbound", "access": "Allow",
                      "protocol": "Tcp", "source_port_range": "*", "destination_port_range": rule.port_range,
                      "source_address_prefix": source, "destination_address_prefix": "*",
                      "description": rule.description})
    return found


def build_azure_nodes(spec: ClusterSpec, opts: pulumi.ResourceOptions | None = None) -> list[BuiltNode]:
    region, zone = location(spec, "azure")
    size = vm_size(spec)
    tags = sortie_tags(spec)
    base = merge_opts(opts)
    public_ips = not spec.network_stack
    if spec.network_stack:
        names = network_output_names(spec, NETWORK_OUTPUTS)
        ref = pulumi.StackReference(f"{spec.name}-network", stack_name=spec.network_stack, opts=base)
        group_name: pulumi.Input[str] = ref.require_output(names["resource_group"])
        subnet_id: pulumi.Input[str] = ref.require_output(names["subnet"])
    else:
        group = resources.ResourceGroup(f"{spec.name}-rg", location=region, tags=tags, opts=base)
        group_name = group.name
        nsg = network.NetworkSecurityGroup(
            f"{spec.name}-nsg", resource_group_name=group_name, location=region, tags=tags, opts=base,
            security_rules=_security_rules(spec),
        )
        vnet = network.VirtualNetwork(f"{spec.name}-vnet", resource_group_name=group_name, location=region,
                                      address_space={"address_prefixes": [VNET_RANGE]}, tags=tags, opts=base)
        subnet = network.Subnet(f"{spec.name}-subnet", resource_group_name=group_name,
                                virtual_network_name=vnet.name, address_prefix=SUBNET_RANGE,
                                network_security_group={"id": nsg.id}, opts=base)
        subnet_id = subnet.id
    image = image_reference(spec)
    key = admin_public_key(spec)
    nodes: list[BuiltNode] = []
    for rank in range(spec.num_nodes):
        name = f"{spec.name}-node-{rank}"
        node_tags = {**tags, "sortie-rank": str(rank)}
        ip_config: dict[str, object] = {"name": "primary", "primary": True, "subnet": {"id": subnet_id},
                                        "private_ip_allocation_method": "Dynamic"}
        if public_ips:
            public_ip = network.PublicIPAddress(
                f"{name}-ip", resource_group_name=group_name, location=region, sku={"name": "Standard"},
                public_ip_allocation_method="Static", zones=[zone] if zone else None, tags=node_tags, opts=base)
            ip_config["public_ip_address"] = {"id": public_ip.id}
            address: pulumi.Output[str | None] | None = public_ip.ip_address
        else:
            address = None
        nic = network.NetworkInterface(f"{name}-nic", resource_group_name=group_name, location=region,
                                       ip_configurations=[ip_config], tags=node_tags, opts=base,
                                       enable_accelerated_networking=spec.network_tier == "best" or None)
        spot = ({"priority": "Spot", "eviction_policy": "Delete", "billing_profile": {"max_price": -1}}
                if spec.use_spot else {"priority": "Regular"})
        vm = compute.VirtualMachine(
            name, resource_group_name=group_name, location=region, zones=[zone] if zone else None,
            hardware_profile={"vm_size": size},
            network_profile={"network_interfaces": [{"id": nic.id, "primary": True}]},
            os_profile={
                "computer_name": dns_label(f"{spec.name}-{rank}"), "admin_username": ADMIN_USER,
                "custom_data": secret_boot_script(spec, rank).apply(custom_data),
                "linux_configuration": {"disable_password_authentication": True, "ssh": {"public_keys": [
                    {"path": f"/home/{ADMIN_USER}/.ssh/authorized_keys", "key_data": key}]}},
            },
            storage_profile={
                "image_reference": image,
                "os_disk": {"create_option": "FromImage", "delete_option": "Delete",
                            "disk_size_gb": spec.disk_size or DEFAULT_DISK_GB,
                            "managed_disk": disk_settings("azure", spec.disk_tier, spec.disk_size or 0)
                            or {"storage_account_type": "Premium_LRS"}},
            },
            tags=node_tags,
            # The agent a node booted with stays until the node goes (Azure cannot change custom data).
            opts=merge_opts(base, additional_secret_outputs=["osProfile"], ignore_changes=["osProfile.customData"]),
            **spot,
        )
        ip = nic.ip_configurations.apply(lambda configs: configs[0].private_ip_address if configs else None)
        nodes.append(CloudNode(
            rank=rank, node_id=vm.vm_id, host=ip, ip=ip, url=agent_url(ip, spec.agent_port),
            region=pulumi.Output.from_input(region) if region else vm.location,
            zone=pulumi.Output.from_input(zone), instance_type=pulumi.Output.from_input(size), spot=spec.use_spot,
            public_ip=address, ssh_user=ADMIN_USER,
        ))
    return nodes
