"""Infra, which clouds a user has enabled, and why the others are not: `sortie check`.

Offline and fast: it looks for the provider SDK extra (`pip install 'sortie[aws]'`) and for credentials where
each cloud's own tools keep them (environment variables, credential files), without calling any cloud. The
local cloud is always enabled. `allowed_clouds` in the config narrows the set, as SkyPilot's does.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import SortieConfig

CLOUDS = ("local", "aws", "gcp", "azure", "kubernetes")
SDK_MODULES = {"aws": "pulumi_aws", "gcp": "pulumi_gcp", "azure": "pulumi_azure_native",
               "kubernetes": "pulumi_kubernetes"}


@dataclass(frozen=True)
class CloudCheck:
    cloud: str
    enabled: bool
    reason: str


def _has_sdk(cloud: str) -> bool:
    return importlib.util.find_spec(SDK_MODULES[cloud]) is not None


def _file(path: str | os.PathLike[str] | None) -> bool:
    return bool(path) and Path(os.path.expanduser(str(path))).is_file()


def _credentials(cloud: str, env: Mapping[str, str], home: Path) -> str | None:
    """Where the cloud's credentials were found, or None."""
    if cloud == "aws":
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            return "AWS_ACCESS_KEY_ID in the environment"
        if env.get("AWS_PROFILE"):
            return f"AWS_PROFILE={env['AWS_PROFILE']}"
        if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
            return "a web identity or container role"
        if _file(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials"):
            return "~/.aws/credentials"
        return None
    if cloud == "gcp":
        if _file(env.get("GOOGLE_APPLICATION_CREDENTIALS")):
            return "GOOGLE_APPLICATION_CREDENTIALS"
        if env.get("GOOGLE_CREDENTIALS"):
            return "GOOGLE_CREDENTIALS in the environment"
        if _file(home / ".config" / "gcloud" / "application_default_credentials.json"):
            return "gcloud application-default credentials"
        return None
    if cloud == "azure":
        for prefix in ("ARM", "AZURE"):
            if all(env.get(f"{prefix}_{k}") for k in ("CLIENT_ID", "TENANT_ID", "SUBSCRIPTION_ID")):
                return f"{prefix}_CLIENT_ID, _TENANT_ID and _SUBSCRIPTION_ID in the environment"
        if _file(home / ".azure" / "azureProfile.json"):
            return "an `az login` profile"
        return None
    return None


_HOW = {
    "aws": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run `aws configure`",
    "gcp": "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS",
    "azure": "run `az login` or set ARM_CLIENT_ID, ARM_CLIENT_SECRET, ARM_TENANT_ID, ARM_SUBSCRIPTION_ID",
    "kubernetes": "set KUBECONFIG or create ~/.kube/config",
}


def check(config: SortieConfig, env: Mapping[str, str] | None = None, home: Path | None = None) -> list[CloudCheck]:
    """Every cloud with whether it is enabled and why (or why not)."""
    env = os.environ if env is None else env
    home = home or Path.home()
    allowed = set(config.allowed_clouds) if config.allowed_clouds is not None else None
    found = []
    for cloud in CLOUDS:
        if allowed is not None and cloud not in allowed:
            found.append(CloudCheck(cloud, False, "not in allowed_clouds of the config"))
            continue
        if cloud == "local":
            regions = ", ".join(r.name for r in config.local.regions)
            found.append(CloudCheck(cloud, True, f"the embedded local cloud (regions: {regions})"))
            continue
        if not _has_sdk(cloud):
            found.append(CloudCheck(cloud, False, f"the SDK extra is not installed: pip install 'sortie[{cloud}]'"))
            continue
        if cloud == "kubernetes":
            found.append(_kube_check(config, env, home))
            continue
        where = _credentials(cloud, env, home)
        if where is None:
            found.append(CloudCheck(cloud, False, f"no credentials found: {_HOW[cloud]}"))
            continue
        found.append(CloudCheck(cloud, True, f"credentials from {where}"))
    return found


def _kube_check(config: SortieConfig, env: Mapping[str, str], home: Path) -> CloudCheck:
    """Enabled when the kubeconfig (kubernetes.kubeconfig, $KUBECONFIG, ~/.kube/config) names a usable context;
    read offline, as kubectl reads it (whether its API server answers is the optimizer's question)."""
    from orchestrator.errors import UsageError
    from orchestrator.infra.kube_capacity import kubeconfig_path, load_target

    if not _file(kubeconfig_path(config, dict(env), home)):
        return CloudCheck("kubernetes", False, f"no kubeconfig found: {_HOW['kubernetes']}")
    try:
        target = load_target(config, dict(env), home)
    except UsageError as exc:
        return CloudCheck("kubernetes", False, str(exc))
    return CloudCheck("kubernetes", True, f"kubeconfig {target.path}, context {target.context} ({target.server})")


def enabled_clouds(config: SortieConfig) -> tuple[str, ...]:
    return tuple(c.cloud for c in check(config) if c.enabled)
