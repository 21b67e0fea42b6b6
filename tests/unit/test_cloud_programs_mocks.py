"""The cloud builders (aws, gcp, azure, kubernetes) run under `pulumi.runtime.set_mocks`.

No engine, no provider plugin, no credentials: the provider SDKs only serialize resource inputs,
which the mock monitor records (secrets arrive wrapped in Pulumi's secret marker) and answers with
fake outputs; invokes such as `getAmi` are answered by `call`.
"""


from __future__ import annotations

import base64
import gzip
import pickle
import subprocess
import sys
from pathlib import Path

import pulumi
import pytest

from orchestrator.errors import UsageError
from orchestrator.infra.agent_bundle import agent_zipapp_base64
from stacks.builders import BUILDERS, LazyBuilder, builder_for
from stacks.cluster_program import cluster_program
from stacks.spec import ClusterSpec
from tests.support.cloud_mocks import (
    AGENT_SOURCE,
    AWS_INSTANCE,
    AWS_SG,
    AZ_NIC,
    AZ_VM,
    GCP_FIREWALL,
    GCP_INSTANCE,
    K8S_CONFIGMAP,
    K8S_POD,
    K8S_SECRET,
    NETWORK_STACK,
    STACK_OUTPUTS,
    STACK_REF,
    TOKEN,
    Harness,
    is_secret,
    reveal,
    spec,
)

pytest.importorskip("pulumi_aws")
pytest.importorskip("pulumi_gcp")
pytest.importorskip("pulumi_azure_native")
pytest.importorskip("pulumi_kubernetes")


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(monkeypatch)


# --- registration ----------------------------------------------------------------------------------------------------


def test_importing_builders_imports_no_provider_sdk() -> None:
    code = ("import sys, stacks.builders, stacks.components, stacks.cluster_program; "
            "print([m for m in sys.modules if m.startswith('pulumi_')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
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
        assert container["command"][:2] == ["python3", "/opt/sortie/agent.pyz"]
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
    assert configmap["binaryData"]["agent.pyz"] == agent_zipapp_base64()
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
