"""Benchmark: Sortie's Kubernetes clusters through the real provider against a real API server (the test cluster:
etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok's simulated nodes on loopback).

    .venv/bin/python bench/kubernetes.py [--runs 3]

Prints: launch -> pods Running (`up` of a 1-node cluster stack), preemption -> Running again (the pod deleted,
`refresh` sees it gone, `up` makes it again), `destroy` (namespace finalized), the provider plugin's start cost
(process start to its gRPC port) against the local cloud's dynamic-provider host, and a no-change `preview` of a
Kubernetes stack against one of a local-cloud stack (the per-operation overhead of each provider).
kwok runs no containers: "Running" is the pod's status as the control plane reports it.
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
            kube.api("DELETE", f"/api/v1/namespaces/sortie-bench-{run}/pods/sortie-bench-{run}-0?gracePeriodSeconds=0")
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


if __name__ == "__main__":
    main()
