"""The local cloud's nodes as a Pulumi dynamic provider.

`create` launches a node (a sandbox with a detached node agent) through `orchestrator.infra.local_cloud`,
`read` reports whether it is still alive (a dead or preempted node reads as gone, exactly as a
reclaimed spot VM does), `update` changes labels in place, and `delete` stops the agent and every
process it started and removes the sandbox.

The provider class is pickled by reference, so the engine's provider process must import this
module: the engine runs it with Sortie's interpreter (`$SORTIE_PYTHON`) and PYTHONPATH.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pulumi
from pulumi.dynamic import CreateResult, DiffResult, ReadResult, Resource, ResourceProvider, UpdateResult

from orchestrator.config import load_config, sortie_home
from orchestrator.errors import UsageError
from orchestrator.infra.local_cloud import LocalCloud
from orchestrator.storage.stores import local_store_root
from stacks.builders import BuiltNode
from stacks.spec import ClusterSpec

# Inputs whose change needs a new node, and inputs a node takes in place. `capacity` is read at
# create time only: changing a region's capacity never touches running nodes.
REPLACE_KEYS = ("cluster", "rank", "region", "root", "token", "accelerators", "use_spot", "container")
UPDATE_KEYS = ("labels",)
OUTPUT_KEYS = ("node_id", "host", "ip", "port", "url", "pid", "sandbox")


def node_inputs(spec: ClusterSpec, rank: int, region: str, root: str, capacity: int | None,
                spot_capacity: int | None = None) -> dict[str, Any]:
    """The inputs of node `rank` of a cluster (shared with the fake driver, so both diff alike)."""
    return {
        "cluster": spec.name, "rank": rank, "region": region, "root": root, "token": spec.token,
        "capacity": capacity, "spot_capacity": spot_capacity, "use_spot": bool(spec.use_spot),
        "accelerators": dict(spec.accelerators), "labels": dict(spec.labels),
        "container": container_of(spec),
    }


def container_of(spec: ClusterSpec) -> dict[str, Any] | None:
    """The container a local node runs its task in (image_id: docker:...), with this machine's engine."""
    if not spec.container_image:
        return None
    from orchestrator.policy.cloud_features import local_container_engine

    engine = local_container_engine()
    if engine is None:
        raise UsageError(f"cluster {spec.name}: the local cloud cannot run container images here "
                         "(no working podman or docker)")
    return {"engine": engine, "image": spec.container_image, "options": list(spec.container_options)}


def diff_node_inputs(olds: Mapping[str, Any], news: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(keys that force a replacement, keys updated in place)."""
    replaces = [k for k in REPLACE_KEYS if olds.get(k) != news.get(k)]
    updates = [k for k in UPDATE_KEYS if (olds.get(k) or {}) != (news.get(k) or {})]
    return replaces, updates


class LocalNodeProvider(ResourceProvider):
    """Dynamic provider of `LocalNode` resources."""

    def create(self, props: dict[str, Any]) -> CreateResult:
        cloud = LocalCloud(props["root"])
        node_id = f"{props['cluster']}-n{int(props['rank'])}-{secrets.token_hex(3)}"
        node = cloud.launch(
            node_id=node_id, cluster=props["cluster"], rank=int(props["rank"]), region=props["region"],
            token=props["token"], capacity=props.get("capacity"), accelerators=props.get("accelerators") or {},
            labels=props.get("labels") or {}, use_spot=bool(props.get("use_spot")),
            spot_capacity=props.get("spot_capacity"), container=props.get("container"),
            link_roots=props.get("link_roots"),
        )
        return CreateResult(id_=node.node_id, outs={**props, **self._outputs(node)})

    @staticmethod
    def _outputs(node: Any) -> dict[str, Any]:
        return {"node_id": node.node_id, "host": node.host, "ip": node.host, "port": node.port,
                "url": node.url, "pid": node.pid, "sandbox": node.sandbox}

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        cloud = LocalCloud(props["root"])
        if cloud.alive(id_):
            return ReadResult(id_=id_, outs=props)
        # Gone, as a reclaimed spot VM is: reap what is left of it, since no delete will come.
        cloud.terminate(id_)
        return ReadResult(id_="", outs={})

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        replaces, updates = diff_node_inputs(olds, news)
        return DiffResult(changes=bool(replaces or updates), replaces=replaces, delete_before_replace=True)

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        node = LocalCloud(news["root"]).set_labels(id_, news.get("labels") or {})
        return UpdateResult(outs={**olds, **news, **self._outputs(node)})

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        LocalCloud(props["root"]).terminate(id_)


class LocalNode(Resource):
    """One local-cloud node."""

    node_id: pulumi.Output[str]
    host: pulumi.Output[str]
    ip: pulumi.Output[str]
    port: pulumi.Output[int]
    url: pulumi.Output[str]
    region: pulumi.Output[str]

    def __init__(self, name: str, inputs: dict[str, Any], opts: pulumi.ResourceOptions | None = None) -> None:
        inputs = {**inputs, "token": pulumi.Output.secret(inputs["token"])}
        options = pulumi.ResourceOptions.merge(
            pulumi.ResourceOptions(additional_secret_outputs=["token"], delete_before_replace=True), opts
        )
        super().__init__(LocalNodeProvider(), name, {**inputs, **dict.fromkeys(OUTPUT_KEYS)}, options)


def build_local_nodes(spec: ClusterSpec) -> list[BuiltNode]:
    from orchestrator.policy.run_options import problems as run_option_problems

    home = sortie_home()
    config = load_config(home)
    refused = run_option_problems(spec.container_options, config.docker.allowed_run_options)
    if refused:  # launch refuses these first; a job submitted before the operator's config changed stops here
        raise UsageError(f"cluster {spec.name}: {refused[0]}")
    region = config.local.region(spec.region.split("/")[-1] if spec.region else None)
    for name, count in spec.accelerators.items():
        if region.accelerators.get(name, 0) < count:
            declared = ", ".join(f"{k}:{v}" for k, v in region.accelerators.items()) or "none"
            raise UsageError(f"local/{region.name} has no node with {name}:{count} (declared: {declared})")
    root = spec.local_root or str(config.local.root_dir(Path(home)))
    # Issue 28: the one directory outside its sandbox a node's agent may link to (a local-store MOUNT)
    link_roots = [str(local_store_root(config.storage, Path(home)))]
    built = []
    for rank in range(spec.num_nodes):
        inputs = node_inputs(spec, rank, region.name, root, region.capacity, region.spot_capacity)
        node = LocalNode(f"node-{rank}", {**inputs, "link_roots": link_roots})
        built.append(BuiltNode(rank=rank, node_id=node.node_id, host=node.host, ip=node.ip, url=node.url,
                               region=node.region))
    return built
