"""A task's ports, disk/network tiers, machine images and TPUs reach the cloud builders (issue 16), under
`pulumi.runtime.set_mocks` like the other cloud program tests."""

from __future__ import annotations

import pytest

from orchestrator.policy.cloud_features import attempt_features, cluster_features, disk_settings
from stacks.cluster_program import cluster_program
from tests.support.cloud_mocks import (
    AWS_INSTANCE,
    AWS_SG,
    AZ_NIC,
    AZ_NSG,
    AZ_VM,
    GCP_FIREWALL,
    GCP_INSTANCE,
    Harness,
    reveal,
    spec,
)
from tests.unit.test_cloud_programs_mocks import harness  # noqa: F401 - the fixture

pytest.importorskip("pulumi_aws")


def test_aws_ports_tiers_and_image(harness: Harness) -> None:  # noqa: F811
    harness.run(lambda: cluster_program(spec("aws", num_nodes=1, instance_type="p5.48xlarge",
                                             accelerators={"H100": 8}, ports=("8080", "9000-9001"),
                                             ports_cidr="198.51.100.0/24", disk_tier="ultra", disk_size=100,
                                             network_tier="best", image="ami-mine")))
    (group,) = harness.mocks.of_type(AWS_SG)
    task_rules = [(r["fromPort"], r["toPort"], r["cidrBlocks"]) for r in group["ingress"] if r["fromPort"] != 8470]
    assert task_rules == [(8080, 8080, ["198.51.100.0/24"]), (9000, 9001, ["198.51.100.0/24"])]
    (instance,) = harness.mocks.of_type(AWS_INSTANCE)
    assert instance["ami"] == "ami-mine"
    disk = instance["rootBlockDevice"]
    assert (disk["volumeType"], disk["iops"], disk["volumeSize"]) == ("io2", 50000, 100)  # 500 IOPS per GiB
    (group_pg,) = harness.mocks.of_type("aws:ec2/placementGroup:PlacementGroup")
    assert group_pg["strategy"] == "cluster" and instance["placementGroup"]


def test_aws_defaults_open_no_task_port_and_keep_gp3(harness: Harness) -> None:  # noqa: F811
    harness.run(lambda: cluster_program(spec("aws", num_nodes=1)))
    (group,) = harness.mocks.of_type(AWS_SG)
    assert [r["fromPort"] for r in group["ingress"]] == [8470]
    (instance,) = harness.mocks.of_type(AWS_INSTANCE)
    assert instance["rootBlockDevice"]["volumeType"] == "gp3" and "placementGroup" not in instance
    assert not harness.mocks.of_type("aws:ec2/placementGroup:PlacementGroup")


def test_gcp_ports_disk_tier_and_gvnic(harness: Harness) -> None:  # noqa: F811
    harness.run(lambda: cluster_program(spec("gcp", num_nodes=1, ports=("8888",), disk_tier="high",
                                             network_tier="best", image="projects/me/global/images/mine")))
    rules = {tuple(f["allows"][0]["ports"]): f["sourceRanges"] for f in harness.mocks.of_type(GCP_FIREWALL)}
    assert rules[("8888",)] == ["0.0.0.0/0"] and rules[("8470",)] == ["203.0.113.10/32"]
    (instance,) = harness.mocks.of_type(GCP_INSTANCE)
    params = instance["bootDisk"]["initializeParams"]
    assert (params["type"], params["image"]) == ("pd-ssd", "projects/me/global/images/mine")
    assert instance["networkInterfaces"][0]["nicType"] == "GVNIC"


def test_gcp_tpu_makes_a_tpu_vm_with_its_runtime(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    made = harness.mocks.new_resource

    def with_endpoints(args):  # GCP reports a TPU VM's addresses as network endpoints
        resource_id, outputs = made(args)
        if args.typ == "gcp:tpu/v2Vm:V2Vm":
            outputs["networkEndpoints"] = [{"ipAddress": "10.130.0.7", "accessConfigs": [{"externalIp": "34.1.2.3"}]}]
        return resource_id, outputs

    monkeypatch.setattr(harness.mocks, "new_resource", with_endpoints)
    exports = harness.run(lambda: cluster_program(spec("gcp", num_nodes=1, accelerators={"tpu-v5e-8": 1}, use_spot=True,
                                             accelerator_args={"runtime_version": "v2-alpha-tpuv5-lite"})))
    assert not harness.mocks.of_type(GCP_INSTANCE)
    (tpu,) = harness.mocks.of_type("gcp:tpu/v2Vm:V2Vm")
    assert (tpu["acceleratorType"], tpu["runtimeVersion"]) == ("v5litepod-8", "v2-alpha-tpuv5-lite")
    assert tpu["schedulingConfig"] == {"spot": True} and tpu["zone"] == "us-central1-b"
    (node,) = exports["nodes"][0]
    assert (node["ip"], node["public_ip"], node["instance_type"]) == ("10.130.0.7", "34.1.2.3", "v5litepod-8")


def test_azure_ports_disk_tier_and_accelerated_networking(harness: Harness) -> None:  # noqa: F811
    harness.run(lambda: cluster_program(spec("azure", num_nodes=1, accelerators={"T4": 1}, ports=("8080-8081",),
                                             disk_tier="medium", network_tier="best")))
    (nsg,) = harness.mocks.of_type(AZ_NSG)
    ports = [r for r in nsg["securityRules"] if r["name"].startswith("sortie-port")]
    assert [(r["destinationPortRange"], r["sourceAddressPrefix"]) for r in ports] == [("8080-8081", "*")]
    (vm,) = harness.mocks.of_type(AZ_VM)
    assert reveal(vm)["storageProfile"]["osDisk"]["managedDisk"] == {"storageAccountType": "StandardSSD_LRS"}
    (nic,) = harness.mocks.of_type(AZ_NIC)
    assert nic["enableAcceleratedNetworking"] is True


def test_features_of_a_candidate_and_of_an_attempt() -> None:
    candidate = {"cloud": None, "region": None, "ports": ["8080"], "disk_tier": "best", "network_tier": None,
                 "image_id": {"us-east-1": "ami-east", "us-west-2": "ami-west"}, "accelerator_args": {}}
    assert cluster_features(candidate, "us-west-2")["image"] == "ami-west"
    assert cluster_features({**candidate, "image_id": "docker:ubuntu"}, "x")["image"] is None
    task = {"resources": [{**candidate, "cloud": "gcp", "image_id": None}, {**candidate, "cloud": "aws"}]}
    features = attempt_features(task, "aws/us-east-1", "us-east-1")
    assert features["image"] == "ami-east" and features["ports"] == ("8080",)
    assert disk_settings("azure", "best", 100) == {"storage_account_type": "Premium_LRS"}
    assert disk_settings("gcp", None, 100) is None


def test_kubernetes_pod_config_is_merged_into_the_pod(harness: Harness) -> None:  # noqa: F811
    pod_config = {"metadata": {"annotations": {"team/owner": "ml"}},
                  "spec": {"runtimeClassName": "nvidia", "tolerations": [{"key": "gpu", "operator": "Exists"}],
                           "containers": [{"env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}]}}
    harness.run(lambda: cluster_program(spec("kubernetes", num_nodes=1, pod_config=pod_config)))
    (pod,) = harness.mocks.of_type("kubernetes:core/v1:Pod")
    assert pod["spec"]["runtimeClassName"] == "nvidia"
    assert {"key": "gpu", "operator": "Exists"} in pod["spec"]["tolerations"]
    (container,) = pod["spec"]["containers"]
    names = [e["name"] for e in container["env"]]
    assert names == ["SORTIE_AGENT_TOKEN", "NCCL_DEBUG"] and container["name"] == "agent"
    # the task's annotation is merged in beside Sortie's own (how long `up` waits for the pod)
    assert pod["metadata"]["annotations"] == {"team/owner": "ml", "pulumi.com/timeoutSeconds": "600"}
    assert pod["metadata"]["labels"]["sortie-rank"] == "0"


def test_config_features_carry_the_pod_config() -> None:
    task = {"resources": [{}], "config": {"kubernetes": {"pod_config": {"spec": {"hostIPC": True}}}}}
    assert attempt_features(task, "kubernetes", None)["pod_config"] == {"spec": {"hostIPC": True}}


def test_a_cloud_node_with_a_container_image_runs_its_agent_with_it(harness: Harness) -> None:  # noqa: F811
    import base64
    import gzip

    from tests.support.cloud_mocks import reveal as open_secret

    harness.run(lambda: cluster_program(spec("aws", num_nodes=1, container_image="vllm/vllm-openai:latest",
                                             container_options=("--shm-size=16g",))))
    (instance,) = harness.mocks.of_type(AWS_INSTANCE)
    script = gzip.decompress(base64.b64decode(open_secret(instance["userDataBase64"]))).decode()
    assert "--container-image vllm/vllm-openai:latest --container-engine docker" in script
    assert "--container-option=--shm-size=16g" in script and "apt-get install -y docker.io" in script


def test_on_kubernetes_the_container_image_is_the_pods_image(harness: Harness) -> None:  # noqa: F811
    harness.run(lambda: cluster_program(spec("kubernetes", num_nodes=1, container_image="python:3.11-slim")))
    (pod,) = harness.mocks.of_type("kubernetes:core/v1:Pod")
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "python:3.11-slim" and "--container-image" not in container["command"]


@pytest.mark.parametrize("mode", ["loadbalancer", "nodeport"])
def test_kubernetes_ports_are_a_service_on_the_head_pod(harness: Harness, mode: str) -> None:  # noqa: F811
    exported = harness.run(lambda: cluster_program(spec("kubernetes", num_nodes=2, ports=("8080", "9000-9001"),
                                                        kube_ports=mode)))
    services = [s for s in harness.mocks.of_type("kubernetes:core/v1:Service") if s["metadata"]["name"].endswith(
        "-ports")]
    (service,) = services  # beside the headless Service of the nodes' names
    assert service["metadata"]["name"] == "sortie-job-7-1-ports"
    assert service["metadata"]["namespace"] == "sortie-job-7-1"
    assert service["spec"]["type"] == {"loadbalancer": "LoadBalancer", "nodeport": "NodePort"}[mode]
    assert service["metadata"]["annotations"] == (  # what `up` waits for: the load balancer's address, or nothing
        {"pulumi.com/waitFor": "jsonpath={.status.loadBalancer.ingress}", "pulumi.com/timeoutSeconds": "600"}
        if mode == "loadbalancer" else {"pulumi.com/skipAwait": "true"})
    assert service["spec"]["selector"] == {"sortie-cluster": "sortie-job-7-1", "sortie-rank": "0"}
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("p8080", 8080, 8080), ("p9000", 9000, 9000), ("p9001", 9001, 9001)]
    head, worker = exported["nodes"][0]
    if mode == "loadbalancer":  # the load balancer's address, each port as it is
        assert head["endpoints"] == {"8080": "203.0.113.50:8080", "9000": "203.0.113.50:9000",
                                     "9001": "203.0.113.50:9001"}
    else:  # the head pod's node and each port's node port
        host = head["endpoints"]["8080"].split(":")[0]
        assert host.startswith("192.168.0.") and head["endpoints"] == {
            "8080": f"{host}:30000", "9000": f"{host}:30001", "9001": f"{host}:30002"}
    assert "endpoints" not in worker


def test_kubernetes_without_ports_makes_no_service_and_too_many_ports_are_refused(harness: Harness) -> None:  # noqa: F811
    from orchestrator.errors import UsageError
    from orchestrator.policy.cloud_features import offer_supports
    from stacks.builders.kubernetes import service_ports

    exported = harness.run(lambda: cluster_program(spec("kubernetes", num_nodes=1)))
    assert harness.mocks.of_type("kubernetes:core/v1:Service") == []
    assert "endpoints" not in exported["nodes"][0][0]
    assert offer_supports({"ports": ["8080", "9000-9001"]}, "kubernetes", "4CPU--8GB") is None
    assert "more than 100 ports" in (offer_supports({"ports": ["8000-8100"]}, "kubernetes", "x") or "")
    with pytest.raises(UsageError, match="at most 100"):
        service_ports(("8000-8100",))
