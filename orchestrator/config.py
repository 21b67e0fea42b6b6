"""Shared base, the Sortie home and its `config.yaml`.

The home (`~/.sortie`, or `$SORTIE_HOME`) holds the state DB, logs, the Pulumi file backend,
per-stack work dirs, local-cloud sandboxes and `config.yaml`. Files holding secrets are 0600.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import SortieError

DASHBOARD_PORT = 8765  # `sortie dashboard`'s and the controller VM's dashboard port, unless told otherwise
CONFIG_FILE = "config.yaml"
CONTROLLER_ID_ENV = "SORTIE_CONTROLLER_ID"  # overrides controller.id (a Kubernetes pod's name)


def sortie_home() -> Path:
    """The Sortie home directory, created if missing."""
    home = Path(os.environ.get("SORTIE_HOME") or Path.home() / ".sortie").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


DEFAULT_LOCAL_CAPACITY = 16  # local nodes per region unless configured: what a laptop survives


class LocalRegion(BaseModel):
    """One region of the embedded local cloud."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="Region name, e.g. region-a.")]
    capacity: Annotated[
        int | None,
        Field(ge=0, description="Most nodes alive at once in this region (each is a process on this machine); "
              "null means unlimited."),
    ] = DEFAULT_LOCAL_CAPACITY
    accelerators: Annotated[
        dict[str, int],
        Field(description="Accelerators each node of this region declares, e.g. {H100: 8}. Declared, not real."),
    ] = Field(default_factory=dict)
    spot_capacity: Annotated[
        int | None,
        Field(ge=0, description="Most spot nodes alive at once (within `capacity`); none means only `capacity` "
              "limits them. 0 makes spot unavailable here, as when a cloud has no spot capacity."),
    ] = None
    price_per_hour: Annotated[
        float, Field(ge=0, description="Declared on-demand price of one node-hour (for cost accounting).")
    ] = 0.0
    spot_price_per_hour: Annotated[
        float | None, Field(ge=0, description="Declared spot price of one node-hour; default: price_per_hour.")
    ] = None

    def price(self, use_spot: bool) -> float:
        return self.spot_price_per_hour if use_spot and self.spot_price_per_hour is not None else self.price_per_hour


def _default_regions() -> list[LocalRegion]:
    return [LocalRegion(name="region-a"), LocalRegion(name="region-b")]


class LocalCloudConfig(BaseModel):
    """Settings of the embedded local cloud."""

    model_config = ConfigDict(extra="forbid")

    regions: Annotated[
        list[LocalRegion], Field(min_length=1, description="Regions of the local cloud, first is the default.")
    ] = Field(default_factory=_default_regions)
    root: Annotated[
        str | None,
        Field(max_length=4096, description="Directory of the local cloud's nodes. Default: <home>/local. Controller "
              "replicas that share one local cloud (issue 14) name the same directory."),
    ] = None

    def root_dir(self, home: Path) -> Path:
        return Path(self.root).expanduser().resolve() if self.root else home / "local"

    def region(self, name: str | None) -> LocalRegion:
        if name is None:
            return self.regions[0]
        for region in self.regions:
            if region.name == name:
                return region
        known = ", ".join(r.name for r in self.regions)
        raise SortieError(f"local region {name!r} is not configured (known: {known}); add it under local.regions")


OPERATION_MIB = 200  # one stack operation in flight: 140-200 MiB PSS measured (bench/throughput.py)


class PulumiConfig(BaseModel):
    """How Sortie drives the Pulumi engine."""

    model_config = ConfigDict(extra="forbid")

    backend_url: Annotated[
        str | None,
        Field(description="Pulumi backend URL (file://, s3://, https://api.pulumi.com). "
              "Default: a file backend under the Sortie home."),
    ] = None
    secrets_provider: Annotated[
        str,
        Field(description="Pulumi secrets provider: 'passphrase' (generated once, stored 0600) or a KMS URL."),
    ] = "passphrase"
    stack_prefix: Annotated[
        str, Field(pattern=r"^[a-z][a-z0-9-]{0,20}$", description="Prefix of every stack name Sortie makes.")
    ] = "sortie"
    project: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Pulumi project name of Sortie's stacks.")
    ] = "sortie"
    max_concurrent_operations: Annotated[
        int | None,
        Field(ge=1, le=64, description="Stack operations (a worker, the engine and its plugins: ~200 MiB) "
              "running at once; default: the CPU count, between 2 and 8 (operations are CPU-bound), and no more "
              "than a quarter of the machine's memory holds. Launches beyond it wait in order."),
    ] = None

    @property
    def operation_slots(self) -> int:
        if self.max_concurrent_operations:
            return self.max_concurrent_operations
        memory_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        return max(1, min(max(os.cpu_count() or 2, 2), 8, memory_mib // (4 * OPERATION_MIB)))

    concurrent_update_retries: Annotated[
        int, Field(ge=0, description="Retries of an operation refused because the stack is locked.")
    ] = 5
    stack_tags: Annotated[
        dict[str, str],
        Field(description="Tags set on every stack Sortie creates (with sortie:owner and sortie:kind)."),
    ] = Field(default_factory=dict)
    policy_packs: Annotated[
        list[str],
        Field(description="Local policy pack directories run on every up and preview (`--policy-pack`); a "
              "mandatory violation fails the job as FAILED_PRECHECKS naming the policy."),
    ] = Field(default_factory=list)


class StateConfig(BaseModel):
    """Where durable state lives."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[
        str | None,
        Field(description="SQLAlchemy URL of the state DB, e.g. postgresql://user@host/sortie. "
              "Default: SQLite (WAL) at <home>/state.db. $SORTIE_DB_URL overrides."),
    ] = None


class ControllerConfig(BaseModel):
    """The controller daemon."""

    model_config = ConfigDict(extra="forbid")

    autostop_idle_minutes: Annotated[
        float, Field(ge=0, description="Stop the controller after this long with no job in progress.")
    ] = 10.0
    poll_interval_seconds: Annotated[
        float, Field(gt=0, le=300, description="How often node health and job exit codes are polled.")
    ] = 5.0
    tick_seconds: Annotated[
        float, Field(gt=0, le=60, description="How often the reconcilers run.")
    ] = 1.0
    grace_misses: Annotated[
        int, Field(ge=1, le=100, description="Polls a node's agent may miss before the infra is asked (refresh) "
                   "whether the node is gone; one missed poll never kills a healthy job.")
    ] = 3
    watch_timeout_seconds: Annotated[
        float, Field(gt=0, le=300, description="How long a node's agent holds a quiet watch (its heartbeat); a watch "
                     "with no answer 5 s past this is broken, and the node is probed at once.")
    ] = 20.0
    loss_confirm_seconds: Annotated[
        float, Field(gt=0, le=600, description="After a node's watch breaks, how long its agent may not answer "
                     "probes before the infra is asked (refresh) whether the node is gone.")
    ] = 1.0
    agent_workers: Annotated[
        int, Field(ge=1, le=256, description="Threads for the agent calls that move files (file syncs, MOUNT_CACHED "
                   "uploads, graceful stops).")
    ] = 16
    agent_connections: Annotated[
        int, Field(ge=1, le=10_000, description="Connections open at once for polls, run starts, log copies and "
                   "health checks, which run on the controller's event loop beside the nodes' watches.")
    ] = 64
    controller_error_retries: Annotated[
        int, Field(ge=0, description="Retries of a job after an unexpected controller error, then FAILED_CONTROLLER.")
    ] = 3
    id: Annotated[
        str | None,
        Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="This controller replica's id, the same "
              "across its restarts and unique among the replicas sharing one state DB. Default: the host name and "
              "a hash of the Sortie home."),
    ] = None
    lease_seconds: Annotated[
        float, Field(ge=2, le=3600, description="How long a replica's leases on jobs, pools and janitors last "
                     "without renewal; after that another replica takes the work over.")
    ] = 30.0
    max_jobs_per_replica: Annotated[
        int, Field(ge=1, le=100_000, description="A replica claims new jobs only while it holds fewer than this, "
                   "so that work spreads across replicas.")
    ] = 10_000
    logs_dir: Annotated[
        str | None,
        Field(max_length=4096, description="Where job logs are kept. Default: <home>/logs/jobs. Replicas on several "
              "machines name one shared directory (NFS, a mounted volume), so that any home reads any job's logs and "
              "a replica that takes a job over resumes its copies where the other stopped."),
    ] = None

    def replica_id(self, home: Path) -> str:
        """`$SORTIE_CONTROLLER_ID` (a pod's name, from the downward API), `id`, or the host name and a hash of the
        home (stable across restarts, distinct per home)."""
        import hashlib
        import socket

        given = os.environ.get(CONTROLLER_ID_ENV, "").strip()
        if given:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", given):
                raise SortieError(f"${CONTROLLER_ID_ENV} {given!r} is not a replica id (letters, digits, _ . -)")
            return given
        if self.id:
            return self.id
        digest = hashlib.sha256(str(Path(home).expanduser().resolve()).encode()).hexdigest()[:8]
        host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())[:48] or "host"
        return f"{host}-{digest}"


class S3Config(BaseModel):
    """The S3 store: AWS S3 or any S3-compatible endpoint (MinIO, Ceph, R2's S3 API, ...)."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: Annotated[
        str | None,
        Field(description="S3 API endpoint, e.g. http://127.0.0.1:9000 for MinIO. Default: AWS S3 (boto3's own "
              "resolution; $AWS_ENDPOINT_URL_S3 also works)."),
    ] = None
    region: Annotated[str | None, Field(description="Region for new buckets and signing. Default: boto3's.")] = None
    profile: Annotated[
        str | None, Field(description="Named profile from ~/.aws for credentials. Default: boto3's chain.")
    ] = None
    mount_tool: Annotated[
        Literal["auto", "rclone", "s3fs"],
        Field(description="The FUSE tool a node mounts an S3 MOUNT with: auto (rclone, else s3fs), rclone or s3fs."),
    ] = "auto"


class StorageConfig(BaseModel):
    """Object stores that `file_mounts` buckets and the intermediate bucket live in."""

    model_config = ConfigDict(extra="forbid")

    s3: S3Config = Field(default_factory=S3Config)
    local_root: Annotated[
        str | None,
        Field(description="Directory of the local store (`local://NAME` is <local_root>/NAME). "
              "Default: <home>/buckets."),
    ] = None


class ControllerResources(BaseModel):
    """The VM of a jobs controller on a cloud."""

    model_config = ConfigDict(extra="forbid")

    cpus: Annotated[str, Field(description="vCPUs, e.g. 2 or 4+ (see the sizing in the README).")] = "2+"
    memory: Annotated[str, Field(description="GiB, e.g. 8 or 8+.")] = "4+"
    disk_size: Annotated[int, Field(ge=10, description="Disk GiB.")] = 50


class JobsControllerConfig(BaseModel):
    """Where the jobs controller runs."""

    model_config = ConfigDict(extra="forbid")

    infra: Annotated[
        Literal["local", "aws", "gcp", "azure", "kubernetes"],
        Field(description="local (default): the controller runs where `sortie` runs. A cloud: `sortie controller "
              "up` makes it a VM of its own stack; it needs a shared PostgreSQL (state.url)."),
    ] = "local"
    region: Annotated[str | None, Field(description="Region of the controller VM (default: the cheapest).")] = None
    resources: ControllerResources = Field(default_factory=ControllerResources)
    package: Annotated[
        str,
        Field(description="What the controller VM pip-installs (a package index name, a wheel URL, or a git URL)."),
    ] = "sortie"
    ssh_cidr: Annotated[
        str,
        Field(description="Who may reach the controller VM's SSH port, through which `sortie dashboard` tunnels to "
              "the dashboard it serves on its loopback (key login only)."),
    ] = "0.0.0.0/0"
    ssh_user: Annotated[
        str | None,
        Field(description="The login user on the controller VM (default: the image's: ubuntu on AWS, sortie on "
              "GCP and Azure)."),
    ] = None


class JobsConfig(BaseModel):
    """Managed jobs: where uploads go on their way to the nodes, and where the controller runs."""

    model_config = ConfigDict(extra="forbid")

    controller: JobsControllerConfig = Field(default_factory=JobsControllerConfig)

    bucket: Annotated[
        str | None,
        Field(description="Intermediate bucket for workdir and local file_mounts (s3://NAME or local://NAME, "
              "optionally with a path). Each job uses job-<id>/ inside it, removed when the job ends. Default: a "
              "temporary local-store bucket per launch, deleted when the job ends."),
    ] = None
    force_disable_cloud_bucket: Annotated[
        bool,
        Field(description="Never use a bucket for uploads: they go to the controller, and nodes fetch from it "
              "(the two-hop path)."),
    ] = False
    max_num_nodes: Annotated[
        int,
        Field(ge=1, le=10_000, description="Most nodes one task may ask for (num_nodes); a launch asking for more "
              "is refused."),
    ] = 512
    max_upload_mb: Annotated[
        float,
        Field(gt=0, description="Largest workdir or local file mount a launch uploads, after .gitignore and "
              ".skyignore, in MiB."),
    ] = 1024.0


class CloudNetworkConfig(BaseModel):
    """How Sortie's cloud clusters fit into a team's platform (AWS, GCP, Azure, Kubernetes)."""

    model_config = ConfigDict(extra="forbid")

    tags: Annotated[
        dict[str, str], Field(description="The team's tags/labels, put on every cloud resource Sortie creates."),
    ] = Field(default_factory=dict)
    network_stack: Annotated[
        str | None,
        Field(description="A Pulumi stack (org/project/stack) whose outputs name the VPC/subnet/network to use, "
              "read with a StackReference; default: Sortie makes a minimal firewall in the default network."),
    ] = None
    network_outputs: Annotated[
        dict[str, str],
        Field(description="Which outputs of network_stack hold what (e.g. {subnet: privateSubnetId}); default "
              "names per cloud: subnetId/securityGroupId (AWS), network/subnetwork (GCP), "
              "resourceGroupName/subnetId (Azure)."),
    ] = Field(default_factory=dict)
    controller_cidr: Annotated[
        str | None,
        Field(description="What the default firewall admits to the node agent's port (the controller's network); "
              "default: the private network only."),
    ] = None
    node_instance_profile: Annotated[
        str | None,
        Field(description="AWS: an IAM instance profile (name) attached to every node, the identity its bucket work "
              "uses (nodes never get the controller's AWS credentials); scope it to your jobs' buckets."),
    ] = None
    ports_cidr: Annotated[
        str,
        Field(description="What a task's `ports` admit in the cluster's firewall (security group, firewall rule, "
              "NSG); default: anywhere, as SkyPilot does."),
    ] = "0.0.0.0/0"
    ssh_public_key: Annotated[
        str | None,
        Field(description="An SSH public key put on cloud VMs (default: the controller VM gets Sortie's own key, "
              "<home>/ssh/sortie-controller, made at `sortie controller up`)."),
    ] = None
    ssh_private_key: Annotated[
        str | None,
        Field(description="The private key of ssh_public_key, for `sortie dashboard`'s tunnel to the controller VM "
              "(default: ssh's own keys and agent)."),
    ] = None


class KubernetesConfig(BaseModel):
    """Where Sortie's Kubernetes clusters go (infra `kubernetes`, region = a kubeconfig context)."""

    model_config = ConfigDict(extra="forbid")

    kubeconfig: Annotated[
        str | None,
        Field(max_length=4096, description="The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)."),
    ] = None
    context: Annotated[
        str | None,
        Field(max_length=253, description="The context whose cluster is offered (default: the current context)."),
    ] = None
    namespace: Annotated[
        str | None,
        Field(max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
              description="A namespace to put every cluster in, as is (default: a namespace per cluster, "
              "sortie-<cluster>, made and deleted with it; that needs permission to create namespaces)."),
    ] = None
    pod_timeout_s: Annotated[
        int,
        Field(ge=10, le=3600, description="Seconds a launch waits for each pod to be scheduled and ready; a pod "
              "still Pending then (no node has the resources) counts as no capacity, and the job tries elsewhere."),
    ] = 600
    ports: Annotated[
        Literal["loadbalancer", "nodeport"],
        Field(description="How a task's `ports` are exposed: a Service of this type for the head pod. loadbalancer "
              "(SkyPilot's default): the launch waits for the load balancer's address, and the endpoints are "
              "<address>:<port>; it needs a cluster that provisions LoadBalancer Services (EKS, GKE, AKS, MetalLB). "
              "nodeport: no wait; the endpoints are <head pod's node IP>:<node port>."),
    ] = "loadbalancer"


WORKSPACE_NAME = r"^[a-z][a-z0-9-]{0,31}$"


class WorkspaceConfig(BaseModel):
    """A workspace of the API server (issue 23): who is in it, and where its jobs may run."""

    model_config = ConfigDict(extra="forbid")

    users: Annotated[list[Annotated[str, Field(max_length=64)]],
                     Field(max_length=10_000, description="Users in this workspace (besides `users add --workspace`).")
                     ] = Field(default_factory=list)
    allowed_infra: Annotated[
        list[Annotated[str, Field(max_length=255)]] | None,
        Field(description="Infra its jobs may use (`local`, `aws/us-east-1`, ...): a launch elsewhere is refused. "
              "Default: any."),
    ] = None


class ApiConfig(BaseModel):
    """The API server (issue 23). Server side: limits, TLS proxy, OIDC. Client side (`sortie api login`):
    `endpoint` and `token`; with an endpoint every `sortie jobs ...` command goes to that server."""

    model_config = ConfigDict(extra="forbid")

    endpoint: Annotated[str | None, Field(max_length=2048, description="Client: the server's URL.")] = None
    token: Annotated[str | None, Field(max_length=4096, description="Client: this user's token.")] = None
    insecure: Annotated[bool, Field(description="Client: send the token over plain HTTP to a non-loopback host.")
                        ] = False
    max_body_mb: Annotated[int, Field(ge=1, le=10_240, description="Server: largest request body (and upload), MiB.")
                           ] = 256
    rate_limit_per_minute: Annotated[int, Field(ge=1, le=1_000_000, description="Server: requests per token.")
                                     ] = 6000
    start_controller: Annotated[bool, Field(description="Server: start the controller (as `jobs launch` does); "
                                            "false where it runs elsewhere (replicas beside stateless servers).")
                                ] = True
    trusted_proxies: Annotated[list[str], Field(max_length=64, description="Server, with --behind-proxy: the "
                                                "addresses whose X-Forwarded-* headers are trusted.")
                               ] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    oidc: Annotated[dict | None, Field(description="Server: OIDC (issuer, audience, jwks_url or jwks_file, "
                                       "user_claim, groups_claim, group_roles, group_workspaces); checked "
                                       "by `api start` (`orchestrator.auth.oidc`).")] = None


class DockerConfig(BaseModel):
    """Containers of tasks (image_id: docker:...) on the local cloud."""

    model_config = ConfigDict(extra="forbid")

    allowed_run_options: Annotated[
        list[Annotated[str, Field(pattern=r"^--?[A-Za-z][A-Za-z0-9-]{0,40}$")]],
        Field(max_length=100, description="Options a task's config.docker.run_options may use besides the safe "
              "ones Sortie allows (resources: --shm-size, --ulimit, --memory, --cpus, --env NAME=VALUE, ...), by "
              "name, e.g. [--ipc, --cap-add]. Each one listed lets every task reach past its container: --volume "
              "mounts host paths, --device host devices, --privileged turns confinement off. Default: none."),
    ] = Field(default_factory=list)


class SortieConfig(BaseModel):
    """The whole `config.yaml`."""

    model_config = ConfigDict(extra="forbid")

    pulumi: PulumiConfig = Field(default_factory=PulumiConfig)
    local: LocalCloudConfig = Field(default_factory=LocalCloudConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    cloud: CloudNetworkConfig = Field(default_factory=CloudNetworkConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    workspaces: Annotated[
        dict[Annotated[str, Field(pattern=WORKSPACE_NAME)], WorkspaceConfig],
        Field(max_length=1000, description="The API server's workspaces (issue 23): a job or pool belongs to one."),
    ] = Field(default_factory=dict)
    docker: DockerConfig = Field(default_factory=DockerConfig)
    allowed_clouds: Annotated[
        list[Literal["local", "aws", "gcp", "azure", "kubernetes"]] | None,
        Field(description="Only these clouds are considered (default: every cloud `sortie check` enables)."),
    ] = None


def _format_validation_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return f"{path}: {where}: {first['msg']}"


def load_config(home: Path | None = None) -> SortieConfig:
    """Read `config.yaml` from the home; defaults where it is missing."""
    home = home or sortie_home()
    path = home / CONFIG_FILE
    if not path.exists():
        return SortieConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SortieError(f"{path}: not valid YAML ({exc.__class__.__name__}); fix or remove the file") from exc
    if not isinstance(raw, dict):
        raise SortieError(f"{path}: must be a mapping of settings")
    try:
        return SortieConfig.model_validate(raw)
    except ValidationError as exc:
        raise SortieError(_format_validation_error(path, exc)) from exc


def write_private(path: Path, content: str) -> None:
    """Write a file readable by its owner only, never briefly readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(content)
    os.replace(tmp, path)


def private_once(path: Path, make: Callable[[], str]) -> str:
    """The content of a 0600 file created once: when two processes race to create it, one wins and both
    read the winner's content (hard-linking a complete temp file fails if the name exists)."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        write_private(tmp, make())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text()


def passphrase_file(home: Path | None = None) -> Path:
    """The passphrase of the default secrets provider: generated once, stored 0600; or the file
    `PULUMI_CONFIG_PASSPHRASE_FILE` names (a platform's secret store, mounted: every replica the same)."""
    given = os.environ.get("PULUMI_CONFIG_PASSPHRASE_FILE")
    if given:
        return Path(given).expanduser().resolve()
    home = home or sortie_home()
    path = home / "secrets" / "pulumi-passphrase"
    private_once(path, lambda: secrets.token_urlsafe(32))
    return path
