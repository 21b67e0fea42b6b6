"""Several jobs-controller replicas on Kubernetes (issue 14): a Deployment of `replicas` pods, each running
`python -m orchestrator.controller.daemon` against one shared PostgreSQL (Sortie's state and Pulumi's).

`SortieControllers` is a ComponentResource a platform team can import into a program of its own;
`controller_deployment_program` is the whole program `sortie controller up --replicas N` runs (through
`deployment_stack_program`, a `StackProgram` the stack driver pickles to its worker like any other).

What it makes, in one namespace (made by the stack unless given as is):
- a Secret holding the Pulumi passphrase, Sortie's state key and the database credentials, every value a Pulumi
  secret (encrypted in the stack's state, never in clear text);
- a ConfigMap holding the replicas' `config.yaml`, which must hold no password: the state DB URL comes from the
  Secret as `$SORTIE_DB_URL`, the Pulumi backend's password as `$PGPASSWORD` (libpq and the engine's lib/pq both
  read it), so `pulumi.backend_url` in the ConfigMap names no password;
- the Deployment: each pod's replica id is its name (`$SORTIE_CONTROLLER_ID`, downward API), the passphrase a file
  of the mounted Secret (`$PULUMI_CONFIG_PASSPHRASE_FILE`), the Sortie home an emptyDir (per-replica work dirs and
  `PULUMI_HOME` stay local; only state and locks are shared), job logs on an optional ReadWriteMany claim.

No liveness probe: the daemon serves nothing to probe, and it is the container's main process, so a daemon that
dies ends the container and Kubernetes restarts it. A replica that stops renewing its leases loses its work to the
others after `controller.lease_seconds` whatever its pod does.

The image is a parameter: one the user builds with Sortie installed (`pip install 'sortie[postgres,kubernetes]'`)
and the Pulumi engine in it (`sortie engine install` at build time, into `$XDG_CACHE_HOME`), pushed to a registry
the cluster can pull from. examples/ha/README.md has a Dockerfile.

With `api=ApiServer(...)` the component also deploys the API server (issue 23; stacks/api_deployment.py): its
Deployment and Service, sharing the Secret (plus the admin token), the ConfigMap and the logs claim. With
`existing_secret` it makes no Secret and reads the platform's own (one its secret store keeps in the cluster).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pulumi
import yaml

from stacks.api_deployment import ADMIN_TOKEN_KEY, API_APP, ApiServer, api_container, api_service, api_volumes
from stacks.spec import ClusterSpec, StackProgram

MAX_REPLICAS = 16
HOME = "/var/lib/sortie"
SECRETS_DIR = "/etc/sortie/secrets"
PASSPHRASE_FILE = f"{SECRETS_DIR}/pulumi-passphrase"
SHARED_DIR = "/var/lib/sortie-shared"
# A replica under a supervisor (a Deployment, systemd) must not stop itself when the fleet is idle: the supervisor
# would only start it again. A year of idleness is "never".
AUTOSTOP_NEVER_MINUTES = 525_600.0
TYPE = "sortie:index:SortieControllers"
APP = "sortie-controller"
SECRET_KEYS = ("pulumi-passphrase", "state-key", "state-url")  # what an existing_secret must hold


def url_password(url: str | None) -> str | None:
    """The password a database URL holds, if any."""
    return urlsplit(url).password if url else None


def pod_config(config: Mapping[str, Any], *, logs_dir: str | None = None, with_api: bool = False) -> dict[str, Any]:
    """The replicas' `config.yaml` from a Sortie config (as a mapping): no replica id (each pod's name is), the
    controller local to its pod, autostop off, logs on `logs_dir` (the shared claim's) or in the pod, and no state DB
    URL (the Secret gives it); `with_api`: the API servers beside them start no controller of their own
    (`api.start_controller: false`). Refuses a password in `pulumi.backend_url` or `state.url`: the ConfigMap is not
    a secret."""
    for section, key in (("state", "url"), ("pulumi", "backend_url")):
        if url_password((config.get(section) or {}).get(key)):
            raise ValueError(f"{section}.{key} of the controllers' config holds a password: give it as a secret "
                             "(state_url, backend_password), not in the ConfigMap")
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
    out["state"] = {k: v for k, v in (out.get("state") or {}).items() if k != "url"}
    # This home's paths mean nothing in a pod: job logs go on the shared claim if there is one, else in the pod.
    controller = {k: v for k, v in (out.get("controller") or {}).items() if k not in ("id", "logs_dir")}
    controller["autostop_idle_minutes"] = AUTOSTOP_NEVER_MINUTES
    if logs_dir:
        controller["logs_dir"] = logs_dir
    out["controller"] = controller
    jobs = dict(out.get("jobs") or {})
    jobs["controller"] = {**dict(jobs.get("controller") or {}), "infra": "local"}  # the daemon is in this pod
    out["jobs"] = jobs
    if with_api:  # the replicas are the controllers: a server pod must not start one beside them
        out["api"] = {**dict(out.get("api") or {}), "start_controller": False}
    return {k: v for k, v in out.items() if v != {}}


@dataclass(frozen=True)
class _Pod:
    """What every pod of the component shares: its Secret's name, environment, mounts and volumes."""

    secret_name: pulumi.Input[str]
    env: list[dict[str, Any]]
    mounts: list[dict[str, Any]]
    volumes: list[dict[str, Any]]


def check_inputs(config: Mapping[str, Any], replicas: int, state_url: pulumi.Input[str] | None,
                 existing_secret: str | None, secrets: Mapping[str, pulumi.Input[str] | None]) -> None:
    """What the component refuses before making anything."""
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be between 1 and {MAX_REPLICAS} (got {replicas})")
    if isinstance(state_url, str) and not state_url.startswith("postgresql"):
        raise ValueError("state_url must be a PostgreSQL URL (postgresql://...): the replicas share it")
    backend = str((config.get("pulumi") or {}).get("backend_url") or "")
    if not backend.startswith("postgres://"):
        raise ValueError("pulumi.backend_url must be postgres://...?table=pulumi_state: the replicas share it")
    missing = [key for key, value in secrets.items() if value is None]
    if existing_secret is None and missing:
        raise ValueError(f"give {', '.join(missing)}, or existing_secret: the name of a Secret holding "
                         f"{', '.join(SECRET_KEYS)}")


def _env(secret_name: pulumi.Input[str], backend_password: bool) -> list[dict[str, Any]]:
    def from_secret(var: str, key: str) -> dict[str, Any]:
        return {"name": var, "value_from": {"secret_key_ref": {"name": secret_name, "key": key}}}

    env: list[dict[str, Any]] = [
        {"name": "SORTIE_HOME", "value": HOME},
        {"name": "PULUMI_CONFIG_PASSPHRASE_FILE", "value": PASSPHRASE_FILE},
        from_secret("SORTIE_STATE_KEY", "state-key"),
        from_secret("SORTIE_DB_URL", "state-url"),
    ]
    if backend_password:
        env.append(from_secret("PGPASSWORD", "pg-password"))
    return env


def _pod(secret_name: pulumi.Input[str], config_map: pulumi.Input[str], backend_password: bool,
         logs_claim: str | None) -> _Pod:
    mounts: list[dict[str, Any]] = [
        {"name": "home", "mount_path": HOME},
        {"name": "config", "mount_path": f"{HOME}/config.yaml", "sub_path": "config.yaml", "read_only": True},
        {"name": "secrets", "mount_path": SECRETS_DIR, "read_only": True},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "home", "empty_dir": {}},
        {"name": "config", "config_map": {"name": config_map}},
        {"name": "secrets", "secret": {"secret_name": secret_name, "default_mode": 0o440,
                                       "items": [{"key": "pulumi-passphrase", "path": "pulumi-passphrase"}]}},
    ]
    if logs_claim:
        mounts.append({"name": "shared", "mount_path": SHARED_DIR})
        volumes.append({"name": "shared", "persistent_volume_claim": {"claim_name": logs_claim}})
    return _Pod(secret_name, _env(secret_name, backend_password), mounts, volumes)


def _pod_spec(containers: list[dict[str, Any]], volumes: list[dict[str, Any]], selector: Mapping[str, str], *,
              grace_seconds: int, fs_group: int | None, service_account: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": containers, "volumes": volumes, "termination_grace_period_seconds": grace_seconds,
        # Replicas on different nodes where the cluster allows: one node's loss takes one replica.
        "affinity": {"pod_anti_affinity": {"preferred_during_scheduling_ignored_during_execution": [
            {"weight": 100, "pod_affinity_term": {"label_selector": {"match_labels": dict(selector)},
                                                  "topology_key": "kubernetes.io/hostname"}}]}},
    }
    if fs_group is not None:  # the Secret's files (0440) readable by whichever user the image runs as
        spec["security_context"] = {"fs_group": fs_group}
    if service_account:
        spec["service_account_name"] = service_account
    return spec


def _deployment_spec(replicas: int, selector: Mapping[str, str], labels: Mapping[str, str], digest: str,
                     pod_spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "replicas": replicas, "selector": {"match_labels": dict(selector)},
        "strategy": {"type": "RollingUpdate", "rolling_update": {"max_unavailable": 0, "max_surge": 1}},
        "template": {"metadata": {"labels": dict(labels), "annotations": {"sortie.dev/config-sha256": digest}},
                     "spec": pod_spec}}


def _k8s() -> Any:
    """pulumi_kubernetes, imported when used and typed Any: matching its resources' overloads (huge TypedDicts)
    would cost mypy gigabytes."""
    import pulumi_kubernetes

    return pulumi_kubernetes


def _labels(app: str, name: str, labels: Mapping[str, str] | None) -> tuple[dict[str, str], dict[str, str]]:
    """A workload's labels and its selector (which never matches the other workload's pods)."""
    selector = {"app.kubernetes.io/name": app, "app.kubernetes.io/instance": name}
    return {**(labels or {}), **selector}, selector


class SortieControllers(pulumi.ComponentResource):
    """`replicas` Sortie controller pods sharing one PostgreSQL, and with `api` the API server's pods and Service.
    Secrets (`passphrase`, `state_key`, `state_url`, `backend_password`, `api.admin_token`) are made Pulumi secrets
    here whatever they arrive as; or `existing_secret` names a Secret the platform already has (one its secret
    store syncs) holding the keys `SECRET_KEYS` (and `pg-password`, `admin-token` where used), and the component
    makes none."""

    def __init__(self, name: str, *, image: str, config: Mapping[str, Any],
                 passphrase: pulumi.Input[str] | None = None, state_key: pulumi.Input[str] | None = None,
                 state_url: pulumi.Input[str] | None = None, backend_password: pulumi.Input[str] | None = None,
                 replicas: int = 2, namespace: str = APP, create_namespace: bool = True,
                 logs_claim: str | None = None, resources: Mapping[str, Mapping[str, str]] | None = None,
                 labels: Mapping[str, str] | None = None, service_account: str | None = None,
                 fs_group: int | None = 1000, termination_grace_seconds: int = 600,
                 command: tuple[str, ...] = ("python", "-m", "orchestrator.controller.daemon"),
                 existing_secret: str | None = None, existing_secret_has_pg_password: bool = False,
                 api: ApiServer | None = None, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(TYPE, name, None, opts)
        values = {"passphrase": passphrase, "state_key": state_key, "state_url": state_url}
        check_inputs(config, replicas, state_url, existing_secret, values)
        if api is not None:
            api.check()
            if existing_secret is None and api.admin_token is None:
                raise ValueError("api.admin_token is required (the first admin's token), or existing_secret "
                                 f"holding {ADMIN_TOKEN_KEY}")
        self.name, self.image, self.namespace, self.replicas = name, image, namespace, replicas
        self.base_labels = labels
        logs_dir = f"{SHARED_DIR}/logs" if logs_claim else None
        config_yaml = yaml.safe_dump(pod_config(config, logs_dir=logs_dir, with_api=api is not None), sort_keys=True)
        self.digest = hashlib.sha256(config_yaml.encode()).hexdigest()[:16]  # a new config rolls the pods
        self.child = self._namespace(create_namespace)
        self.secret: Any = None
        if existing_secret is None:
            secrets = {"pulumi-passphrase": passphrase, "state-key": state_key, "state-url": state_url,
                       "pg-password": backend_password, ADMIN_TOKEN_KEY: api.admin_token if api else None}
            self.secret = self._secret({k: v for k, v in secrets.items() if v is not None})
        secret_name = existing_secret if existing_secret is not None else self.secret.metadata.name
        self.config_map = self._config_map(config_yaml)
        pod = _pod(secret_name, self.config_map.metadata.name,
                   backend_password is not None or existing_secret_has_pg_password, logs_claim)
        self.deployment = self._controllers(pod, resources, service_account, fs_group, termination_grace_seconds,
                                            command)
        self.api_deployment: Any = None
        self.api_service: Any = None
        if api is not None:
            self.api_deployment, self.api_service = self._api(api, pod, fs_group, service_account)
        outputs: dict[str, Any] = {"namespace": namespace, "deployment": self.deployment.metadata.name,
                                   "replicas": replicas}
        if self.api_service is not None:
            outputs["api_service"] = self.api_service.metadata.name
        self.register_outputs(outputs)

    def _namespace(self, create: bool) -> pulumi.ResourceOptions:
        """The options of every child: parented here, after the namespace when the component makes it."""
        k8s = _k8s()
        if not create:
            return pulumi.ResourceOptions(parent=self)
        labels, _ = _labels(APP, self.name, self.base_labels)
        ns = k8s.core.v1.Namespace(f"{self.name}-ns", metadata={"name": self.namespace, "labels": labels},
                                   opts=pulumi.ResourceOptions(parent=self))
        return pulumi.ResourceOptions(parent=self, depends_on=[ns])

    def _metadata(self, name: str, app: str = APP) -> dict[str, Any]:
        return {"name": name, "namespace": self.namespace, "labels": _labels(app, self.name, self.base_labels)[0]}

    def _secret(self, values: Mapping[str, pulumi.Input[str]]) -> Any:
        k8s = _k8s()
        return k8s.core.v1.Secret(
            f"{self.name}-secrets", type="Opaque",
            string_data={key: pulumi.Output.secret(value) for key, value in values.items()},
            metadata=self._metadata(f"{self.name}-secrets"), opts=self.child)

    def _config_map(self, config_yaml: str) -> Any:
        k8s = _k8s()
        return k8s.core.v1.ConfigMap(f"{self.name}-config", data={"config.yaml": config_yaml},
                                     metadata=self._metadata(f"{self.name}-config"), opts=self.child)

    def _controllers(self, pod: _Pod, resources: Mapping[str, Mapping[str, str]] | None,
                     service_account: str | None, fs_group: int | None, grace_seconds: int,
                     command: tuple[str, ...]) -> Any:
        k8s = _k8s()
        replica_id = {"name": "SORTIE_CONTROLLER_ID", "value_from": {"field_ref": {"field_path": "metadata.name"}}}
        container: dict[str, Any] = {"name": "controller", "image": self.image, "command": list(command),
                                     "env": [pod.env[0], replica_id, *pod.env[1:]], "volume_mounts": pod.mounts}
        if resources:
            container["resources"] = {k: dict(v) for k, v in resources.items()}
        labels, selector = _labels(APP, self.name, self.base_labels)
        # SIGTERM: the daemon lets its stack operations finish and releases its leases; give it the time.
        spec = _pod_spec([container], pod.volumes, selector, grace_seconds=grace_seconds, fs_group=fs_group,
                         service_account=service_account)
        return k8s.apps.v1.Deployment(f"{self.name}-deployment", metadata=self._metadata(self.name),
                                      spec=_deployment_spec(self.replicas, selector, labels, self.digest, spec),
                                      opts=self.child)

    def _api(self, api: ApiServer, pod: _Pod, fs_group: int | None, service_account: str | None) -> tuple[Any, Any]:
        """The API server's Deployment and Service."""
        k8s = _k8s()
        labels, selector = _labels(API_APP, self.name, self.base_labels)
        container = api_container(api, self.image, pod.env, pod.mounts)
        spec = _pod_spec([container], api_volumes(api, pod.volumes), selector, grace_seconds=30, fs_group=fs_group,
                         service_account=service_account)
        deployment = k8s.apps.v1.Deployment(
            f"{self.name}-api", metadata=self._metadata(f"{self.name}-api", API_APP),
            spec=_deployment_spec(api.replicas, selector, labels, self.digest, spec), opts=self.child)
        service = api_service(k8s, self.name, api, self.namespace, labels, selector, self.child)
        return deployment, service


@dataclass(frozen=True)
class ControllerDeploymentSpec:
    """What `sortie controller up --replicas N` deploys (secrets kept out of repr; they travel to the stack
    worker pickled, like a cluster's token)."""

    name: str
    image: str
    replicas: int
    config: Mapping[str, Any] = field(default_factory=dict)
    namespace: str = APP
    create_namespace: bool = True
    logs_claim: str | None = None
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    kubeconfig: str | None = None
    context: str | None = None
    passphrase: str = field(default="", repr=False)
    state_key: str = field(default="", repr=False)
    state_url: str = field(default="", repr=False)
    backend_password: str | None = field(default=None, repr=False)
    api: ApiServer | None = None  # the API server too (its admin token is kept out of repr)


def controller_deployment_program(spec: ControllerDeploymentSpec) -> None:
    opts = None
    if spec.kubeconfig or spec.context:
        k8s = _k8s()
        provider = k8s.Provider(f"{spec.name}-k8s", kubeconfig=spec.kubeconfig, context=spec.context)
        opts = pulumi.ResourceOptions(providers=[provider])
    controllers = SortieControllers(
        spec.name, image=spec.image, config=spec.config, passphrase=spec.passphrase, state_key=spec.state_key,
        state_url=spec.state_url, backend_password=spec.backend_password, replicas=spec.replicas,
        namespace=spec.namespace, create_namespace=spec.create_namespace, logs_claim=spec.logs_claim,
        resources=spec.resources or None, labels=spec.labels, api=spec.api, opts=opts)
    pulumi.export("controller", {"namespace": controllers.namespace, "deployment": controllers.deployment.metadata.name,
                                 "replicas": controllers.replicas, "image": spec.image})
    if controllers.api_service is not None:
        pulumi.export("api", {"service": controllers.api_service.metadata.name, "port": spec.api and spec.api.port})
    pulumi.export("infra", "kubernetes")


@dataclass(frozen=True)
class ControllerDeploymentProgram(StackProgram):
    """A `StackProgram` (kind `controller`) whose program is the Deployment above, not a VM."""

    deployment: ControllerDeploymentSpec | None = None

    def build(self) -> Any:
        spec = self.deployment
        if spec is None:
            raise ValueError("a controller deployment program needs its spec")
        return lambda: controller_deployment_program(spec)


def deployment_stack_program(spec: ControllerDeploymentSpec) -> StackProgram:
    """The StackProgram `PulumiStackDriver.up` takes for `spec`."""
    return ControllerDeploymentProgram(kind="controller", deployment=spec,
                                       spec=ClusterSpec(name=spec.name, infra="kubernetes", role="controller",
                                                        kubeconfig=spec.kubeconfig))
