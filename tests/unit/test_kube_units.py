"""Kubernetes pieces that need no cluster: kubeconfig reading, node capacity as offers, the builds' generated
files, the pod's image and sizing, and `sortie check` from a kubeconfig."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from orchestrator.config import KubernetesConfig, SortieConfig
from orchestrator.errors import UsageError
from orchestrator.infra.kube_binaries import staging_replaces
from orchestrator.infra.kube_capacity import (
    accelerator_name,
    load_target,
    node_offer_fields,
    quantity,
)
from orchestrator.infra.provider_plugins import embedded_files
from stacks.builders.kubernetes import pod_image, resources, scheduling, synthetic_instance
from stacks.spec import ClusterSpec


def _kubeconfig(tmp_path: Path, user: dict, *, current: str = "ctx", server: str = "https://127.0.0.1:6443") -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": current,
        "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority": "ca.crt"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": "ml"}},
                     {"name": "other", "context": {"cluster": "c", "user": "u"}}]}))
    return path


def test_kubeconfig_context_token_and_relative_paths(tmp_path: Path) -> None:
    path = _kubeconfig(tmp_path, {"token": "t0k", "client-certificate-data": base64.b64encode(b"C").decode(),
                                  "client-key-data": base64.b64encode(b"K").decode()})
    target = load_target(SortieConfig(kubernetes=KubernetesConfig(kubeconfig=str(path))), env={})
    assert (target.context, target.server, target.namespace, target.token) == ("ctx", "https://127.0.0.1:6443",
                                                                               "ml", "t0k")
    assert target.ca_file == str(tmp_path / "ca.crt") and target.cert_data == (b"C", b"K")
    other = load_target(SortieConfig(kubernetes=KubernetesConfig(context="other")), env={"KUBECONFIG": str(path)})
    assert other.context == "other" and other.namespace is None


@pytest.mark.parametrize(("user", "context", "needle"), [
    ({"exec": {"command": "aws"}}, None, "exec/auth-provider plugin"),
    ({"token": "x"}, "missing", "no context named 'missing'"),
])
def test_kubeconfig_errors_are_one_line(tmp_path: Path, user: dict, context: str | None, needle: str) -> None:
    path = _kubeconfig(tmp_path, user)
    with pytest.raises(UsageError) as err:
        load_target(SortieConfig(kubernetes=KubernetesConfig(kubeconfig=str(path), context=context)), env={})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_quantities_and_accelerator_labels() -> None:
    assert quantity("7910m") == pytest.approx(7.91)
    assert quantity("32Gi") == 32 * 2**30 and quantity("1e3") == 1000 and quantity("junk") == 0
    assert accelerator_name({"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}) == "H100"
    assert accelerator_name({"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}) == "A100"
    assert accelerator_name({"skypilot.co/accelerator": "l4"}) == "L4"
    assert accelerator_name({}) is None


def _node(cpu: str, memory: str, gpus: str | None = None, labels: dict | None = None, ready: bool = True,
          unschedulable: bool = False) -> dict:
    alloc = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": gpus} if gpus else {})}
    return {"metadata": {"labels": labels or {}}, "spec": {"unschedulable": unschedulable},
            "status": {"allocatable": alloc, "conditions": [{"type": "Ready", "status": str(ready)}]}}


def test_node_offers_follow_allocatable() -> None:
    assert node_offer_fields(_node("7910m", "32Gi")) == ("7.91CPU--32GB", 7.91, 32.0, {})
    gpu = node_offer_fields(_node("16", "64Gi", "2", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}))
    assert gpu == ("16CPU--64GB--2H100", 16.0, 64.0, {"H100": 2.0})
    assert node_offer_fields(_node("8", "8Gi", ready=False)) is None
    assert node_offer_fields(_node("8", "8Gi", unschedulable=True)) is None


def test_pod_sizing_from_offer_types_and_docker_image() -> None:
    spec = ClusterSpec(name="c", infra="kubernetes", instance_type="16CPU--64GB--2H100", accelerators={"H100": 2},
                       image="docker:ghcr.io/acme/train:1.2")
    assert synthetic_instance("m5.large") is None and synthetic_instance(spec.instance_type) == ("16", "64")
    assert resources(spec) == {"requests": {"cpu": "16", "memory": "64Gi"},
                               "limits": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "2"}}
    assert "node_selector" not in scheduling(spec)
    assert scheduling(ClusterSpec(name="c", instance_type="m5.large"))["node_selector"] == {
        "node.kubernetes.io/instance-type": "m5.large"}
    assert pod_image(spec) == "ghcr.io/acme/train:1.2"
    assert pod_image(ClusterSpec(name="c")) == "python:3.11-slim"


def test_staging_modules_map_to_published_versions() -> None:
    go_mod = "replace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\tk8s.io/client-go => ./staging/src/k8s.io/" \
             "client-go\n\tgithub.com/x/y => github.com/x/y v1.0.0\n)\n"
    assert staging_replaces(go_mod, "1.37.2") == ["\tk8s.io/api => k8s.io/api v0.37.2",
                                                  "\tk8s.io/client-go => k8s.io/client-go v0.37.2"]


def test_embedded_files_are_the_generators(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "schema.json").write_text(json.dumps({"name": "kubernetes", "version": "", "x": [1, 2]}, indent=2))
    (source / "terraform-mapping.json").write_text('{\n  "a": 1\n}\n')
    embedded_files(source, "4.34.2", tmp_path)
    assert json.loads((tmp_path / "schema-embed.json").read_text())["version"] == "4.34.2"
    assert (tmp_path / "terraform-mapping-embed.json").read_text() == '{"a":1}'


def test_check_reports_kubernetes_from_the_kubeconfig(tmp_path: Path) -> None:
    from orchestrator.infra.clouds import check

    path = _kubeconfig(tmp_path, {"token": "x"})
    found = {c.cloud: c for c in check(SortieConfig(), env={"KUBECONFIG": str(path)}, home=tmp_path)}
    assert found["kubernetes"].enabled and "context ctx (https://127.0.0.1:6443)" in found["kubernetes"].reason
    none = {c.cloud: c for c in check(SortieConfig(), env={}, home=tmp_path)}
    assert not none["kubernetes"].enabled and "KUBECONFIG" in none["kubernetes"].reason
    broken = {c.cloud: c for c in check(SortieConfig(kubernetes=KubernetesConfig(context="nope")),
                                        env={"KUBECONFIG": str(path)}, home=tmp_path)}
    assert not broken["kubernetes"].enabled and "no context named 'nope'" in broken["kubernetes"].reason


def test_pool_mode_follows_the_providers_diff() -> None:
    from orchestrator.policy.pools import ApplyPlan, follow_provider_diff

    recreate = ApplyPlan("p", "recreate", 2, 2, "2 workers", "2 workers", changed=("resources",), create=2,
                         remove=("w1", "w2"))
    update = follow_provider_diff(recreate, {"w1": ["same", "update"], "w2": ["update", "same"]})
    assert (update.mode, update.keep, update.remove, update.create) == ("update", ("w1", "w2"), (), 0)
    replaced = follow_provider_diff(recreate, {"w1": ["update"], "w2": ["replace", "update"]})
    assert replaced.mode == "recreate" and "the provider replaces resources of w2" in replaced.notes
    assert follow_provider_diff(recreate, {"w1": ["update"]}) is recreate  # not every worker has a provider diff
    files = ApplyPlan("p", "recreate", 2, 2, "", "", changed=("workdir",), create=2, remove=("w1", "w2"))
    assert follow_provider_diff(files, {"w1": ["same"], "w2": ["same"]}).mode == "recreate"


def test_a_capacity_failure_is_the_schedulers_message_not_the_progress_line() -> None:
    from orchestrator.infra._stack_worker import _summary

    line = ("+  kubernetes:core/v1:Pod sortie-job-1-t0-1-node-0 creating (0s) warning: FailedScheduling: 0/2 nodes "
            "are available: 1 Insufficient cpu, 1 node(s) had untolerated taint(s).")
    assert _summary(f"Updating\n{line}\nerror: update failed\n") == (
        "FailedScheduling: 0/2 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint(s).")


def test_a_load_balancer_without_an_address_is_named_with_what_to_do() -> None:
    from orchestrator.infra._stack_worker import _LB_NO_ADDRESS

    text = ('    * resource "urn:pulumi:s::sortie::kubernetes:core/v1:Service::sortie-job-3-t0-1-ports" was '
            "successfully created, but the Kubernetes API server reported that it failed to fully initialize or "
            "become live: timed out waiting for the condition")
    found = _LB_NO_ADDRESS.search(text)
    assert found is not None and found.group(1) == "sortie-job-3-t0-1-ports"
    assert _LB_NO_ADDRESS.search(text.replace("-ports", "-nodes")) is None  # the nodes' own Service: not this


def test_the_default_disk_requests_no_ephemeral_storage() -> None:
    from orchestrator.spec.resources import DEFAULT_DISK_SIZE_GB
    from stacks.builders.kubernetes import resources

    default = resources(ClusterSpec(name="c", disk_size=DEFAULT_DISK_SIZE_GB))
    assert "ephemeral-storage" not in default.get("requests", {})
    assert resources(ClusterSpec(name="c", disk_size=50))["requests"]["ephemeral-storage"] == "50Gi"
