"""The cloud builders under `pulumi.runtime.set_mocks`: what every cloud shares (tags, the token never in
clear, pool workers, the component), the jobs controller on a cloud, and nodes that do bucket work themselves."""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any

import pulumi
import pytest

from stacks.cluster_program import cluster_program
from stacks.components import TYPE as COMPONENT_TYPE
from stacks.components import SortieCluster
from stacks.pool_program import pool_worker_program
from tests.support.cloud_mocks import (
    AWS_INSTANCE,
    AWS_SG,
    AZ_NSG,
    CLOUDS,
    GCP_FIREWALL,
    GCP_INSTANCE,
    K8S_POD,
    LABELS,
    NETWORK_STACK,
    SORTIE_TAGS,
    STACK_REF,
    TEAM_TAGS,
    TOKEN,
    Harness,
    holds_token,
    is_secret,
    public,
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
    assert "agent.pyz" not in script  # a controller, not a node
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
    assert "\nexec python3 /opt/sortie/agent.pyz " in command[2]


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
