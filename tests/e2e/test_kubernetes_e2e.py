"""Kubernetes for real: Sortie's cluster and pool-worker programs through the real `pulumi-resource-kubernetes`
against a real kube-apiserver (with etcd, the controller manager, the scheduler and kwok's simulated nodes, from
tests/support/kube_cluster.py). Nothing here is mocked: the API server validates and stores every object, the scheduler
binds the pods, the namespace controller finalizes deletions.

kwok's nodes run no containers: these tests assert the objects, their specs and their cleanup, and what Sortie
sees when a pod disappears; a job's `run` executing inside a pod needs a real kubelet (see the README).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.config import KubernetesConfig, SortieConfig
from stacks.spec import ClusterSpec, StackProgram
from tests.support.kube_cluster import KubeCluster, kube_cluster, kubeconfig_yaml

pytestmark = [pytest.mark.e2e]

TOKEN = "kube-e2e-token-7c1f9a0d2b"  # must never appear in clear in stack state


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    with kube_cluster(tmp_path_factory.mktemp("kube")) as cluster:
        cluster.add_node("kwok-cpu", cpu="8", memory="32Gi")
        cluster.add_node("kwok-gpu", cpu="16", memory="64Gi", gpus=2,
                         labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                         # As GKE and the GPU operator do: only pods that tolerate it (GPU pods) land there.
                         taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])
        yield cluster


@pytest.fixture(scope="module")
def k8s_plugin():
    """The provider plugin, built from the Go module proxy when this machine has none (a failure fails)."""
    from orchestrator.infra.provider_plugins import install_plugin

    info, _how = install_plugin("kubernetes")
    return info


@pytest.fixture
def kdriver(make_driver, kube: KubeCluster, k8s_plugin, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
    return make_driver()


def _spec(name: str, **kw) -> ClusterSpec:
    base = dict(name=name, infra="kubernetes", region="sortie-test", num_nodes=1, instance_type="4CPU--8GB",
                token=TOKEN, labels={"sortie-job": "7"}, tags={"team": "ml-infra"}, job_id="7", attempt="1")
    return ClusterSpec(**{**base, **kw})


def _pods(kube: KubeCluster, namespace: str) -> list[dict]:
    return kube.items(f"/api/v1/namespaces/{namespace}/pods")


def _namespace_gone(kube: KubeCluster, namespace: str) -> bool:
    return kube.api("GET", f"/api/v1/namespaces/{namespace}")[0] == 404


def test_control_plane_reports_its_stamped_version(kube: KubeCluster) -> None:
    from orchestrator.infra.kube_binaries import KUBERNETES_VERSION

    assert kube.get("/version")["gitVersion"] == f"v{KUBERNETES_VERSION}"


def test_cluster_objects_through_the_real_provider_and_destroy_removes_them(kube: KubeCluster, kdriver) -> None:
    spec = _spec("sortie-k8s-7-1", num_nodes=2, image="docker:python:3.12-slim")
    up = kdriver.up(spec.name, StackProgram("cluster", spec))
    namespace = "sortie-k8s-7-1"
    ns = kube.get(f"/api/v1/namespaces/{namespace}")
    assert ns["metadata"]["labels"]["sortie"] == "owner" and ns["metadata"]["labels"]["team"] == "ml-infra"

    secret = kube.get(f"/api/v1/namespaces/{namespace}/secrets/sortie-k8s-7-1-token")
    assert base64.b64decode(secret["data"]["token"]).decode() == TOKEN
    service = kube.get(f"/api/v1/namespaces/{namespace}/services/sortie-k8s-7-1")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"sortie-cluster": "sortie-k8s-7-1"}

    pods = sorted(_pods(kube, namespace), key=lambda p: p["metadata"]["labels"]["sortie-rank"])
    # The provider names each pod (`<resource>-<8 random>`); the hostname is the stable `<cluster>-<rank>`.
    assert [p["metadata"]["name"][:-9] for p in pods] == ["sortie-k8s-7-1-node-0", "sortie-k8s-7-1-node-1"]
    for rank, pod in enumerate(pods):
        labels = pod["metadata"]["labels"]
        assert (labels["sortie-rank"], labels["sortie-job"], labels["sortie-attempt"], labels["team"]) == (
            str(rank), "7", "1", "ml-infra")
        container = pod["spec"]["containers"][0]
        assert container["image"] == "python:3.12-slim"
        assert container["resources"]["requests"] == {"cpu": "4", "memory": "8Gi"}
        assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "sortie-k8s-7-1-token"
        assert (pod["spec"]["hostname"], pod["spec"]["subdomain"]) == (f"sortie-k8s-7-1-{rank}", "sortie-k8s-7-1")
        assert pod["spec"]["nodeName"] in ("kwok-cpu", "kwok-gpu")  # bound by the real scheduler
        assert pod["status"]["phase"] == "Running"
    nodes = up.outputs["nodes"]
    assert [n["rank"] for n in nodes] == [0, 1] and all(n["ip"] for n in nodes)
    assert [n["node_id"] for n in nodes] == [p["metadata"]["name"] for p in pods]

    (state_file,) = (kdriver.home / "pulumi-backend").rglob(f"{spec.name}.json")
    assert json.loads(state_file.read_text())["checkpoint"]["latest"]["resources"]
    assert TOKEN not in state_file.read_text()  # the Secret's data and the output are secrets in the state

    kdriver.destroy(spec.name)
    assert _namespace_gone(kube, namespace)


def test_a_deleted_pod_is_gone_for_refresh_and_up_brings_it_back(kube: KubeCluster, kdriver) -> None:
    spec = _spec("sortie-k8s-8-1")
    program = StackProgram("cluster", spec)
    kdriver.up(spec.name, program)
    namespace = "sortie-k8s-8-1"
    (pod,) = _pods(kube, namespace)
    status, _ = kube.api("DELETE", f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}"
                                   "?gracePeriodSeconds=0")
    assert status == 200
    kube.wait("the pod to be gone", lambda: not _pods(kube, namespace))
    refreshed = kdriver.refresh(spec.name)
    assert [r.type for r in refreshed.gone] == ["kubernetes:core/v1:Pod"]
    assert {r.type for r in refreshed.alive} >= {"kubernetes:core/v1:Secret", "kubernetes:core/v1:Namespace"}
    kdriver.up(spec.name, program)  # recovery in place: the stack makes the missing pod again
    (pod,) = _pods(kube, namespace)
    assert pod["status"]["phase"] == "Running"
    kdriver.destroy(spec.name)
    assert _namespace_gone(kube, namespace)


def test_a_deleted_node_takes_its_pod_and_refresh_sees_it_gone(kube: KubeCluster, kdriver) -> None:
    """A node that disappears (a spot VM reclaimed, a node pool scaled down): the pod garbage collector removes the
    pods bound to it, `refresh` sees the pod gone, and `up` makes it again on a node that can hold it."""
    kube.add_node("kwok-spare", cpu="4", memory="16Gi", labels={"sortie.dev/spot": "true"},
                  taints=[{"key": "sortie.dev/spot", "value": "true", "effect": "NoSchedule"}])
    spec = _spec("sortie-k8s-12-1", instance_type="4CPU--16GB", use_spot=True,
                 pod_config={"spec": {"nodeSelector": {"kubernetes.io/hostname": "kwok-spare"}}})
    program = StackProgram("cluster", spec)
    kdriver.up(spec.name, program)
    namespace = "sortie-k8s-12-1"
    (pod,) = _pods(kube, namespace)
    assert pod["spec"]["nodeName"] == "kwok-spare"
    kube.delete_node("kwok-spare")
    kube.wait("the pod of the deleted node to be collected", lambda: not _pods(kube, namespace), timeout=150)
    refreshed = kdriver.refresh(spec.name)
    assert [r.type for r in refreshed.gone] == ["kubernetes:core/v1:Pod"]
    kube.add_node("kwok-spare", cpu="4", memory="16Gi", labels={"sortie.dev/spot": "true"},
                  taints=[{"key": "sortie.dev/spot", "value": "true", "effect": "NoSchedule"}])
    kdriver.up(spec.name, program)
    (again,) = _pods(kube, namespace)
    assert again["metadata"]["uid"] != pod["metadata"]["uid"] and again["status"]["phase"] == "Running"
    kdriver.destroy(spec.name)
    kube.delete_node("kwok-spare")
    assert _namespace_gone(kube, namespace)


def test_pool_worker_preview_is_the_providers_diff(kube: KubeCluster, kdriver) -> None:
    spec = _spec("sortie-pool-p-w1", labels={"tier": "a"})
    kdriver.up(spec.name, StackProgram("pool-worker", spec, pool="p", worker_index=1))

    def pod_op(changed: ClusterSpec) -> str:
        preview = kdriver.preview(spec.name, StackProgram("pool-worker", changed, pool="p", worker_index=1))
        return next(c.op for c in preview.changes if c.type == "kubernetes:core/v1:Pod")

    assert pod_op(spec) == "same"
    assert pod_op(dataclasses.replace(spec, labels={"tier": "b"})) == "update"  # labels change in place
    assert pod_op(dataclasses.replace(spec, image="docker:python:3.12-slim")) == "replace"
    assert pod_op(dataclasses.replace(spec, instance_type="2CPU--4GB")) == "replace"
    kdriver.destroy(spec.name)


def test_capacity_offers_come_from_the_nodes(kube: KubeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.infra.clouds import check
    from orchestrator.infra.kube_capacity import kubernetes_offers
    from orchestrator.policy.optimizer import plan_for

    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
    config = SortieConfig()
    offers = {o.instance_type: o for o in kubernetes_offers(config)}
    assert set(offers) == {"8CPU--32GB", "16CPU--64GB--2H100"}
    assert offers["16CPU--64GB--2H100"].accelerators == {"H100": 2.0}
    assert offers["8CPU--32GB"].region == "sortie-test"
    (kube_check,) = [c for c in check(config) if c.cloud == "kubernetes"]
    assert kube_check.enabled and kube.server in kube_check.reason
    plan = plan_for([{"infra": "kubernetes", "accelerators": {"H100": 2}}], 1, config, ordered=False,
                    enabled=("kubernetes",))
    assert plan.chosen is not None and plan.chosen.offer.instance_type == "16CPU--64GB--2H100"
    too_big = plan_for([{"infra": "kubernetes", "accelerators": {"H100": 8}}], 1, config, ordered=False,
                       enabled=("kubernetes",))
    assert too_big.chosen is None


def _dead_kubeconfig(tmp_path: Path, kube: KubeCluster) -> Path:
    from tests.support.kube_cluster import free_port

    dead = tmp_path / "dead-kubeconfig"
    dead.write_text(kubeconfig_yaml(f"https://127.0.0.1:{free_port()}", kube.pki))
    return dead


def test_unreachable_api_server_offers_nothing_and_says_why(tmp_path: Path, kube: KubeCluster) -> None:
    from orchestrator.infra.kube_capacity import KubeUnreachable, kubernetes_offers
    from orchestrator.policy.optimizer import plan_for

    config = SortieConfig(kubernetes=KubernetesConfig(kubeconfig=str(_dead_kubeconfig(tmp_path, kube))))
    with pytest.raises(KubeUnreachable) as err:
        kubernetes_offers(config)
    assert "is unreachable" in str(err.value) and "\n" not in str(err.value)
    plan = plan_for([{"infra": "kubernetes"}], 1, config, ordered=False, enabled=("kubernetes",))
    assert plan.chosen is None and "kubernetes: the API server https://127.0.0.1:" in (plan.infeasible or "")


def test_unreachable_api_server_fails_up_with_one_line(tmp_path: Path, kube: KubeCluster, kdriver) -> None:
    from orchestrator.errors import StackOperationError

    spec = _spec("sortie-k8s-9-1", kubeconfig=str(_dead_kubeconfig(tmp_path, kube)))
    with pytest.raises(StackOperationError) as failed:
        kdriver.up(spec.name, StackProgram("cluster", spec))
    assert "connection refused" in failed.value.message.lower() and "\n" not in failed.value.message
    assert TOKEN not in str(failed.value)
    if spec.name in kdriver.list_stacks():
        kdriver.remove(spec.name)


def test_forbidden_namespace_fails_clearly_and_leaves_nothing(tmp_path: Path, kube: KubeCluster, kdriver) -> None:
    from orchestrator.errors import StackOperationError

    for ns in ("team-a", "team-b"):
        assert kube.api("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})[0] in (201, 409)
    kube.api("POST", "/api/v1/namespaces/team-a/serviceaccounts", {"metadata": {"name": "runner"}})
    kube.api("POST", "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings", {
        "metadata": {"name": "runner-edit"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                                          "name": "edit"},
        "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": "team-a"}]})
    status, token = kube.api("POST", "/api/v1/namespaces/team-a/serviceaccounts/runner/token",
                             {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                              "spec": {"expirationSeconds": 3600}})
    assert status == 201, token
    restricted = tmp_path / "restricted-kubeconfig"
    restricted.write_text(kubeconfig_yaml(kube.server, kube.pki, user="runner", token=token["status"]["token"]))
    spec = _spec("sortie-k8s-10-1", kubeconfig=str(restricted), kube_namespace="team-b")
    with pytest.raises(StackOperationError) as failed:
        kdriver.up(spec.name, StackProgram("cluster", spec))
    assert "forbidden" in failed.value.message.lower() and "team-b" in failed.value.message
    assert not kube.items("/api/v1/namespaces/team-b/secrets?labelSelector=sortie%3Downer")
    assert not kube.items("/api/v1/namespaces/team-b/pods")
    allowed = dataclasses.replace(spec, kube_namespace="team-a")  # its own namespace works with the same token
    kdriver.up(allowed.name, StackProgram("cluster", allowed))
    assert [p["spec"]["hostname"] for p in _pods(kube, "team-a")] == ["sortie-k8s-10-1-0"]
    kdriver.destroy(allowed.name)
    assert not _pods(kube, "team-a")


def _ports_service(kube: KubeCluster, namespace: str, name: str) -> dict | None:
    status, body = kube.api("GET", f"/api/v1/namespaces/{namespace}/services/{name}-ports")
    return body if status == 200 else None


def test_ports_are_a_nodeport_service_on_the_head_pod_and_destroy_removes_it(kube: KubeCluster, kdriver) -> None:
    """`ports` on Kubernetes (config kubernetes.ports: nodeport): a Service the API server gives node ports,
    selecting the head pod only; the endpoints are that pod's node and each node port. In a namespace the stack
    does not own, so the Service itself must be deleted by `destroy` (not swept with a namespace)."""
    kube.api("POST", "/api/v1/namespaces", {"metadata": {"name": "team-ports"}})
    spec = _spec("sortie-k8s-12-1", num_nodes=2, ports=("8080", "9000-9001"), kube_ports="nodeport",
                 kube_namespace="team-ports", kube_pod_timeout_s=120)
    up = kdriver.up(spec.name, StackProgram("cluster", spec))
    service = _ports_service(kube, "team-ports", spec.name)
    assert service is not None
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["selector"] == {"sortie-cluster": spec.name, "sortie-rank": "0"}
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert sorted(ports) == [8080, 9000, 9001] and all(p["targetPort"] == p["port"] for p in ports.values())
    assert all(30000 <= p["nodePort"] <= 32767 for p in ports.values())  # given by the real API server
    head = next(p for p in _pods(kube, "team-ports") if p["metadata"]["labels"]["sortie-rank"] == "0")
    endpoints = up.outputs["nodes"][0]["endpoints"]
    assert endpoints == {str(port): f"{head['status']['hostIP']}:{p['nodePort']}" for port, p in ports.items()}
    assert "endpoints" not in up.outputs["nodes"][1]
    kdriver.destroy(spec.name)
    assert _ports_service(kube, "team-ports", spec.name) is None
    assert not _pods(kube, "team-ports")


def test_ports_as_a_load_balancer_wait_for_its_address(kube: KubeCluster, kdriver) -> None:
    """The default mode (SkyPilot's): a LoadBalancer Service; `up` waits for its address, which this test gives as a
    cloud's load balancer controller would (the test cluster has none), and the endpoints are that address."""
    import threading

    spec = _spec("sortie-k8s-13-1", ports=("8888",), kube_pod_timeout_s=120)
    namespace = spec.name
    stop = threading.Event()

    def balance() -> None:
        while not stop.is_set():
            service = _ports_service(kube, namespace, spec.name)
            if service is not None:
                kube.api("PATCH", f"/api/v1/namespaces/{namespace}/services/{spec.name}-ports/status",
                         {"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}},
                         content_type="application/merge-patch+json")
                return
            stop.wait(0.5)

    controller = threading.Thread(target=balance, daemon=True)
    controller.start()
    try:
        up = kdriver.up(spec.name, StackProgram("cluster", spec))
    finally:
        stop.set()
        controller.join(timeout=5)
    service = _ports_service(kube, namespace, spec.name)
    assert service is not None and service["spec"]["type"] == "LoadBalancer"
    assert up.outputs["nodes"][0]["endpoints"] == {"8888": "198.51.100.7:8888"}
    kdriver.destroy(spec.name)
    assert _namespace_gone(kube, namespace)


def test_a_load_balancer_that_never_gets_an_address_fails_up_in_one_line(kube: KubeCluster, kdriver) -> None:
    """On a cluster that provisions no load balancers (this one), `kubernetes.ports: loadbalancer` fails `up` after
    `pod_timeout_s`, saying so in one line, and the failed `up` leaves nothing (use `nodeport` there)."""
    from orchestrator.errors import InfraUnfitError

    spec = _spec("sortie-k8s-14-1", ports=("8888",), kube_pod_timeout_s=30)
    with pytest.raises(InfraUnfitError) as failed:  # the controller ends the launch FAILED_PRECHECKS: no retry
        kdriver.up(spec.name, StackProgram("cluster", spec))
    message = failed.value.message
    assert "\n" not in message
    assert "Service sortie-k8s-14-1-ports (the task's ports) got no load balancer address" in message, message
    assert "kubernetes.ports: nodeport" in message and "cleanup failed" not in message
    assert _namespace_gone(kube, spec.name)


def test_a_pod_no_node_can_hold_is_no_capacity(kube: KubeCluster, kdriver) -> None:
    from orchestrator.errors import NoCapacityError

    spec = _spec("sortie-k8s-11-1", instance_type="64CPU--512GB", kube_pod_timeout_s=15)
    with pytest.raises(NoCapacityError) as failed:
        kdriver.up(spec.name, StackProgram("cluster", spec))
    assert "Insufficient cpu" in failed.value.message and "\n" not in failed.value.message
    assert "failed: FailedScheduling: 0/" in failed.value.message  # the message, not the engine's progress line
    assert _namespace_gone(kube, "sortie-k8s-11-1")  # the failed up cleaned up after itself


def test_jobs_launch_infra_kubernetes_makes_real_objects_and_cancel_removes_them(
        kube: KubeCluster, k8s_plugin, sortie_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sortie jobs launch --infra kubernetes` through the controller: the optimizer places the job on the
    cluster's capacity, the real provider makes its objects; cancel destroys them. (kwok runs no agent, so the job
    never reaches RUNNING here: the controller waits for an agent that a real kubelet would start.)"""
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
    sortie = sortie_cli("controller:\n  poll_interval_seconds: 0.5\n  tick_seconds: 0.2\n"
                        "cloud:\n  tags: {team: ml-infra}\n")
    sortie.env["KUBECONFIG"] = str(kube.kubeconfig)
    checked = next(line for line in sortie.run("check").stdout.splitlines() if line.strip().startswith("kubernetes"))
    assert "enabled" in checked and "disabled" not in checked and kube.server in checked, checked
    job_id = sortie.launch("--infra", "kubernetes", "--cpus", "4+", "echo hi")
    selector = f"/api/v1/pods?labelSelector=sortie-job%3D{job_id}"
    (pod,) = kube.wait("the job's pod, bound to a node", lambda: [
        p for p in kube.items(selector) if p["spec"].get("nodeName")], timeout=180)
    labels = pod["metadata"]["labels"]
    assert (labels["sortie"], labels["team"], labels["sortie-attempt"]) == ("owner", "ml-infra", "1")
    namespace = pod["metadata"]["namespace"]
    # The one CPU-only shape (a task without accelerators gets no GPU node), sized as the node's allocatable.
    assert namespace.startswith("sortie-") and pod["spec"]["nodeName"] == "kwok-cpu"
    assert pod["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
    sortie.run("jobs", "cancel", "-y", str(job_id))
    assert sortie.wait(job_id, timeout=180)["status"] == "CANCELLED"
    kube.wait("the job's namespace to be deleted", lambda: _namespace_gone(kube, namespace), timeout=120)


def test_engine_install_and_status_list_the_plugin(k8s_plugin, sortie_home: Path) -> None:
    from tests.support.e2e import Sortie

    sortie = Sortie(sortie_home)
    out = sortie.run("engine", "install", "--plugin", "kubernetes", timeout=300).stdout
    assert f"Provider plugin kubernetes v{k8s_plugin.version} already installed: {k8s_plugin.path}" in out
    status = sortie.run("engine", "status").stdout
    assert f"plugin:   kubernetes v{k8s_plugin.version}: {k8s_plugin.path}" in status
    bad = sortie.run("engine", "install", "--plugin", "aws", check=False)
    assert bad.returncode != 0 and "--plugin 'aws': Sortie builds only kubernetes" in bad.stderr
    assert "Traceback" not in bad.stderr



def test_a_job_whose_pod_stays_pending_goes_to_the_next_infra(
        kube: KubeCluster, k8s_plugin, sortie_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster's CPU node is full (the optimizer still offers its shape): the job's pod stays Pending, the
    provider's error carries the scheduler's message after `pod_timeout_s`, Sortie classes it as no capacity and
    the job runs on the next infra of its `any_of` (the local cloud), with the Kubernetes attempt's namespace gone."""
    from tests.support.e2e import write

    assert kube.api("POST", "/api/v1/namespaces", {"metadata": {"name": "blocker"}})[0] in (201, 409)
    blocker = {"metadata": {"name": "hog", "namespace": "blocker"},
               "spec": {"nodeSelector": {"kubernetes.io/hostname": "kwok-cpu"},
                        "containers": [{"name": "hog", "image": "hog:1",
                                        "resources": {"requests": {"cpu": "7", "memory": "1Gi"}}}]}}
    assert kube.api("POST", "/api/v1/namespaces/blocker/pods", blocker)[0] == 201
    try:
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
        sortie = sortie_cli("controller:\n  poll_interval_seconds: 0.5\n  tick_seconds: 0.2\n"
                            "kubernetes:\n  pod_timeout_s: 10\n")
        sortie.env["KUBECONFIG"] = str(kube.kubeconfig)
        yaml = write(tmp_path, "failover.yaml", "resources:\n  cpus: 2+\n  any_of:\n    - infra: kubernetes\n"
                     "    - infra: local\nrun: echo ran-here\n")
        job_id = sortie.launch(yaml)
        job = sortie.wait(job_id, timeout=300)
        controller_log = sortie.logs(job_id, "--controller")
        assert job["status"] == "SUCCEEDED", controller_log
        assert "Insufficient cpu" in controller_log, controller_log
        assert "ran-here" in sortie.logs(job_id)
        kube.wait("no namespace of the job left", lambda: not [
            ns for ns in kube.items("/api/v1/namespaces") if ns["metadata"]["name"].startswith(f"sortie-job-{job_id}-")
        ], timeout=120)
    finally:
        kube.api("DELETE", "/api/v1/namespaces/blocker")
