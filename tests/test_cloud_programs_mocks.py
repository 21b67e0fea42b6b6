"""The cloud builders (aws, gcp, azure, kubernetes) run under `pulumi.runtime.set_mocks`.

No engine, no provider plugin, no credentials: the provider SDKs only serialize resource inputs,
which the mock monitor records (secrets arrive wrapped in Pulumi's secret marker) and answers with
fake outputs; invokes such as `getAmi` are answered by `call`.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pulumi
import pytest

from orchestrator.errors import UsageError
from stacks.builders import BUILDERS, LazyBuilder, builder_for
from stacks.cluster_program import cluster_program
from stacks.components import TYPE as COMPONENT_TYPE
from stacks.components import SortieCluster
from stacks.pool_program import pool_worker_program
from stacks.spec import ClusterSpec
from tests.pulumi_mocks import run_and_resolve

pytest.importorskip("pulumi_aws")
pytest.importorskip("pulumi_gcp")
pytest.importorskip("pulumi_azure_native")
pytest.importorskip("pulumi_kubernetes")

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
AGENT_SOURCE = (Path(__file__).resolve().parents[1] / "orchestrator" / "agent.py").read_text()

AWS_INSTANCE = "aws:ec2/instance:Instance"
AWS_SG = "aws:ec2/securityGroup:SecurityGroup"
GCP_INSTANCE = "gcp:compute/instance:Instance"
GCP_FIREWALL = "gcp:compute/firewall:Firewall"
AZ_VM = "azure-native:compute:VirtualMachine"
AZ_NIC = "azure-native:network:NetworkInterface"
K8S_POD = "kubernetes:core/v1:Pod"
K8S_SECRET = "kubernetes:core/v1:Secret"
K8S_CONFIGMAP = "kubernetes:core/v1:ConfigMap"
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
                                                    "status": {"podIP": f"10.244.0.{n}", "phase": "Running"}}
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


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(monkeypatch)


def spec(infra: str, **kwargs: Any) -> ClusterSpec:
    regions = {"aws": "us-east-1", "gcp": "us-central1", "azure": "eastus", "kubernetes": None}
    base: dict[str, Any] = {"name": "sortie-job-7-1", "infra": infra, "region": regions[infra], "num_nodes": 2,
                            "token": TOKEN, "tags": TEAM_TAGS, "labels": LABELS, "job_id": "7", "attempt": "1",
                            "user": "alice", "controller_cidr": "203.0.113.10/32"}
    return ClusterSpec(**{**base, **kwargs})


CLOUDS = ["aws", "gcp", "azure", "kubernetes"]
SORTIE_TAGS = {"sortie": "owner", "sortie-job": "7", "sortie-attempt": "1", "sortie-user": "alice"}


# --- registration ----------------------------------------------------------------------------------------------------


def test_importing_builders_imports_no_provider_sdk() -> None:
    code = ("import sys, stacks.builders, stacks.components, stacks.cluster_program; "
            "print([m for m in sys.modules if m.startswith('pulumi_')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("infra", ["aws", "aws/us-west-2", "gcp", "azure", "kubernetes", "k8s/ctx"])
def test_cloud_builders_are_registered_lazily(infra: str) -> None:
    cloud = {"k8s": "kubernetes"}.get(infra.split("/")[0], infra.split("/")[0])
    assert isinstance(BUILDERS[cloud], LazyBuilder)
    builder = builder_for(infra)
    assert builder.__module__ == f"stacks.builders.{cloud}"


def test_missing_sdk_is_a_usage_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pulumi_aws", None)  # makes `import pulumi_aws` fail
    monkeypatch.delitem(sys.modules, "stacks.builders.aws", raising=False)
    with pytest.raises(UsageError, match=r"sortie\[aws\]"):
        builder_for("aws")


def test_spec_with_cloud_fields_pickles() -> None:
    s = spec("aws", network_stack=NETWORK_STACK, network_outputs={"subnet": "private"}, ssh_public_key="ssh-ed25519 A")
    assert pickle.loads(pickle.dumps(s)) == s
    assert ClusterSpec(name="x").agent_port == 8470


# --- AWS -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_spot", [True, False], ids=["spot", "on-demand"])
def test_aws_cluster(harness: Harness, use_spot: bool) -> None:
    exports = harness.run(lambda: cluster_program(spec("aws", use_spot=use_spot, instance_type="g5.2xlarge",
                                                       accelerators={"A10G": 1}, disk_size=200)))
    instances = harness.mocks.of_type(AWS_INSTANCE)
    assert len(instances) == 2
    for inputs in instances:
        assert inputs["instanceType"] == "g5.2xlarge"
        assert inputs["ami"] == "ami-default"
        assert inputs["region"] == "us-east-1"
        assert inputs["rootBlockDevice"]["volumeSize"] == 200
        assert inputs["rootBlockDevice"]["deleteOnTermination"] is True
        assert inputs["metadataOptions"]["httpTokens"] == "required"
        assert inputs["vpcSecurityGroupIds"] == ["sortie-job-7-1-agent-id"]
        if use_spot:
            assert inputs["instanceMarketOptions"] == {"marketType": "spot", "spotOptions": {
                "spotInstanceType": "one-time", "instanceInterruptionBehavior": "terminate"}}
        else:
            assert "instanceMarketOptions" not in inputs
    (ami_call,) = [args for token, args in harness.mocks.calls if token == "aws:ec2/getAmi:getAmi"]
    assert ami_call["owners"] == ["amazon"] and "Deep Learning" in ami_call["filters"][0]["values"][0]

    (group,) = harness.mocks.of_type(AWS_SG)
    assert group["vpcId"] == "vpc-default"
    (rule,) = group["ingress"]
    assert (rule["fromPort"], rule["toPort"], rule["protocol"], rule["cidrBlocks"]) == (
        8470, 8470, "tcp", ["203.0.113.10/32"])

    nodes, nodes_secret = exports["nodes"]
    assert not nodes_secret
    assert [n["rank"] for n in nodes] == [0, 1]
    for node in nodes:
        assert node["node_id"].startswith("i-")
        assert node["url"] == f"http://{node['ip']}:8470"
        assert node["region"] == "us-east-1"
        assert node["instance_type"] == "g5.2xlarge"
        assert node["spot"] is use_spot
        assert node["zone"] == "us-east-1b"
    assert exports["head_ip"] == (nodes[0]["ip"], False)
    assert exports["token"] == (TOKEN, True)


def test_aws_user_data_is_secret_compressed_and_installs_the_agent(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws")))
    for rank, inputs in enumerate(harness.mocks.of_type(AWS_INSTANCE)):
        user_data = inputs["userDataBase64"]
        assert is_secret(user_data)
        packed = base64.b64decode(user_data["value"])
        assert len(packed) <= 16 * 1024
        script = gzip.decompress(packed).decode()
        assert TOKEN in script
        assert AGENT_SOURCE.rstrip() in script
        assert "--token-stdin" in script and "--port 8470" in script and f"--node-id sortie-job-7-1-{rank}" in script


def test_aws_defaults_ubuntu_image_type_and_disk(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws", num_nodes=1, controller_cidr=None, zone="us-east-1c")))
    (inputs,) = harness.mocks.of_type(AWS_INSTANCE)
    assert inputs["instanceType"] == "m6i.xlarge"
    assert inputs["rootBlockDevice"]["volumeSize"] == 256
    assert inputs["subnetId"] == "subnet-us-east-1c"
    (ami_call,) = [args for token, args in harness.mocks.calls if token == "aws:ec2/getAmi:getAmi"]
    assert ami_call["owners"] == ["099720109477"] and "amd64" in ami_call["filters"][0]["values"][0]
    (group,) = harness.mocks.of_type(AWS_SG)
    assert group["ingress"][0]["cidrBlocks"] == ["172.31.0.0/16"]  # no controller CIDR: the VPC only


def test_aws_image_override_skips_the_lookup(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws", num_nodes=1, image="ami-custom", instance_type="m7g.large")))
    assert harness.mocks.of_type(AWS_INSTANCE)[0]["ami"] == "ami-custom"
    assert not [t for t, _a in harness.mocks.calls if t == "aws:ec2/getAmi:getAmi"]


def test_aws_network_stack_supplies_subnet_and_groups(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws", network_stack=NETWORK_STACK)))
    (ref,) = harness.mocks.of_type(STACK_REF)
    assert ref["name"] == NETWORK_STACK
    assert AWS_SG not in harness.mocks.types()
    for inputs in harness.mocks.of_type(AWS_INSTANCE):
        assert inputs["subnetId"] == "subnet-team"
        assert inputs["vpcSecurityGroupIds"] == ["sg-team-a", "sg-team-b"]


def test_aws_network_outputs_rename_what_is_read(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws", num_nodes=1, network_stack=NETWORK_STACK,
                                             network_outputs={"subnet": "subnetId2"})))
    assert harness.mocks.of_type(AWS_INSTANCE)[0]["subnetId"] == "subnet-other"


def test_aws_unknown_network_output_key_is_a_usage_error(harness: Harness) -> None:
    with pytest.raises(UsageError, match="vnet"):
        cluster_program(spec("aws", network_stack=NETWORK_STACK, network_outputs={"vnet": "x"}))


def test_aws_gpu_without_default_type_is_a_usage_error(harness: Harness) -> None:
    with pytest.raises(UsageError, match="H100:3"):
        cluster_program(spec("aws", accelerators={"H100": 3}))


# --- GCP -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_spot", [True, False], ids=["spot", "on-demand"])
def test_gcp_cluster(harness: Harness, use_spot: bool) -> None:
    exports = harness.run(lambda: cluster_program(spec("gcp", use_spot=use_spot, accelerators={"L4": 1},
                                                       disk_size=150)))
    instances = harness.mocks.of_type(GCP_INSTANCE)
    assert len(instances) == 2
    for inputs in instances:
        assert inputs["machineType"] == "g2-standard-4"
        assert inputs["zone"] == "us-central1-b"  # the first zone that is up, in order
        assert inputs["guestAccelerators"] == [{"type": "nvidia-l4", "count": 1}]
        assert inputs["bootDisk"]["initializeParams"]["size"] == 150
        assert "deeplearning-platform-release" in inputs["bootDisk"]["initializeParams"]["image"]
        assert inputs["networkInterfaces"] == [{"network": "default", "accessConfigs": [{}]}]
        scheduling = inputs["scheduling"]
        assert scheduling["onHostMaintenance"] == "TERMINATE"
        if use_spot:
            assert scheduling["provisioningModel"] == "SPOT"
            assert scheduling["preemptible"] is True
            assert scheduling["automaticRestart"] is False
            assert scheduling["instanceTerminationAction"] == "DELETE"
        else:
            assert scheduling["provisioningModel"] == "STANDARD"
            assert scheduling["preemptible"] is False
        assert inputs["tags"] == ["sortie-sortie-job-7-1"]
    (firewall,) = harness.mocks.of_type(GCP_FIREWALL)
    assert firewall["allows"] == [{"protocol": "tcp", "ports": ["8470"]}]
    assert firewall["sourceRanges"] == ["203.0.113.10/32"]
    assert firewall["targetTags"] == ["sortie-sortie-job-7-1"]
    assert firewall["direction"] == "INGRESS"

    nodes, _ = exports["nodes"]
    for node in nodes:
        assert node["url"] == f"http://{node['ip']}:8470" and node["ip"].startswith("10.128.0.")
        assert node["region"] == "us-central1" and node["zone"] == "us-central1-b"
        assert node["spot"] is use_spot and node["instance_type"] == "g2-standard-4"
        assert node["node_id"].isdigit()


def test_gcp_cpu_defaults_and_startup_script(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("gcp", num_nodes=1, zone="europe-west4-a", region="europe-west4",
                                             ssh_public_key="ssh-ed25519 AAAA me")))
    (inputs,) = harness.mocks.of_type(GCP_INSTANCE)
    assert inputs["machineType"] == "n2-standard-4"
    assert inputs["zone"] == "europe-west4-a"
    assert "guestAccelerators" not in inputs
    assert inputs["scheduling"]["onHostMaintenance"] == "MIGRATE"
    assert inputs["bootDisk"]["initializeParams"]["image"] == "ubuntu-os-cloud/ubuntu-2204-lts"
    metadata = inputs["metadata"]
    # The secret script makes the map secret as a whole (on the wire the marker wraps the map or the value).
    assert is_secret(metadata) or is_secret(metadata["startup-script"])
    script = reveal(metadata)["startup-script"]
    assert TOKEN in script and AGENT_SOURCE.rstrip() in script
    assert reveal(metadata)["ssh-keys"] == "sortie:ssh-ed25519 AAAA me"


def test_gcp_network_stack(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("gcp", network_stack=NETWORK_STACK, instance_type="n2-highmem-8")))
    assert harness.mocks.of_type(STACK_REF)[0]["name"] == NETWORK_STACK
    assert GCP_FIREWALL not in harness.mocks.types()
    for inputs in harness.mocks.of_type(GCP_INSTANCE):
        assert inputs["networkInterfaces"] == [{"network": STACK_OUTPUTS["network"],
                                                "subnetwork": STACK_OUTPUTS["subnetwork"]}]
        assert inputs["machineType"] == "n2-highmem-8"


# --- Azure -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_spot", [True, False], ids=["spot", "on-demand"])
def test_azure_cluster(harness: Harness, use_spot: bool) -> None:
    exports = harness.run(lambda: cluster_program(spec("azure", use_spot=use_spot, accelerators={"T4": 1},
                                                       disk_size=128, zone="2")))
    vms = harness.mocks.of_type(AZ_VM)
    assert len(vms) == 2
    for wire in vms:
        assert is_secret(wire["osProfile"])  # the secret custom data makes the whole profile secret
        inputs = reveal(wire)
        assert inputs["hardwareProfile"] == {"vmSize": "Standard_NC4as_T4_v3"}
        assert inputs["location"] == "eastus"
        assert inputs["zones"] == ["2"]
        assert inputs["resourceGroupName"] == "sortie-job-7-1-rg-physical"
        os_disk = inputs["storageProfile"]["osDisk"]
        assert os_disk["diskSizeGB"] == 128 and os_disk["deleteOption"] == "Delete"
        assert inputs["storageProfile"]["imageReference"]["publisher"] == "microsoft-dsvm"
        linux = inputs["osProfile"]["linuxConfiguration"]
        assert linux["disablePasswordAuthentication"] is True
        assert linux["ssh"]["publicKeys"][0]["keyData"].startswith("ssh-ed25519 ")
        if use_spot:
            assert inputs["priority"] == "Spot"
            assert inputs["evictionPolicy"] == "Delete"
            assert inputs["billingProfile"] == {"maxPrice": -1}
        else:
            assert inputs["priority"] == "Regular"
            assert "evictionPolicy" not in inputs and "billingProfile" not in inputs
    types = harness.mocks.types()
    assert {"azure-native:resources:ResourceGroup", "azure-native:network:VirtualNetwork",
            "azure-native:network:Subnet", "azure-native:network:NetworkSecurityGroup"} <= types
    (nsg,) = harness.mocks.of_type("azure-native:network:NetworkSecurityGroup")
    (rule,) = nsg["securityRules"]
    assert (rule["direction"], rule["access"], rule["protocol"], rule["destinationPortRange"],
            rule["sourceAddressPrefix"]) == ("Inbound", "Allow", "Tcp", "8470", "203.0.113.10/32")
    assert len(harness.mocks.of_type("azure-native:network:PublicIPAddress")) == 2

    nodes, _ = exports["nodes"]
    for node in nodes:
        assert node["ip"].startswith("10.80.0.") and node["url"] == f"http://{node['ip']}:8470"
        assert node["node_id"].startswith("vm-guid-")
        assert (node["region"], node["zone"], node["spot"]) == ("eastus", "2", use_spot)


def test_azure_custom_data_is_secret_base64_cloud_init(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("azure", ssh_public_key="ssh-rsa AAAB me", image="a:b:c:latest")))
    for wire in harness.mocks.of_type(AZ_VM):
        assert is_secret(wire["osProfile"]) or is_secret(wire["osProfile"]["customData"])
        inputs = reveal(wire)
        custom = inputs["osProfile"]["customData"]
        assert len(custom) <= 64 * 1024
        script = base64.b64decode(custom).decode()
        assert TOKEN in script and AGENT_SOURCE.rstrip() in script
        assert inputs["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["keyData"] == "ssh-rsa AAAB me"
        assert inputs["storageProfile"]["imageReference"] == {"publisher": "a", "offer": "b", "sku": "c",
                                                              "version": "latest"}
        assert inputs["hardwareProfile"] == {"vmSize": "Standard_D4s_v5"}


def test_azure_network_stack(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("azure", network_stack=NETWORK_STACK, controller_cidr=None)))
    assert harness.mocks.of_type(STACK_REF)[0]["name"] == NETWORK_STACK
    assert harness.mocks.types() & {"azure-native:resources:ResourceGroup", "azure-native:network:VirtualNetwork",
                                    "azure-native:network:NetworkSecurityGroup",
                                    "azure-native:network:PublicIPAddress"} == set()
    for inputs in harness.mocks.of_type(AZ_NIC):
        assert inputs["resourceGroupName"] == "rg-team"
        assert inputs["ipConfigurations"][0]["subnet"] == {"id": "subnet-team"}
        assert "publicIPAddress" not in inputs["ipConfigurations"][0]
    assert all(vm["resourceGroupName"] == "rg-team" for vm in harness.mocks.of_type(AZ_VM))


def test_azure_default_rule_admits_only_the_virtual_network(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("azure", controller_cidr=None)))
    (nsg,) = harness.mocks.of_type("azure-native:network:NetworkSecurityGroup")
    assert nsg["securityRules"][0]["sourceAddressPrefix"] == "VirtualNetwork"


# --- Kubernetes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_spot", [True, False], ids=["spot", "on-demand"])
def test_kubernetes_cluster(harness: Harness, use_spot: bool) -> None:
    exports = harness.run(lambda: cluster_program(spec("kubernetes", use_spot=use_spot, cpus="4", memory="16+",
                                                       accelerators={"A100": 2}, disk_size=50)))
    pods = harness.mocks.of_type(K8S_POD)
    assert len(pods) == 2
    for rank, pod in enumerate(pods):
        assert "name" not in pod["metadata"]  # the provider names it (a fixed name breaks its replace preview)
        assert pod["metadata"]["namespace"] == "sortie-job-7-1"  # the cluster's own namespace
        assert (pod["spec"]["hostname"], pod["spec"]["subdomain"]) == (f"sortie-job-7-1-{rank}", "sortie-job-7-1")
        (container,) = pod["spec"]["containers"]
        assert container["image"] == "python:3.11-slim"
        assert container["command"][:2] == ["python3", "/opt/sortie/agent.py"]
        assert "--token-stdin" not in container["command"]
        assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "50Gi"},
                                          "limits": {"cpu": "4", "nvidia.com/gpu": "2"}}
        (env,) = container["env"]
        assert env == {"name": "SORTIE_AGENT_TOKEN",
                       "valueFrom": {"secretKeyRef": {"name": "sortie-job-7-1-token", "key": "token"}}}
        tolerations = pod["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        keys = {t["key"] for t in tolerations}
        if use_spot:
            assert {"sortie.dev/spot", "cloud.google.com/gke-spot"} <= keys
            assert "affinity" in pod["spec"]
        else:
            assert keys == {"nvidia.com/gpu"} and "affinity" not in pod["spec"]
    (secret,) = harness.mocks.of_type(K8S_SECRET)
    assert is_secret(secret["stringData"]) and reveal(secret["stringData"]) == {"token": TOKEN}
    (configmap,) = harness.mocks.of_type(K8S_CONFIGMAP)
    assert configmap["data"]["agent.py"] == AGENT_SOURCE
    (namespace,) = harness.mocks.of_type("kubernetes:core/v1:Namespace")
    assert namespace["metadata"]["name"] == "sortie-job-7-1"
    (service,) = harness.mocks.of_type("kubernetes:core/v1:Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"sortie-cluster": "sortie-job-7-1"}

    nodes, _ = exports["nodes"]
    assert [n["node_id"] for n in nodes] == ["sortie-job-7-1-node-0-0a1b2c3d", "sortie-job-7-1-node-1-0a1b2c3d"]
    for node in nodes:
        assert node["ip"].startswith("10.244.0.") and node["url"] == f"http://{node['ip']}:8470"
        assert node["spot"] is use_spot


def test_kubernetes_context_namespace_and_instance_type(harness: Harness) -> None:
    pulumi.runtime.set_all_config({"sortie:namespace": "ml-jobs"})
    try:
        harness.run(lambda: cluster_program(spec("kubernetes", region="kubernetes/gke-prod", num_nodes=1,
                                                 instance_type="n2-standard-8", image="ghcr.io/acme/py:3.12")))
    finally:
        pulumi.runtime.set_all_config({})
    (provider,) = harness.mocks.of_type("pulumi:providers:kubernetes")
    assert provider["context"] == "gke-prod"
    (pod,) = harness.mocks.of_type(K8S_POD)
    assert pod["metadata"]["namespace"] == "ml-jobs"
    assert pod["spec"]["nodeSelector"] == {"node.kubernetes.io/instance-type": "n2-standard-8"}
    assert pod["spec"]["containers"][0]["image"] == "ghcr.io/acme/py:3.12"
    assert "resources" not in pod["spec"]["containers"][0]


# --- what every cloud shares -----------------------------------------------------------------------------------------

# Types that take no tags or labels.
UNTAGGED = {STACK_REF, GCP_FIREWALL, "azure-native:network:Subnet", "pulumi:providers:kubernetes"}


def tag_sets(typ: str, inputs: dict[str, Any]) -> list[dict[str, str]]:
    """Every tag/label map a resource's inputs carry."""
    if typ.startswith("aws:"):
        return [inputs["tags"]] + ([inputs["volumeTags"]] if typ == AWS_INSTANCE else [])
    if typ == GCP_INSTANCE:
        return [inputs["labels"], inputs["bootDisk"]["initializeParams"]["labels"]]
    if typ.startswith("azure-native:"):
        return [inputs["tags"]]
    if typ.startswith("kubernetes:"):
        return [inputs["metadata"]["labels"]]
    raise AssertionError(f"no tags known for {typ}")


@pytest.mark.parametrize("network", [False, True], ids=["default-network", "network-stack"])
@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_taggable_resource_carries_sortie_and_team_tags(harness: Harness, cloud: str, network: bool) -> None:
    extra = {"network_stack": NETWORK_STACK} if network and cloud != "kubernetes" else {}
    harness.run(lambda: cluster_program(spec(cloud, ssh_public_key="ssh-ed25519 AAAA me", **extra)))
    tagged = 0
    for typ, name, inputs in harness.mocks.resources:
        if typ in UNTAGGED:
            continue
        for tags in tag_sets(typ, inputs):
            expected = {**TEAM_TAGS, **LABELS, **SORTIE_TAGS, "sortie-cluster": "sortie-job-7-1"}
            assert expected.items() <= tags.items(), f"{typ} {name}: {tags}"
            tagged += 1
    assert tagged >= 2


def test_sortie_tags_win_over_team_tags(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws", num_nodes=1, tags={"sortie": "mine", "team": "ml"},
                                             labels={"sortie-user": "mallory"})))
    tags = harness.mocks.of_type(AWS_INSTANCE)[0]["tags"]
    assert tags["sortie"] == "owner" and tags["sortie-user"] == "alice" and tags["team"] == "ml"


def test_gcp_and_kubernetes_labels_follow_their_rules(harness: Harness) -> None:
    odd = {"Team Name": "ML Infra", "owner": "alice@example.com"}
    harness.run(lambda: cluster_program(spec("gcp", num_nodes=1, tags=odd, user="Bob.Smith@x.io")))
    labels = harness.mocks.of_type(GCP_INSTANCE)[0]["labels"]
    assert labels["team_name"] == "ml_infra" and labels["owner"] == "alice_example_com"
    assert labels["sortie-user"] == "bob_smith_x_io"
    assert all(k == k.lower() and v == v.lower() and len(k) <= 63 for k, v in labels.items())


@pytest.mark.parametrize("network", [False, True], ids=["default-network", "network-stack"])
@pytest.mark.parametrize("cloud", CLOUDS)
def test_token_is_never_in_clear(harness: Harness, cloud: str, network: bool) -> None:
    extra = {"network_stack": NETWORK_STACK} if network and cloud != "kubernetes" else {}
    exports = harness.run(lambda: cluster_program(spec(cloud, use_spot=True, **extra)))
    carriers = 0
    for typ, name, inputs in harness.mocks.resources:
        clear = public(inputs)
        assert not holds_token(clear), f"{typ} {name} has the token in clear"
        assert TOKEN not in json.dumps(clear)
        if holds_token(reveal(inputs)):
            carriers += 1
    # Each VM's boot data carries it (as a secret); on Kubernetes, the one Secret.
    assert carriers == (1 if cloud == "kubernetes" else 2)
    nodes, nodes_secret = exports["nodes"]
    assert TOKEN not in json.dumps(nodes) and not nodes_secret
    assert exports["token"] == (TOKEN, True)


@pytest.mark.parametrize("cloud", CLOUDS)
def test_pool_worker_on_a_cloud(harness: Harness, cloud: str) -> None:
    exports = harness.run(lambda: pool_worker_program(spec(cloud), "gpu-pool", 3))
    worker, _ = exports["worker"]
    assert worker["rank"] == 0 and worker["url"].endswith(":8470")
    for typ, _name, inputs in harness.mocks.resources:
        if typ not in UNTAGGED:
            assert all(tags.get("sortie-pool") == "gpu-pool" for tags in tag_sets(typ, inputs))


# --- the component ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cloud", CLOUDS)
def test_component_parents_every_resource(harness: Harness, cloud: str) -> None:
    children: list[tuple[str, str, Any]] = []

    def record(args: pulumi.ResourceTransformationArgs) -> None:
        children.append((args.type_, args.name, args.opts.parent))

    outputs: dict[str, Any] = {}

    def program() -> None:
        cluster = SortieCluster("team-cluster", spec(cloud), pulumi.ResourceOptions(transformations=[record]))
        outputs["cluster"] = cluster
        pulumi.export("nodes", cluster.nodes)
        pulumi.export("head_ip", cluster.head_ip)

    exports = harness.run(program)
    cluster = outputs["cluster"]
    registered = {(t, n) for t, n, _i in harness.mocks.resources}
    assert (COMPONENT_TYPE, "team-cluster") in registered
    made = [(t, n) for t, n, _i in harness.mocks.resources if t != COMPONENT_TYPE]
    children = [c for c in children if c[0] != COMPONENT_TYPE]  # its own options apply to it too
    assert sorted(made) == sorted((t, n) for t, n, _p in children)  # every resource saw the component's options
    assert all(parent is not None for _t, _n, parent in children)
    direct = [(t, n) for t, n, parent in children if parent is cluster]
    assert len(direct) >= 2
    nodes, _ = exports["nodes"]
    assert [n["rank"] for n in nodes] == [0, 1]
    assert exports["head_ip"] == (nodes[0]["ip"], False)


# --- the jobs controller on a cloud ----------------------------------------------------------------------------------

def test_controller_vm_runs_the_controller_with_its_secrets_only_in_secret_user_data(harness: Harness) -> None:
    from stacks.controller_program import controller_program

    secret_env = "SORTIE_DB_URL=postgresql://sortie:hunter2@db.internal/sortie\n"
    exports = harness.run(lambda: controller_program(spec("aws", name="sortie-controller-1", token=secret_env,
                                                          instance_type="m6i.large", controller_package="sortie")))
    (inputs,) = harness.mocks.of_type(AWS_INSTANCE)
    assert inputs["instanceType"] == "m6i.large" and inputs["tags"]["sortie-role"] == "controller"
    assert is_secret(inputs["userDataBase64"])
    script = gzip.decompress(base64.b64decode(inputs["userDataBase64"]["value"])).decode()
    assert "hunter2" in script and "sortie-controller.service" in script
    assert "pip install --quiet 'sortie[postgres,dashboard,aws]'" in script
    assert "orchestrator.controller.daemon" in script
    # The dashboard runs beside it on the VM's loopback; `sortie dashboard` reaches it through SSH.
    assert "sortie-dashboard.service" in script
    assert "-m orchestrator.dashboard.server --host 127.0.0.1 --port 8765" in script
    assert "agent.py" not in script  # a controller, not a node
    for _typ, _name, other in harness.mocks.resources:  # nowhere in clear
        assert "hunter2" not in json.dumps(public(other), default=str)
    node, _ = exports["controller"]
    assert node["instance_type"] == "m6i.large" and exports["infra"] == ("aws", False)
    assert node["public_ip"].startswith("54.0.0.") and node["ssh_user"] == "ubuntu"


def ssh_sources(harness: Harness, cloud: str) -> list[list[str]]:
    """Per firewall rule that admits port 22: where from."""
    if cloud == "aws":
        return [rule["cidrBlocks"] for group in harness.mocks.of_type(AWS_SG) for rule in group["ingress"]
                if rule["fromPort"] <= 22 <= rule["toPort"]]
    if cloud == "gcp":
        return [wall["sourceRanges"] for wall in harness.mocks.of_type(GCP_FIREWALL)
                if any("22" in allow.get("ports", []) for allow in wall["allows"])]
    return [[rule["sourceAddressPrefix"]] for nsg in harness.mocks.of_type(AZ_NSG) for rule in nsg["securityRules"]
            if rule["destinationPortRange"] == "22"]


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_only_the_controller_vm_admits_ssh_and_it_exports_where_and_as_whom(harness: Harness, cloud: str) -> None:
    from stacks.controller_program import controller_program

    exports = harness.run(lambda: controller_program(spec(cloud, name="sortie-controller-1", token="DB=x\n",
                                                          ssh_public_key="ssh-ed25519 AAAA me",
                                                          ssh_cidr="198.51.100.0/24")))
    assert ssh_sources(harness, cloud) == [["198.51.100.0/24"]]
    node, _ = exports["controller"]
    assert node["public_ip"] and node["public_ip"] != node["ip"]
    assert node["ssh_user"] == {"aws": "ubuntu", "gcp": "sortie", "azure": "sortie"}[cloud]


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_cluster_nodes_never_admit_ssh(harness: Harness, cloud: str) -> None:
    harness.run(lambda: cluster_program(spec(cloud, ssh_public_key="ssh-ed25519 AAAA me", ssh_cidr="0.0.0.0/0")))
    assert ssh_sources(harness, cloud) == []


# --- nodes that do bucket work themselves ----------------------------------------------------------------------------

def test_a_cloud_node_with_bucket_work_installs_sortie_before_its_agent(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws", num_nodes=1, node_package="sortie==0.1.0")))
    (inputs,) = harness.mocks.of_type(AWS_INSTANCE)
    script = gzip.decompress(base64.b64decode(inputs["userDataBase64"]["value"])).decode()
    install = script.index("/var/lib/sortie/venv/bin/pip install --quiet 'sortie==0.1.0[s3]'")
    assert install < script.index("systemctl restart sortie-agent.service")
    assert "python3 -m venv /var/lib/sortie/venv" in script


def test_a_node_without_bucket_work_installs_only_the_agent(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws", num_nodes=1)))
    (inputs,) = harness.mocks.of_type(AWS_INSTANCE)
    script = gzip.decompress(base64.b64decode(inputs["userDataBase64"]["value"])).decode()
    assert "pip install" not in script and "rclone" not in script


def test_a_pod_with_bucket_work_installs_sortie_then_execs_its_agent(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("kubernetes", num_nodes=1, node_package="sortie")))
    (pod,) = harness.mocks.of_type(K8S_POD)
    command = pod["spec"]["containers"][0]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    assert "/var/lib/sortie/venv/bin/pip install --quiet 'sortie[s3]'" in command[2]
    assert "\nexec python3 /opt/sortie/agent.py " in command[2]


def test_which_nodes_install_sortie_and_which_python_runs_their_bucket_steps() -> None:
    from orchestrator.config import SortieConfig
    from orchestrator.controller.node_files import node_package_for, node_python
    from orchestrator.storage.staging import NodeStep

    config = SortieConfig.model_validate({"jobs": {"controller": {"package": "sortie==0.1.0"}}})
    copy = NodeStep(dest="/data", kind="copy", url="s3://bucket/data")
    push = NodeStep(dest="~/sky_workdir", kind="push", path="/tmp/x")
    local_mount = NodeStep(dest="/ckpt", kind="mount", url="local://ckpt")
    assert node_package_for([copy], "aws", config) == "sortie==0.1.0"
    assert node_package_for([push, local_mount], "aws", config) is None  # pushed by the controller, or a link
    assert node_package_for([copy], "local", config) is None and node_package_for([], "gcp", config) is None
    assert node_python("aws") == "/var/lib/sortie/venv/bin/python" and node_python("local") is None


def test_a_cloud_node_with_an_s3_mount_installs_rclone_at_boot(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws", num_nodes=1, node_package="sortie", node_fuse=True)))
    (inputs,) = harness.mocks.of_type(AWS_INSTANCE)
    script = gzip.decompress(base64.b64decode(inputs["userDataBase64"]["value"])).decode()
    assert script.index("apt-get install -y rclone fuse3") < script.index("systemctl restart sortie-agent.service")


def test_which_nodes_need_a_fuse_tool() -> None:
    from orchestrator.controller.node_files import node_fuse_for
    from orchestrator.storage.staging import NodeStep

    s3_mount = NodeStep(dest="/ckpt", kind="mount", url="s3://bucket/ckpt")
    local_mount = NodeStep(dest="/ckpt", kind="mount", url="local://ckpt")
    copy = NodeStep(dest="/data", kind="copy", url="s3://bucket/data")
    assert node_fuse_for([copy, s3_mount], "gcp") is True
    assert node_fuse_for([copy, local_mount], "aws") is False  # a copy needs no FUSE; a local store is a link
    assert node_fuse_for([s3_mount], "local") is False  # the local cloud uses this machine's rclone


def test_aws_nodes_get_the_configured_instance_profile_never_keys(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws", instance_profile="sortie-nodes")))
    for inputs in harness.mocks.of_type(AWS_INSTANCE):
        assert inputs["iamInstanceProfile"] == "sortie-nodes"
        assert "AWS_SECRET_ACCESS_KEY" not in str(inputs)


def test_cloud_fields_carry_the_node_instance_profile() -> None:
    from orchestrator.config import SortieConfig
    from stacks.spec import cloud_fields

    config = SortieConfig.model_validate({"cloud": {"node_instance_profile": "sortie-nodes"}})
    assert cloud_fields(config)["instance_profile"] == "sortie-nodes"
    assert cloud_fields(SortieConfig())["instance_profile"] is None
