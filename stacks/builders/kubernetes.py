"""Kubernetes nodes: one Pod per node running the node agent (imports pulumi_kubernetes).

Per cluster: a Namespace of its own (`sortie-<cluster>`, deleted with the stack, which takes everything in it)
unless the config names one (`kubernetes.namespace`, used as is: a team's namespace where Sortie may not create
namespaces); a Secret holding the token (a secret Output; the agent reads it from `$SORTIE_AGENT_TOKEN`, which it
removes from its environment before anything runs); a ConfigMap holding the agent's zipapp; and for several nodes
a headless Service, so node `r` is `<cluster>-<r>.<cluster>.<namespace>.svc`. Per node: a Pod (image
`python:3.11-slim` unless `image_id: docker:<image>`) that mounts the ConfigMap and starts the agent, with requests
from `cpus`/`memory` (limits too when they are exact, not `N+`) or from an instance type Sortie named after a
node's allocatable (`8CPU--32GB--1H100`), `nvidia.com/gpu` limits for accelerators,
`node.kubernetes.io/instance-type` as node selector for a real instance type, and for spot: tolerations of the
usual spot taints (`sortie.dev/spot`, GKE, AKS) and a preference for nodes labelled as spot. Every object carries
Sortie's tags as labels.

Where: a region, if any, is the kubeconfig context to use (`kubernetes.kubeconfig` in the config, else
$KUBECONFIG or ~/.kube/config). The agent listens on the Pod IP and is never exposed outside the cluster's network.
A task's `ports` are: a Service `<cluster>-ports` selecting the head pod (rank 0), of type LoadBalancer (config
`kubernetes.ports: loadbalancer`, SkyPilot's default) or NodePort (`nodeport`); the head node's `endpoints` output
says where each port is reached. `network_stack` and `controller_cidr` do not apply.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from orchestrator.errors import UsageError
from orchestrator.infra.agent_bundle import agent_zipapp_base64
from orchestrator.policy.cloud_features import merge_pod_config, port_ranges
from orchestrator.spec.resources import DEFAULT_DISK_SIZE_GB
from stacks.builders import (
    AGENT_DIR,
    BuiltNode,
    CloudNode,
    accelerator,
    agent_command,
    agent_url,
    dns_label,
    location,
    merge_opts,
    node_package_install,
    sortie_tags,
)
from stacks.spec import ClusterSpec

DEFAULT_IMAGE = "python:3.11-slim"
DEFAULT_NAMESPACE = "default"
SPOT_TOLERATIONS = [
    {"key": "sortie.dev/spot", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
    {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal", "value": "spot", "effect": "NoSchedule"},
]
SPOT_NODE_LABELS = [("sortie.dev/spot", "true"), ("cloud.google.com/gke-spot", "true"),
                    ("eks.amazonaws.com/capacityType", "SPOT"), ("karpenter.sh/capacity-type", "spot"),
                    ("kubernetes.azure.com/scalesetpriority", "spot")]
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(\+?)\s*$")


def k8s_labels(tags: dict[str, str]) -> dict[str, str]:
    """Tags as Kubernetes labels: names and values of `[A-Za-z0-9_.-]` (63 at most), alphanumeric at both ends."""
    def clean(text: str) -> str:
        return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:63])

    labels: dict[str, str] = {}
    for key, value in tags.items():
        prefix, _, name = key.rpartition("/")
        name = clean(name)
        if name:
            labels[f"{prefix}/{name}" if prefix else name] = clean(value)
    return labels


def quantity(value: str | None, what: str, unit: str) -> tuple[str | None, bool]:
    """(`value` as a Kubernetes quantity, whether it is exact) from `4`, `4+`, `0.5`."""
    if value is None:
        return None, False
    match = _QUANTITY.match(str(value))
    if match is None:
        raise UsageError(f"{what} {value!r} is not a number (optionally followed by +)")
    return f"{match.group(1)}{unit}", not match.group(2)


def resources(spec: ClusterSpec) -> dict[str, dict[str, str]]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    sized = synthetic_instance(spec.instance_type)
    cpus, memory = (spec.cpus or sized[0], spec.memory or sized[1]) if sized else (spec.cpus, spec.memory)
    for key, raw, unit in (("cpu", cpus, ""), ("memory", memory, "Gi")):
        amount, exact = quantity(raw, key, unit)
        if amount is not None:
            requests[key] = amount
            if exact:
                limits[key] = amount
    if spec.disk_size and spec.disk_size != DEFAULT_DISK_SIZE_GB:
        # Only a size the task asked for: SkyPilot's default OS disk (256 GB) is no pod's need, and as a request
        # it fits few nodes (the scheduler: "Insufficient ephemeral-storage"). SkyPilot requests none.
        requests["ephemeral-storage"] = f"{spec.disk_size}Gi"
    acc = accelerator(spec)
    if acc is not None:
        limits["nvidia.com/gpu"] = str(acc[1])
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def scheduling(spec: ClusterSpec) -> dict[str, object]:
    tolerations: list[dict[str, str]] = []
    placement: dict[str, object] = {}
    if accelerator(spec) is not None:
        tolerations.append(GPU_TOLERATION)
    if spec.instance_type and synthetic_instance(spec.instance_type) is None:
        placement["node_selector"] = {"node.kubernetes.io/instance-type": spec.instance_type}
    if spec.use_spot:
        tolerations.extend(SPOT_TOLERATIONS)
        placement["affinity"] = {"node_affinity": {"preferred_during_scheduling_ignored_during_execution": [
            {"weight": 100, "preference": {"match_expressions": [
                {"key": key, "operator": "In", "values": [value]}]}}
            for key, value in SPOT_NODE_LABELS]}}
    if tolerations:
        placement["tolerations"] = tolerations
    return placement


_SYNTHETIC_TYPE = re.compile(r"^(\d+(?:\.\d+)?)CPU--(\d+(?:\.\d+)?)GB(?:--(\d+)([A-Za-z0-9_.-]+))?$")


def pod_image(spec: ClusterSpec) -> str:
    """The container image: `image_id: docker:<image>` (SkyPilot's form) or a bare image name; else the default."""
    image = (spec.image or "").strip()
    image = image.removeprefix("docker:").strip()
    return image or DEFAULT_IMAGE


def synthetic_instance(instance_type: str | None) -> tuple[str, str] | None:
    """(cpus, memory GiB) of an instance type Sortie names after a node's allocatable (`8CPU--32GB[--1H100]`,
    SkyPilot's form for Kubernetes); None for a real instance type, which becomes a node selector."""
    match = _SYNTHETIC_TYPE.match(instance_type or "")
    return (match.group(1), match.group(2)) if match else None


def namespace_for(spec: ClusterSpec) -> tuple[str, bool]:
    """(namespace, whether this stack creates it): the configured one as is, else one per cluster."""
    configured = spec.kube_namespace or pulumi.Config("sortie").get("namespace")
    if configured:
        return configured, False
    return dns_label(spec.name if spec.name.startswith("sortie") else f"sortie-{spec.name}", 63), True


def build_kubernetes_nodes(spec: ClusterSpec, opts: pulumi.ResourceOptions | None = None) -> list[BuiltNode]:
    context, _zone = location(spec, "kubernetes")
    namespace, own_namespace = namespace_for(spec)
    prefix = dns_label(spec.name, 50)
    labels = k8s_labels(sortie_tags(spec))  # includes sortie-cluster, the headless Service's selector
    base = merge_opts(opts, delete_before_replace=True)
    if context or spec.kubeconfig:
        provider = k8s.Provider(f"{spec.name}-k8s", context=context, kubeconfig=spec.kubeconfig,
                                opts=merge_opts(opts))
        base = merge_opts(base, provider=provider)
    if own_namespace:
        ns = k8s.core.v1.Namespace(f"{spec.name}-ns", metadata={"name": namespace, "labels": labels}, opts=base)
        base = merge_opts(base, depends_on=[ns])
    secret = k8s.core.v1.Secret(
        f"{spec.name}-token", type="Opaque", string_data={"token": pulumi.Output.secret(spec.token)},
        metadata={"name": f"{prefix}-token", "namespace": namespace, "labels": labels}, opts=base,
    )
    agent = k8s.core.v1.ConfigMap(
        f"{spec.name}-agent", binary_data={"agent.pyz": agent_zipapp_base64()},
        metadata={"name": f"{prefix}-agent", "namespace": namespace, "labels": labels}, opts=base,
    )
    if spec.num_nodes > 1:
        # Stable DNS names for the nodes of a multi-node cluster: <prefix>-<rank>.<prefix>.<namespace>.svc.
        k8s.core.v1.Service(
            f"{spec.name}-nodes",
            metadata={"name": prefix, "namespace": namespace, "labels": labels},
            spec={"cluster_ip": "None", "selector": {"sortie-cluster": labels["sortie-cluster"]},
                  "publish_not_ready_addresses": True,
                  "ports": [{"name": "agent", "port": spec.agent_port, "target_port": spec.agent_port}]},
            opts=base,
        )
    needs = resources(spec)
    nodes: list[BuiltNode] = []
    for rank in range(spec.num_nodes):
        pod_name = f"{prefix}-{rank}"
        container: dict[str, object] = {
            "name": "agent", "image": spec.container_image or pod_image(spec),  # image_id: docker:...
            "command": pod_command(spec, pod_name),
            "env": [{"name": "SORTIE_AGENT_TOKEN",
                     "value_from": {"secret_key_ref": {"name": secret.metadata.name, "key": "token"}}}],
            "ports": [{"name": "agent", "container_port": spec.agent_port}],
            "volume_mounts": [{"name": "agent", "mount_path": AGENT_DIR, "read_only": True},
                              {"name": "sandbox", "mount_path": "/var/lib/sortie"}],
            "readiness_probe": {"tcp_socket": {"port": spec.agent_port}, "period_seconds": 2},
        }
        if needs:
            container["resources"] = needs
        pod_spec: dict[str, object] = {
            "containers": [container], "restart_policy": "Always",
            "volumes": [{"name": "agent", "config_map": {"name": agent.metadata.name}},
                        {"name": "sandbox", "empty_dir": {}}],
            **scheduling(spec)}
        pod_spec["hostname"] = pod_name  # stable across replacements (the pod's own name is not)
        if spec.num_nodes > 1:
            pod_spec["subdomain"] = prefix
        pod_parts = merge_pod_config({  # the task's config.kubernetes.pod_config merged in
            # No `name`: the provider names the pod `<cluster>-node-<rank>-<8 random>`. A fixed name breaks the
            # provider's preview of a replacement (its server-side dry-run create of the new pod lands on the live
            # one as a patch, which the API server refuses: "pod updates may not change fields other than ...").
            "metadata": {"namespace": namespace, "labels": {**labels, "sortie-rank": str(rank)},
                         # How long `up` waits for the pod to be scheduled and ready: a pod left Pending for want
                         # of resources fails as no capacity (the scheduler's message), and recovery tries elsewhere.
                         "annotations": {"pulumi.com/timeoutSeconds": str(spec.kube_pod_timeout_s)}},
            "spec": pod_spec}, snake_keys(dict(spec.pod_config)))
        pod = k8s.core.v1.Pod(f"{spec.name}-node-{rank}", metadata=pod_parts["metadata"], spec=pod_parts["spec"],
                              opts=base)
        ip = pod.status.apply(lambda status: status.pod_ip if status else None)
        endpoints = None
        if rank == 0 and spec.ports:
            endpoints = ports_service(spec, prefix, namespace, labels, pod, base)
        nodes.append(CloudNode(
            rank=rank, node_id=pod.metadata.name, host=ip, ip=ip, url=agent_url(ip, spec.agent_port),
            region=pulumi.Output.from_input(context), zone=pulumi.Output.from_input(None),
            instance_type=pulumi.Output.from_input(spec.instance_type), spot=spec.use_spot, endpoints=endpoints,
        ))
    return nodes


MAX_SERVICE_PORTS = 100


def service_ports(ports: tuple[str, ...]) -> list[int]:
    """Each port of `ports` ("8080", "9000-9001"), ranges expanded (a Service names each port)."""
    found = [port for low, high in port_ranges(ports) for port in range(low, high + 1)]
    if len(found) > MAX_SERVICE_PORTS:
        raise UsageError(f"ports: {len(found)} ports on Kubernetes; a Service exposes at most {MAX_SERVICE_PORTS} "
                         "(one entry each): open fewer")
    return list(dict.fromkeys(found))


def ports_service(spec: ClusterSpec, prefix: str, namespace: str, labels: dict[str, str], head: k8s.core.v1.Pod,
                  base: pulumi.ResourceOptions) -> pulumi.Output[dict[str, str]]:
    """The task's `ports` on the head pod: a Service (`<cluster>-ports`) of the type config `kubernetes.ports`
    says, destroyed with the stack. Returns the endpoints {"8080": "host:port"}: the load balancer's address
    (`loadbalancer`, SkyPilot's default mode: `up` waits for it), else the head pod's node IP and the node port."""
    ports = service_ports(spec.ports)
    kind = "NodePort" if spec.kube_ports == "nodeport" else "LoadBalancer"
    # What `up` waits for. Not the provider's default (the Service's endpoints): the head pod is ready already (the
    # Service is made after it), and its node ports are given when the Service is created. A load balancer: its
    # address (the endpoints), for at most `kube_pod_timeout_s`, as for the pods.
    wait = ({"pulumi.com/skipAwait": "true"} if kind == "NodePort" else
            {"pulumi.com/waitFor": "jsonpath={.status.loadBalancer.ingress}",
             "pulumi.com/timeoutSeconds": str(spec.kube_pod_timeout_s)})
    service = k8s.core.v1.Service(
        f"{spec.name}-ports",
        metadata={"name": dns_label(f"{prefix}-ports", 63), "namespace": namespace, "labels": labels,
                  "annotations": wait},
        spec={"type": kind, "selector": {"sortie-cluster": labels["sortie-cluster"], "sortie-rank": "0"},
              "ports": [{"name": f"p{port}", "port": port, "target_port": port, "protocol": "TCP"}
                        for port in ports]},
        opts=merge_opts(base, depends_on=[head]),  # its endpoints are the head pod's: made once that is ready
    )

    def addresses(args: list[Any]) -> dict[str, str]:
        service_spec, status, pod_status = args
        ingress = _field(_field(status, "load_balancer"), "ingress") or []
        lb = next((_field(i, "ip") or _field(i, "hostname") for i in ingress
                   if _field(i, "ip") or _field(i, "hostname")), None)
        node_ip = _field(pod_status, "host_ip")
        out: dict[str, str] = {}
        for entry in _field(service_spec, "ports") or []:
            port, node_port = _field(entry, "port"), _field(entry, "node_port")
            if lb:
                out[str(port)] = f"{lb}:{port}"
            elif node_ip and node_port:
                out[str(port)] = f"{node_ip}:{node_port}"
        return out

    return pulumi.Output.all(service.spec, service.status, head.status).apply(addresses)


def _field(value: Any, name: str) -> Any:
    """A field of a provider output, typed (`status.host_ip`) or a plain mapping (`hostIP`/`host_ip`)."""
    if value is None:
        return None
    if isinstance(value, dict):
        camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)
        return value.get(name, value.get(camel, value.get(camel.replace("Ip", "IP"))))
    return getattr(value, name, None)


def snake_keys(value: object) -> object:
    """A pod_config written as Kubernetes YAML (camelCase keys) in the SDK's snake_case; labels, annotations and
    other maps of names keep their keys."""
    if isinstance(value, list):
        return [snake_keys(v) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, object] = {}
    for key, item in value.items():
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", str(key)).lower()
        free_form = name in ("labels", "annotations", "node_selector", "limits", "requests")
        out[name] = item if free_form else snake_keys(item)
    return out


def pod_command(spec: ClusterSpec, pod_name: str) -> list[str]:
    """The agent's command, after installing Sortie for the node's bucket work when the spec asks for it."""
    command = agent_command(spec, pod_name, token_stdin=False)
    install = node_package_install(spec)
    if not install:
        return command
    return ["/bin/sh", "-c", f"set -e\n{install}exec {shlex.join(command)}"]
