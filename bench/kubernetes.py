"""Benchmark: Sortie's Kubernetes clusters through the real provider against a real API server (the test cluster:
etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok's simulated nodes on loopback).

    .venv/bin/python bench/kubernetes.py [--runs 3]

Prints: launch -> pods Running (`up` of a 1-node cluster stack), preemption -> Running again (the pod deleted,
`refresh` sees it gone, `up` makes it again), `destroy` (namespace finalized), the provider plugin's start cost
(process start to its gRPC port) against the local cloud's dynamic-provider host, and a no-change `preview` of a
Kubernetes stack against one of a local-cloud stack (the per-operation overhead of each provider).
kwok runs no containers: there "Running" is the pod's status as the control plane reports it.

Then managed jobs through the controller, the same on both infras (poll every 1 s, grace 2): on a real node of the
test cluster (a kubelet with containerd and runc, tests/kube_node.py, when this machine can run one) and on the
local cloud: launch -> RUNNING (submit to the run's first line of output), and preemption -> RUNNING again (the pod
deleted, or the local node preempted, to the run's output again), with the phases from the job's event log.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def plugin_start(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from starting a provider plugin to the port it prints (the engine's handshake)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    took = time.perf_counter() - t0
    proc.kill()
    proc.wait()
    if not line.strip().isdigit():
        raise RuntimeError(f"{argv[0]} printed {line!r}, not a port")
    return took


def delete_pods(kube, selector: str) -> None:
    """Delete the pods a label selector names, at once (a preemption)."""
    for pod in kube.items(f"/api/v1/pods?labelSelector={selector}"):
        meta = pod["metadata"]
        kube.api("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}?gracePeriodSeconds=0")


def job_cycles(label: str, home: Path, runs: int, preempt) -> None:
    """Managed jobs through the controller: submit -> first output (RUNNING), preempt -> output again."""
    from orchestrator.service import JobService
    from orchestrator.spec import load_yaml_text

    home.mkdir(parents=True, exist_ok=True)
    (home / "config.yaml").write_text("controller:\n  poll_interval_seconds: 1\n  grace_misses: 2\n")
    os.environ["SORTIE_HOME"] = str(home)
    service = JobService(home)
    infra = "kubernetes" if label.startswith("kubernetes") else "local"
    spot = "" if infra == "kubernetes" else "  use_spot: true\n"  # the test node is not a spot node

    def outputs(job_id: int) -> int:
        return sum("start" in line for line in service.log_lines(service.resolve(job_id), follow=False))

    def wait_outputs(job_id: int, count: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while outputs(job_id) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: job {job_id} never printed 'start' x{count}")
            time.sleep(0.1)

    launch, back, phases = [], [], []
    try:
        for _ in range(runs):
            t0 = time.time()
            (job_id,) = service.launch(load_yaml_text(
                f"resources:\n  infra: {infra}\n  cpus: 1+\n{spot}run: echo start; sleep 600\n"))
            wait_outputs(job_id, 1)
            launch.append(time.time() - t0)
            attempt = service.store.open_attempts([job_id])[job_id]
            t1 = time.time()
            preempt(job_id, attempt.stack_name)
            wait_outputs(job_id, 2)
            back.append(time.time() - t1)
            events = {e.what: e.at for e in service.store.events(job_id) if e.at >= t1}
            phases.append((events.get("preempted", t1) - t1, events.get("destroyed", t1) - events.get("preempted", t1),
                           events.get("provisioned", t1) - events.get("destroyed", t1)))
            service.cancel([job_id])
            while service.store.job(job_id).status != "CANCELLED":
                time.sleep(0.2)
    finally:
        subprocess.run([str(Path(sys.executable).parent / "sortie"), "controller", "stop"], env={**os.environ},
                       stdout=subprocess.DEVNULL, check=False)
    mid = [statistics.median(col) for col in zip(*phases, strict=True)]
    print(f"{label}: launch -> RUNNING (first output) {med(launch)}")
    print(f"{label}: preemption -> RUNNING again {med(back)}; phases (median): detection {mid[0]:.1f}s, "
          f"destroy {mid[1]:.1f}s, placement + up {mid[2]:.1f}s")
    print(f"{label}: left behind: {[s.name for s in service.store.live_stacks()] or 'nothing'}")


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}s (runs: {', '.join(f'{v:.2f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from orchestrator.infra.engine import engine_env, install_engine
    from orchestrator.infra.kube_binaries import install_kube_binaries
    from orchestrator.infra.provider_plugins import install_plugin
    from orchestrator.infra.pulumi_driver import PulumiStackDriver
    from stacks.spec import ClusterSpec, StackProgram, new_cluster_token
    from tests.support.kube_cluster import kube_cluster

    engine, _ = install_engine()
    plugin, _ = install_plugin("kubernetes")
    _, built = install_kube_binaries()
    print("binaries ready (" + (f"built in {built:.0f}s" if built > 1 else "cached") + ")")
    root = Path(tempfile.mkdtemp(prefix="sortie-bench-kube-"))
    home = root / "home"
    home.mkdir()
    os.environ["SORTIE_HOME"] = str(home)
    t0 = time.perf_counter()
    with kube_cluster(root / "cluster") as kube:
        print(f"control plane up in {time.perf_counter() - t0:.1f}s")
        kube.add_node("kwok-0", cpu="32", memory="128Gi")
        os.environ["KUBECONFIG"] = str(kube.kubeconfig)
        driver = PulumiStackDriver(home)
        env = {**os.environ, **engine_env(home, engine=engine)}
        kube_start = [plugin_start([str(plugin.path)], env) for _ in range(args.runs)]
        shim = engine.bin_dir / "pulumi-resource-pulumi-python"
        local_start = [plugin_start([str(shim)], env) for _ in range(args.runs)]
        print(f"plugin start to port: kubernetes {med(kube_start)}; local cloud's Python host {med(local_start)}")

        launch, preempt, destroy, previews = [], [], [], []
        for run in range(args.runs):
            spec = ClusterSpec(name=f"sortie-bench-{run}", infra="kubernetes", instance_type="1CPU--1GB",
                               token=new_cluster_token())
            program = StackProgram("cluster", spec)
            t = time.perf_counter()
            driver.up(spec.name, program)
            launch.append(time.perf_counter() - t)
            t = time.perf_counter()
            driver.preview(spec.name, program)
            previews.append(time.perf_counter() - t)
            t = time.perf_counter()
            delete_pods(kube, f"sortie-cluster%3Dsortie-bench-{run}")
            kube.wait("pod gone", lambda r=run: not kube.items(f"/api/v1/namespaces/sortie-bench-{r}/pods"))
            gone = driver.refresh(spec.name).gone
            assert gone, "refresh did not see the pod gone"
            driver.up(spec.name, program)
            preempt.append(time.perf_counter() - t)
            t = time.perf_counter()
            driver.destroy(spec.name)
            destroy.append(time.perf_counter() - t)
        print(f"launch -> pod Running (up, 1 node): {med(launch)}")
        print(f"preemption -> Running again (delete pod, refresh, up): {med(preempt)}")
        print(f"destroy (namespace finalized): {med(destroy)}")
        print(f"no-change preview, kubernetes stack: {med(previews)}")

    local_previews = []
    spec = ClusterSpec(name="sortie-bench-local", token=new_cluster_token(), local_root=str(home / "local"))
    program = StackProgram("cluster", spec)
    driver.up(spec.name, program)
    for _ in range(args.runs):
        t = time.perf_counter()
        driver.preview(spec.name, program)
        local_previews.append(time.perf_counter() - t)
    driver.destroy(spec.name)
    print(f"no-change preview, local-cloud stack: {med(local_previews)}")
    print(f"left behind: {driver.list_stacks() or 'nothing'}")

    from orchestrator.infra.local_cloud import LocalCloud
    from tests.support.kube_node import node_unavailable, real_node

    why_not = node_unavailable()
    if why_not:
        print(f"kubernetes (real node): not measured: {why_not}")
    else:
        with kube_cluster(root / "node-cluster") as kube, real_node(kube):
            os.environ["KUBECONFIG"] = str(kube.kubeconfig)
            job_cycles("kubernetes (real node)", root / "home-kube", args.runs,
                       lambda job_id, _stack: delete_pods(kube, f"sortie-job%3D{job_id}"))
    local_home = root / "home-local"
    job_cycles("local cloud", local_home, args.runs,
               lambda _job_id, stack: LocalCloud(local_home / "local").preempt_cluster(stack))
    print(f"load average after: {os.getloadavg()[0]:.1f} (cores: {os.cpu_count()})")


if __name__ == "__main__":
    main()
