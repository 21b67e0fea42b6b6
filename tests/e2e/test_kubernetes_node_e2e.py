"""A managed job that really runs in a pod: the test control plane plus a real node (a kubelet built from the Go
module proxy, Debian's containerd and runc, the CNI bridge; tests/support/kube_node.py), the real provider, and the
controller reaching the pod's agent over the bridge. The job's `setup` and `run` execute inside the container and
its logs come back; deleting the pod is a preemption the job recovers from."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.e2e import write
from tests.support.kube_cluster import KubeCluster, kube_cluster
from tests.support.kube_node import node_unavailable, real_node

_WHY_NOT = node_unavailable()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_WHY_NOT is not None,
                                                  reason=f"this machine cannot run a real node: {_WHY_NOT}")]


@pytest.fixture(scope="module")
def node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    with kube_cluster(tmp_path_factory.mktemp("kube-node")) as cluster, real_node(cluster):
        yield cluster


def test_a_job_runs_in_a_real_pod_and_recovers_from_its_deletion(
        node_cluster: KubeCluster, sortie_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.infra.provider_plugins import install_plugin

    install_plugin("kubernetes")
    monkeypatch.setenv("KUBECONFIG", str(node_cluster.kubeconfig))
    sortie = sortie_cli("controller:\n  poll_interval_seconds: 0.5\n  tick_seconds: 0.2\n  grace_misses: 2\n")
    sortie.env["KUBECONFIG"] = str(node_cluster.kubeconfig)
    yaml = write(tmp_path, "k.yaml", "resources:\n  infra: kubernetes\n  job_recovery: {max_restarts_on_errors: 0}\n"
                 "setup: echo setup-in-pod $(python3 -c 'import sys; print(sys.version_info[:2])')\n"
                 "run: echo run-in-pod rank=$SKYPILOT_NODE_RANK host=$(hostname)\n")
    out = sortie.run("jobs", "launch", "-y", yaml, timeout=420).stdout
    job_id = int(re.search(r"submitted: ID (\d+)", out).group(1))
    assert f"Managed job finished: {job_id} (status: SUCCEEDED)" in out, out
    logs = sortie.logs(job_id)
    assert "setup-in-pod (3, 11)" in logs and f"run-in-pod rank=0 host=sortie-job-{job_id}-t0-1-0" in logs

    # Preemption: the pod is deleted while the job runs; refresh sees it gone and the job runs again.
    long_yaml = write(tmp_path, "long.yaml", "resources:\n  infra: kubernetes\n"
                      "run: echo started; sleep 600\n")
    job_id = sortie.launch(long_yaml)
    sortie.wait(job_id, {"RUNNING"}, timeout=300)
    sortie.wait_for_log(job_id, "started", timeout=120)
    (pod,) = node_cluster.items(f"/api/v1/pods?labelSelector=sortie-job%3D{job_id}")
    meta = pod["metadata"]
    node_cluster.api("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}?gracePeriodSeconds=0")
    sortie.wait_for_log(job_id, "started", count=2, timeout=300)
    assert sortie.job(job_id)["tasks"][0]["recoveries"] >= 1
    sortie.run("jobs", "cancel", "-y", str(job_id))
    assert sortie.wait(job_id, timeout=180)["status"] == "CANCELLED"


def _pool_yaml(tmp_path: Path, tag: str, *, tier: str = "a", image: str | None = None, cpus: str = "1+") -> str:
    image_line = f"  image_id: docker:{image}\n" if image else ""
    return write(tmp_path, f"pool-{tag}.yaml", f"""\
pool:
  workers: 1
resources:
  infra: kubernetes
  cpus: {cpus}
{image_line}config:
  kubernetes:
    pod_config:
      metadata:
        labels: {{tier: {tier}}}
setup: echo ready
""")


def test_pool_apply_dry_run_shows_the_real_providers_preview(
        node_cluster: KubeCluster, sortie_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pool apply --dry-run` on a live Kubernetes worker previews the new spec through the real provider: a label
    change is an update in place (the plan follows the provider's diff: mode `update`), an image or size change a
    replace (the rolling recreate stays). Nothing changes on the cluster."""
    from orchestrator.infra.provider_plugins import install_plugin

    install_plugin("kubernetes")
    kube = node_cluster
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
    sortie = sortie_cli("controller:\n  poll_interval_seconds: 0.5\n  tick_seconds: 0.2\n")
    sortie.env["KUBECONFIG"] = str(kube.kubeconfig)
    sortie.run("jobs", "pool", "apply", "-y", "-p", "kp", _pool_yaml(tmp_path, "v1"), timeout=180)
    selector = "/api/v1/pods?labelSelector=sortie-pool%3Dkp"
    (pod,) = kube.wait("the worker's pod, Running", lambda: [
        p for p in kube.items(selector) if p.get("status", {}).get("phase") == "Running"], timeout=180)
    assert pod["metadata"]["labels"]["tier"] == "a"
    def worker() -> dict | None:
        found = json.loads(sortie.run("jobs", "pool", "status", "kp", "--json").stdout)
        workers = found[0]["workers"] if found else []
        return workers[0] if workers and workers[0]["status"] == "READY" else None

    stack = kube.wait("the worker READY (its setup ran in the pod)", worker, timeout=240)["stack"]

    def dry_run(yaml: str) -> dict:
        out = sortie.run("jobs", "pool", "apply", "--dry-run", "--json", "-p", "kp", yaml, timeout=300).stdout
        return json.loads(out)

    def pod_ops(plan: dict) -> list[str]:
        return [r["op"] for r in plan["previews"][stack]["resources"] if r["type"] == "kubernetes:core/v1:Pod"]

    relabel = dry_run(_pool_yaml(tmp_path, "v2", tier="b"))
    assert pod_ops(relabel) == ["update"], relabel["previews"]
    assert relabel["mode"] == "update" and relabel["keep"] == [stack], relabel
    reimage = dry_run(_pool_yaml(tmp_path, "v3", image="python:3.12-slim"))
    assert pod_ops(reimage) == ["replace"] and reimage["mode"] == "recreate", reimage
    assert any("the provider replaces resources of " + stack in note for note in reimage["notes"])
    resized = dry_run(_pool_yaml(tmp_path, "v4", cpus="0.5+"))
    assert pod_ops(resized) == ["replace"] and resized["mode"] == "recreate", resized
    (still,) = kube.items(selector)  # a dry run changes nothing
    assert (still["metadata"]["name"], still["metadata"]["labels"]["tier"]) == (pod["metadata"]["name"], "a")
    # Applied, the label change is an update of the live pod: same pod (uid), new label, the worker stays READY.
    sortie.run("jobs", "pool", "apply", "-y", "-p", "kp", _pool_yaml(tmp_path, "v2", tier="b"), timeout=300)
    (relabelled,) = kube.wait("the pod relabelled in place", lambda: [
        p for p in kube.items(selector) if p["metadata"]["labels"].get("tier") == "b"], timeout=180)
    assert relabelled["metadata"]["uid"] == pod["metadata"]["uid"]
    assert kube.wait("the worker READY", worker, timeout=60)["stack"] == stack
    sortie.run("jobs", "pool", "down", "-y", "kp")
    kube.wait("the pool to go down", lambda: not json.loads(
        sortie.run("jobs", "pool", "status", "--json").stdout), timeout=180)
    namespace = pod["metadata"]["namespace"]
    kube.wait("the worker's namespace to be deleted",
              lambda: kube.api("GET", f"/api/v1/namespaces/{namespace}")[0] == 404, timeout=120)
