"""A managed job that really runs in a pod: the test control plane plus a real node (a kubelet built from the Go
module proxy, Debian's containerd and runc, the CNI bridge; tests/kube_node.py), the real provider, and the
controller reaching the pod's agent over the bridge. The job's `setup` and `run` execute inside the container and
its logs come back; deleting the pod is a preemption the job recovers from."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import write
from tests.kube_cluster import KubeCluster, kube_cluster
from tests.kube_node import real_node

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.environ.get("SORTIE_TEST_KUBERNETES") != "1",
    reason="opt-in (SORTIE_TEST_KUBERNETES=1): the provider plugin's cold build has not yet run green here")]


@pytest.fixture(scope="module")
def node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    with kube_cluster(tmp_path_factory.mktemp("kube-node")) as cluster, real_node(cluster):
        yield cluster


def test_a_job_runs_in_a_real_pod_and_recovers_from_its_deletion(
        node_cluster: KubeCluster, sortie_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.provider_plugins import install_plugin

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
