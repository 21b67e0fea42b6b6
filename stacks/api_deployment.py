"""The Sortie API server on Kubernetes (issue 23, section 5): a Deployment of `sortie api start` pods and a Service
in front of them, next to the controller replicas of `SortieControllers` (stacks/controller_deployment.py), which
builds them from `ApiServer`.

The server pods share the controllers' database, state key and Pulumi passphrase (one Secret; see that module),
their `config.yaml` (one ConfigMap) and, when there is one, the job logs' ReadWriteMany claim, which the server reads
for `jobs logs`. They hold one secret more, the first admin's token: `$SORTIE_ADMIN_TOKEN_FILE` names the mounted
file, and the server adopts that token for its admin instead of making one (in a pod the home is an emptyDir, so
a token the server wrote there would be lost with the pod).

Probes: a startup probe (the first start migrates the database), then readiness and liveness on
`GET /api/v1/health`, which answers 200 `{"status": "ok", "version": ...}` without a token. TLS: `tls_secret` names
a `kubernetes.io/tls` Secret the platform already has (cert-manager's, say), mounted for `--tls-cert/--tls-key`,
the probes then speaking HTTPS; or `behind_proxy` for an ingress that ends TLS (`--behind-proxy`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pulumi

API_APP = "sortie-api"
HEALTH_PATH = "/api/v1/health"
ADMIN_TOKEN_KEY = "admin-token"
ADMIN_TOKEN_ENV = "SORTIE_ADMIN_TOKEN_FILE"
TLS_DIR = "/etc/sortie/tls"
MAX_API_REPLICAS = 16


@dataclass(frozen=True)
class ApiServer:
    """What of the API server to deploy. `admin_token` is made a Pulumi secret wherever it comes from; it is not
    needed when the component is given an `existing_secret` holding `admin-token`."""

    replicas: int = 1
    port: int = 8080
    admin_token: pulumi.Input[str] | None = field(default=None, repr=False)
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    tls_secret: str | None = None
    behind_proxy: bool = False
    resources: Mapping[str, Mapping[str, str]] | None = None
    command: tuple[str, ...] = ("sortie", "api", "start")

    def check(self) -> None:
        if not 1 <= self.replicas <= MAX_API_REPLICAS:
            raise ValueError(f"api.replicas must be between 1 and {MAX_API_REPLICAS} (got {self.replicas})")
        if not 1024 <= self.port <= 65535:
            raise ValueError(f"api.port must be between 1024 and 65535 (got {self.port}): the pods run unprivileged")
        if self.tls_secret and self.behind_proxy:
            raise ValueError("api: give tls_secret (the server ends TLS) or behind_proxy (a proxy does), not both")

    def args(self) -> list[str]:
        """`sortie api start`'s flags: every address of the pod, this port, and TLS or the proxy."""
        out = [*self.command, "--host", "0.0.0.0", "--port", str(self.port)]
        if self.tls_secret:
            out += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
        if self.behind_proxy:
            out.append("--behind-proxy")
        return out


def probes(api: ApiServer) -> dict[str, Any]:
    """Startup, readiness and liveness probes, all on the health endpoint."""
    get = {"path": HEALTH_PATH, "port": "http", "scheme": "HTTPS" if api.tls_secret else "HTTP"}
    return {
        # The first start of a replica may migrate the database: up to 2 minutes before the others count.
        "startup_probe": {"http_get": get, "period_seconds": 2, "failure_threshold": 60, "timeout_seconds": 2},
        "readiness_probe": {"http_get": get, "period_seconds": 5, "failure_threshold": 2, "timeout_seconds": 2},
        "liveness_probe": {"http_get": get, "period_seconds": 20, "failure_threshold": 3, "timeout_seconds": 5},
    }


def api_container(api: ApiServer, image: str, env: list[dict[str, Any]],
                  mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """The server's container: the controllers' environment and mounts (state, key, passphrase, config, logs), its
    admin token and TLS files, its port and probes, and no privileges."""
    from stacks.controller_deployment import SECRETS_DIR

    mounts = list(mounts)
    if api.tls_secret:
        mounts.append({"name": "tls", "mount_path": TLS_DIR, "read_only": True})
    container: dict[str, Any] = {
        "name": "api", "image": image, "command": api.args(),
        "env": [*env, {"name": ADMIN_TOKEN_ENV, "value": f"{SECRETS_DIR}/{ADMIN_TOKEN_KEY}"}],
        "volume_mounts": mounts, "ports": [{"name": "http", "container_port": api.port, "protocol": "TCP"}],
        "security_context": {"allow_privilege_escalation": False, "capabilities": {"drop": ["ALL"]}},
        **probes(api),
    }
    if api.resources:
        container["resources"] = {k: dict(v) for k, v in api.resources.items()}
    return container


def api_volumes(api: ApiServer, volumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The controllers' volumes, the secrets one also giving the admin token, and the TLS Secret's."""
    out: list[dict[str, Any]] = []
    for volume in volumes:
        if volume["name"] == "secrets":
            secret = dict(volume["secret"])
            secret["items"] = [*secret["items"], {"key": ADMIN_TOKEN_KEY, "path": ADMIN_TOKEN_KEY}]
            volume = {**volume, "secret": secret}
        out.append(volume)
    if api.tls_secret:
        out.append({"name": "tls", "secret": {"secret_name": api.tls_secret, "default_mode": 0o440}})
    return out


def api_service(k8s: Any, name: str, api: ApiServer, namespace: str, labels: Mapping[str, str],
                selector: Mapping[str, str], opts: pulumi.ResourceOptions) -> Any:
    """The Service in front of the server pods: `api.port`, to the pods' named port."""
    return k8s.core.v1.Service(
        f"{name}-api-service",
        metadata={"name": f"{name}-api", "namespace": namespace, "labels": dict(labels)},
        spec={"type": api.service_type, "selector": dict(selector),
              "ports": [{"name": "http", "port": api.port, "target_port": "http", "protocol": "TCP"}]},
        opts=opts)
