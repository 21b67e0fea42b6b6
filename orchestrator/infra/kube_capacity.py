"""Infra, what a Kubernetes cluster offers the optimizer: its nodes' allocatable resources, read from the API server.

The kubeconfig is read as kubectl reads it (`kubernetes.kubeconfig` in the config, else the first file of
$KUBECONFIG, else ~/.kube/config; `kubernetes.context` else the current context). Authentication by client
certificate or bearer token (inline data or files); a context that needs an exec plugin (EKS, GKE) is named in a
clear error. Each schedulable, Ready node becomes one offer in region `<context>`, with an instance type named
after its allocatable as SkyPilot names them (`8CPU--32GB`, `8CPU--64GB--2H100`), GPUs from its `nvidia.com/gpu`
allocatable and the accelerator's name from the labels SkyPilot reads (`skypilot.co/accelerator`,
`cloud.google.com/gke-accelerator`, `nvidia.com/gpu.product`). Kubernetes capacity is priced at 0.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import ssl
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import SortieConfig
from orchestrator.errors import SortieError, UsageError
from orchestrator.offers import Offer

ACCELERATOR_LABELS = ("skypilot.co/accelerator", "cloud.google.com/gke-accelerator", "nvidia.com/gpu.product")
KNOWN_ACCELERATORS = ("GH200", "H200", "H100", "A100-80GB", "A100", "L40S", "L40", "L4", "A10G", "A10", "V100",
                      "T4", "P100", "P4", "K80", "A6000", "A5000", "A4000", "RTXPRO6000", "B200", "B100")
MAX_NODES = 5000
_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "k": 1e3, "M": 1e6, "G": 1e9,
           "T": 1e12, "P": 1e15, "m": 1e-3, "": 1}
_QUANTITY = re.compile(r"^([0-9.]+(?:e[0-9]+)?)([A-Za-z]*)$")


class KubeUnreachable(SortieError):
    """The API server did not answer (or refused us): one line saying which and why."""


@dataclass(frozen=True)
class KubeTarget:
    """One kubeconfig context, resolved: where its API server is and how to authenticate."""

    path: Path
    context: str
    server: str
    namespace: str | None
    ca_file: str | None
    ca_data: bytes | None
    cert_data: tuple[bytes, bytes] | None
    cert_files: tuple[str, str] | None
    token: str | None
    insecure: bool


def kubeconfig_path(config: SortieConfig, env: dict[str, str] | None = None, home: Path | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    if config.kubernetes.kubeconfig:
        return Path(config.kubernetes.kubeconfig).expanduser().resolve()
    first = next((p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p), None)
    return Path(first).expanduser().resolve() if first else (home or Path.home()) / ".kube" / "config"


def _named(entries: Any, name: str, what: str, path: Path) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry.get(what.rstrip("s")) or {}
    raise UsageError(f"{path}: no {what.rstrip('s')} named {name!r}; fix the kubeconfig or kubernetes.context")


def _relative(path: Path, value: str | None) -> str | None:
    return str((path.parent / Path(value).expanduser()).resolve()) if value else None


def load_target(config: SortieConfig, env: dict[str, str] | None = None, home: Path | None = None) -> KubeTarget:
    """The context Sortie uses; UsageError naming the kubeconfig and what is wrong with it."""
    path = kubeconfig_path(config, env, home)
    if not path.is_file():
        raise UsageError(f"no kubeconfig at {path}: set KUBECONFIG or kubernetes.kubeconfig in the config")
    if path.stat().st_size > 4 * 2**20:
        raise UsageError(f"{path}: larger than 4 MiB; is it a kubeconfig?")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a valid kubeconfig ({exc.__class__.__name__})") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: not a valid kubeconfig (no mapping at the top)")
    name = config.kubernetes.context or raw.get("current-context")
    if not name:
        raise UsageError(f"{path}: no current-context; set kubernetes.context in the config")
    context = _named(raw.get("contexts"), name, "contexts", path)
    cluster = _named(raw.get("clusters"), context.get("cluster", ""), "clusters", path)
    user = _named(raw.get("users"), context.get("user", ""), "users", path) if context.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        raise UsageError(f"{path}: context {name!r} authenticates with an exec/auth-provider plugin; Sortie reads "
                         "capacity with client certificates or tokens only (use a service-account token context)")
    server = str(cluster.get("server") or "")
    if not server.startswith(("https://", "http://")):
        raise UsageError(f"{path}: cluster of context {name!r} has no https:// server")
    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = Path(_relative(path, user["tokenFile"]) or "").read_text().strip()
    cert_data = None
    if user.get("client-certificate-data") and user.get("client-key-data"):
        cert_data = (base64.b64decode(user["client-certificate-data"]), base64.b64decode(user["client-key-data"]))
    cert_files = None
    if user.get("client-certificate") and user.get("client-key"):
        cert_files = (_relative(path, user["client-certificate"]) or "", _relative(path, user["client-key"]) or "")
    ca_data = base64.b64decode(cluster["certificate-authority-data"]) if cluster.get(
        "certificate-authority-data") else None
    return KubeTarget(path=path, context=name, server=server.rstrip("/"), namespace=context.get("namespace"),
                      ca_file=_relative(path, cluster.get("certificate-authority")), ca_data=ca_data,
                      cert_data=cert_data, cert_files=cert_files, token=token,
                      insecure=bool(cluster.get("insecure-skip-tls-verify")))


def _ssl_context(target: KubeTarget) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=target.ca_file,
                                     cadata=target.ca_data.decode() if target.ca_data else None)
    if target.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if target.cert_files:
        ctx.load_cert_chain(*target.cert_files)
    elif target.cert_data:
        # ssl wants files: written 0600 to a private temp dir and removed at once.
        with tempfile.TemporaryDirectory(prefix="sortie-kube-") as tmp:
            cert, key = Path(tmp) / "c", Path(tmp) / "k"
            for file, data in ((cert, target.cert_data[0]), (key, target.cert_data[1])):
                file.touch(mode=0o600)
                file.write_bytes(data)
            ctx.load_cert_chain(str(cert), str(key))
    return ctx


def api_get(target: KubeTarget, path: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET one API path as the context's user; KubeUnreachable with one line when it fails."""
    request = urllib.request.Request(target.server + path, headers={"Accept": "application/json"})
    if target.token:
        request.add_header("Authorization", f"Bearer {target.token}")
    try:
        with urllib.request.urlopen(request, context=_ssl_context(target), timeout=timeout) as response:
            return json.loads(response.read(64 * 2**20))
    except urllib.error.HTTPError as exc:
        message = str(exc.reason)
        with contextlib.suppress(ValueError, OSError, AttributeError):
            message = str(json.loads(exc.read(65536)).get("message") or message)[:300]
        raise KubeUnreachable(f"kubernetes: the API server of context {target.context!r} refused GET {path}: "
                              f"HTTP {exc.code} {message}") from None
    except (urllib.error.URLError, OSError, ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KubeUnreachable(f"kubernetes: the API server {target.server} (context {target.context!r}) is "
                              f"unreachable: {reason}") from None


def quantity(text: str | int | float | None) -> float:
    """A Kubernetes quantity (`7910m`, `32Gi`, `1e3`) as a number; 0 when absent or unreadable."""
    match = _QUANTITY.match(str(text or "0").strip())
    if match is None or match.group(2) not in _SUFFIX:
        return 0.0
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def accelerator_name(labels: dict[str, str]) -> str | None:
    for key in ACCELERATOR_LABELS:
        value = labels.get(key, "").upper().replace("_", "-")
        if not value:
            continue
        for known in KNOWN_ACCELERATORS:
            if known in value.replace("NVIDIA-", "").replace("TESLA-", ""):
                return known
        return value
    return None


def node_offer_fields(node: dict[str, Any]) -> tuple[str, float, float, dict[str, float]] | None:
    """(instance type, vCPUs, memory GiB, accelerators) of a schedulable, Ready node; None for the others."""
    spec, status = node.get("spec") or {}, node.get("status") or {}
    if spec.get("unschedulable"):
        return None
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []):
        return None
    allocatable = status.get("allocatable") or {}
    cpus = quantity(allocatable.get("cpu"))
    memory = quantity(allocatable.get("memory")) / 2**30
    gpus = quantity(allocatable.get("nvidia.com/gpu"))
    labels = (node.get("metadata") or {}).get("labels") or {}
    accelerators: dict[str, float] = {}
    name = f"{cpus:g}CPU--{int(memory)}GB"
    if gpus >= 1:
        acc = accelerator_name(labels) or "GPU"
        accelerators[acc] = gpus
        name += f"--{gpus:g}{acc}"
    return name, cpus, float(int(memory)), accelerators


def kubernetes_offers(config: SortieConfig) -> list[Offer]:
    """The cluster's nodes as optimizer offers (one per distinct shape). Raises KubeUnreachable or UsageError."""
    target = load_target(config)
    nodes = api_get(target, f"/api/v1/nodes?limit={MAX_NODES}").get("items") or []
    shapes: dict[str, Offer] = {}
    for node in nodes:
        fields = node_offer_fields(node)
        if fields is not None:
            name, cpus, memory, accelerators = fields
            shapes.setdefault(name, Offer("kubernetes", name, cpus, memory, accelerators, target.context, None,
                                          0.0, None))
    return list(shapes.values())
