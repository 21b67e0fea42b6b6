"""Helpers of the cloud builders' tests under `pulumi.runtime.set_mocks`: a mock monitor recording every resource
(`CloudMocks`), the `Harness` that runs a program under it (each test module's `harness` fixture), specs, and what
to look for in resource inputs (secrets, tags, the agent's zipapp)."""

from __future__ import annotations

import base64
import binascii
import gzip
from collections.abc import Callable
from typing import Any

import pulumi
import pytest

from orchestrator.infra.agent_bundle import packed_agent
from stacks.spec import ClusterSpec
from tests.support.pulumi_mocks import run_and_resolve

SECRET_SIG = "4dabf18193072939515e22adb298388d"  # Pulumi's marker of a secret value on the wire
TOKEN = "tok-" + "Q" * 40
TEAM_TAGS = {"team": "ml", "cost-center": "cc42"}
LABELS = {"sortie-job": "7"}
NETWORK_STACK = "acme/network/prod"
STACK_OUTPUTS = {
    "subnetId": "subnet-team", "securityGroupId": ["sg-team-a", "sg-team-b"],
    "network": "projects/p/global/networks/team", "subnetwork": "projects/p/regions/r/subnetworks/team",
    "resourceGroupName": "rg-team", "subnetId2": "subnet-other",
}
AGENT_SOURCE = packed_agent()  # the zipapp, bzip2-compressed, base64 lines

AWS_INSTANCE = "aws:ec2/instance:Instance"
AWS_SG = "aws:ec2/securityGroup:SecurityGroup"
GCP_INSTANCE = "gcp:compute/instance:Instance"
GCP_FIREWALL = "gcp:compute/firewall:Firewall"
AZ_VM = "azure-native:compute:VirtualMachine"
AZ_NIC = "azure-native:network:NetworkInterface"
K8S_POD = "kubernetes:core/v1:Pod"
K8S_SECRET = "kubernetes:core/v1:Secret"
K8S_CONFIGMAP = "kubernetes:core/v1:ConfigMap"
K8S_SERVICE = "kubernetes:core/v1:Service"
AZ_NSG = "azure-native:network:NetworkSecurityGroup"
AZ_PUBLIC_IP = "azure-native:network:PublicIPAddress"
STACK_REF = "pulumi:pulumi:StackReference"


def is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(SECRET_SIG) is not None and "value" in value


def reveal(value: Any) -> Any:
    """Inputs with every secret marker replaced by what it wraps."""
    if is_secret(value):
        return reveal(value["value"])
    if isinstance(value, dict):
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [reveal(v) for v in value]
    return value


def public(value: Any) -> Any:
    """Inputs with every secret removed: what the engine would store in clear."""
    if is_secret(value):
        return "<secret>"
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public(v) for v in value]
    return value


def strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def decodings(text: str) -> list[str]:
    """`text` and what it decodes to as base64 and gzip (how user data travels)."""
    found = [text]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return found
    try:
        found.append(gzip.decompress(raw).decode(errors="replace"))
    except (OSError, EOFError):
        found.append(raw.decode(errors="replace"))
    return found


def holds_token(value: Any) -> bool:
    return any(TOKEN in d for s in strings(value) for d in decodings(s))


class CloudMocks(pulumi.runtime.Mocks):
    """Records every registration; answers with the inputs plus what each cloud would compute."""

    def __init__(self) -> None:
        self.resources: list[tuple[str, str, dict[str, Any]]] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        inputs = dict(args.inputs)
        self.resources.append((args.typ, args.name, inputs))
        n = len(self.resources)
        outs: dict[str, Any] = {}
        if args.typ == AWS_INSTANCE:
            outs = {"privateIp": f"10.1.0.{n}", "publicIp": f"54.0.0.{n}",
                    "availabilityZone": inputs.get("availabilityZone") or "us-east-1b"}
            return f"i-{n:08x}", {**inputs, **outs}
        if args.typ == GCP_INSTANCE:
            nics = [{**nic, "networkIp": f"10.128.0.{n}",
                     "accessConfigs": [{**c, "natIp": f"34.0.0.{n}"} for c in nic.get("accessConfigs", [])]}
                    for nic in inputs.get("networkInterfaces", [])]
            return f"projects/p/zones/z/instances/{args.name}", {**inputs, "networkInterfaces": nics,
                                                                  "instanceId": f"{9000 + n}"}
        if args.typ == AZ_NIC:
            configs = [{**c, "privateIPAddress": f"10.80.0.{n}"} for c in inputs.get("ipConfigurations", [])]
            return f"/nic/{args.name}", {**inputs, "ipConfigurations": configs}
        if args.typ == AZ_PUBLIC_IP:
            return f"/ip/{args.name}", {**inputs, "ipAddress": f"20.0.0.{n}"}
        if args.typ == AZ_VM:
            return f"/vm/{args.name}", {**inputs, "vmId": f"vm-guid-{n}"}
        if args.typ == K8S_POD:
            # The provider names a pod without `metadata.name` `<resource name>-<8 random>`.
            metadata = {**inputs.get("metadata", {})}
            metadata.setdefault("name", f"{args.name}-0a1b2c3d")
            return f"default/{metadata['name']}", {**inputs, "metadata": metadata,
                                                    "status": {"podIP": f"10.244.0.{n}", "hostIP": f"192.168.0.{n}",
                                                               "phase": "Running"}}
        if args.typ == K8S_SERVICE and inputs.get("spec", {}).get("type") in ("NodePort", "LoadBalancer"):
            # The API server gives each port a node port; a load balancer controller gives an address.
            service = {**inputs["spec"], "ports": [{**port, "nodePort": 30000 + i}
                                                   for i, port in enumerate(inputs["spec"].get("ports", []))]}
            status = ({"loadBalancer": {"ingress": [{"ip": "203.0.113.50"}]}}
                      if service["type"] == "LoadBalancer" else {})
            return f"default/{args.name}", {**inputs, "spec": service, "status": status}
        if args.typ == STACK_REF:
            return inputs["name"], {**inputs, "outputs": STACK_OUTPUTS, "secretOutputNames": []}
        if "name" not in inputs and args.typ.startswith(("azure-native:", "gcp:")):
            outs["name"] = f"{args.name}-physical"
        return f"{args.name}-id", {**inputs, **outs}

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        self.calls.append((args.token, dict(args.args)))
        if args.token == "aws:ec2/getAmi:getAmi":
            return {"id": "ami-default", "name": "found"}
        if args.token == "aws:ec2/getVpc:getVpc":
            return {"id": "vpc-default", "cidrBlock": "172.31.0.0/16"}
        if args.token == "aws:ec2/getSubnet:getSubnet":
            return {"id": f"subnet-{args.args.get('availabilityZone')}"}
        if args.token == "gcp:compute/getZones:getZones":
            return {"names": ["us-central1-c", "us-central1-b"], "id": "zones"}
        return {}

    def of_type(self, typ: str) -> list[dict[str, Any]]:
        return [inputs for t, _n, inputs in sorted(self.resources, key=lambda r: r[1]) if t == typ]

    def types(self) -> set[str]:
        return {t for t, _n, _i in self.resources}


class Harness:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mocks = CloudMocks()
        pulumi.runtime.set_mocks(self.mocks, project="sortie", stack="test", preview=False)
        self.exported: dict[str, Any] = {}
        monkeypatch.setattr(pulumi, "export", self._export)

    def _export(self, name: str, value: Any) -> None:
        self.exported[name] = value

    def run(self, program: Callable[[], Any]) -> dict[str, tuple[Any, bool]]:
        return run_and_resolve(program, self.exported)


def spec(infra: str, **kwargs: Any) -> ClusterSpec:
    regions = {"aws": "us-east-1", "gcp": "us-central1", "azure": "eastus", "kubernetes": None}
    base: dict[str, Any] = {"name": "sortie-job-7-1", "infra": infra, "region": regions[infra], "num_nodes": 2,
                            "token": TOKEN, "tags": TEAM_TAGS, "labels": LABELS, "job_id": "7", "attempt": "1",
                            "user": "alice", "controller_cidr": "203.0.113.10/32"}
    return ClusterSpec(**{**base, **kwargs})


CLOUDS = ["aws", "gcp", "azure", "kubernetes"]
SORTIE_TAGS = {"sortie": "owner", "sortie-job": "7", "sortie-attempt": "1", "sortie-user": "alice"}
