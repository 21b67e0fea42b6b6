"""Policy, what each cloud does with a candidate's ports, disk_tier, network_tier, image_id and accelerator_args. Pure:
the optimizer asks `offer_supports` (an instance type that cannot serve the feature is not an option, as in
SkyPilot), the launcher asks `unsupported_on` for the reason, and the cloud builders read the mappings.

Disk tiers (the OS disk), after SkyPilot's documented meanings; `best` is the highest tier the cloud offers:
- AWS: low gp3 3,000 IOPS / 125 MB/s; medium gp3 6,000 / 250; high gp3 16,000 / 1,000; ultra io2 (up to
  64,000 IOPS, 500 per GiB).
- GCP: low pd-standard; medium pd-balanced; high pd-ssd; ultra pd-extreme.
- Azure: low Standard_LRS; medium StandardSSD_LRS; high Premium_LRS; ultra: an OS disk cannot be Ultra on
  Azure, so no Azure offer serves it (best is high).
- Local and Kubernetes: no disk tiers; only `best` (whatever there is) fits.
Network tiers: `standard` fits every offer; `best` only instance types with the cloud's fast fabric (AWS EFA,
GCP GPUDirect a3/a4, Azure InfiniBand ND96), and the builder turns it on (AWS a cluster placement group, GCP
gVNIC, Azure accelerated networking).
"""

from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
from typing import Any

DISK_TIERS_BY_CLOUD: dict[str, dict[str, dict[str, Any]]] = {
    "aws": {
        "low": {"volume_type": "gp3", "iops": 3000, "throughput": 125},
        "medium": {"volume_type": "gp3", "iops": 6000, "throughput": 250},
        "high": {"volume_type": "gp3", "iops": 16000, "throughput": 1000},
        "ultra": {"volume_type": "io2", "iops": 64000},
    },
    "gcp": {"low": {"type": "pd-standard"}, "medium": {"type": "pd-balanced"}, "high": {"type": "pd-ssd"},
            "ultra": {"type": "pd-extreme"}},
    "azure": {"low": {"storage_account_type": "Standard_LRS"}, "medium": {"storage_account_type": "StandardSSD_LRS"},
              "high": {"storage_account_type": "Premium_LRS"}},
}
_BEST_DISK = {"aws": "ultra", "gcp": "ultra", "azure": "high"}

# Instance-type prefixes with the cloud's fast network (network_tier: best).
NETWORK_BEST_PREFIXES: dict[str, tuple[str, ...]] = {
    "aws": ("p4d.", "p4de.", "p5.", "p5e.", "p5en.", "p6-", "trn1.32xlarge", "trn1n.", "trn2.", "hpc"),
    "gcp": ("a3-highgpu-8g", "a3-megagpu-8g", "a3-ultragpu-8g", "a4-", "a4x-"),
    "azure": ("Standard_ND96", "Standard_ND128"),
}
CONTAINER_PREFIX = "docker:"


def disk_settings(cloud: str, tier: str | None, disk_size_gb: int) -> dict[str, Any] | None:
    """The volume settings of a disk tier on a cloud; None for the cloud's default (no tier)."""
    if tier is None:
        return None
    tier = _BEST_DISK.get(cloud, tier) if tier == "best" else tier
    settings = DISK_TIERS_BY_CLOUD.get(cloud, {}).get(tier)
    if settings is None:
        return None
    settings = dict(settings)
    if settings.get("volume_type") == "io2":
        settings["iops"] = min(settings["iops"], 500 * max(disk_size_gb, 8))
    return settings


def has_fast_network(cloud: str, instance_type: str) -> bool:
    return instance_type.startswith(NETWORK_BEST_PREFIXES.get(cloud, ()))


def is_container_image(image_id: Any) -> bool:
    return isinstance(image_id, str) and image_id.startswith(CONTAINER_PREFIX)


def tpu_requested(candidate: dict[str, Any]) -> bool:
    return any(name.lower().startswith("tpu-") for name in (candidate.get("accelerators") or {}))


def offer_supports(candidate: dict[str, Any], cloud: str, instance_type: str, region: str | None = None) -> str | None:
    """None when an offer can serve the candidate's features; else why not, in a few words."""
    disk_tier = candidate.get("disk_tier")
    if disk_tier and disk_tier != "best" and disk_tier not in DISK_TIERS_BY_CLOUD.get(cloud, {}):
        return f"disk_tier {disk_tier} is not offered on {cloud}"
    if candidate.get("network_tier") == "best" and not has_fast_network(cloud, instance_type):
        return f"network_tier best needs an instance type with a fast network ({instance_type} has none)"
    image = candidate.get("image_id")
    if is_container_image(image) and cloud == "local" and local_container_engine() is None:
        return "the local cloud cannot run container images here (no working podman or docker)"
    if isinstance(image, str) and image and not is_container_image(image) and cloud in ("local", "kubernetes"):
        return f"a machine image (image_id) has no meaning on {cloud}"
    if isinstance(image, dict) and image and cloud in ("local", "kubernetes"):
        return f"machine images (image_id) have no meaning on {cloud}"
    if isinstance(image, dict) and image and region is not None and region not in image:
        return f"image_id names no image for {region} (regions: {', '.join(sorted(image))})"
    if candidate.get("accelerator_args") and not tpu_requested(candidate):
        return "accelerator_args are for TPUs (accelerators: tpu-...)"
    if cloud == "kubernetes" and sum(high - low + 1 for low, high in port_ranges(candidate.get("ports"))) > 100:
        return "more than 100 ports on Kubernetes (a Service names each port)"
    return None


def region_image(image_id: Any, region: str | None) -> str | None:
    """The machine image for a region: `image_id` itself, or its entry for `region` in a mapping."""
    if isinstance(image_id, dict):
        return image_id.get(region or "") or None
    return image_id or None


def port_ranges(ports: Any) -> list[tuple[int, int]]:
    """("8080", "9000-9001") -> [(8080, 8080), (9000, 9001)]."""
    out = []
    for port in ports or ():
        low, _, high = str(port).partition("-")
        out.append((int(low), int(high or low)))
    return out


def cluster_features(candidate: dict[str, Any], region: str | None) -> dict[str, Any]:
    """The ClusterSpec fields (`stacks.spec.ClusterSpec`) of a chosen candidate (`Candidate.to_json()`): its
    ports, disk and network tiers, and the machine image for the region. The controller passes them when it
    builds a cluster: `ClusterSpec(..., **cluster_features(candidate, region))`."""
    image = candidate.get("image_id")
    return {
        "ports": tuple(str(p) for p in candidate.get("ports") or ()),
        "disk_tier": candidate.get("disk_tier"),
        "network_tier": candidate.get("network_tier"),
        "image": None if is_container_image(image) else region_image(image, region),
        "container_image": image.removeprefix(CONTAINER_PREFIX) if image and is_container_image(image) else None,
        "accelerator_args": dict(candidate.get("accelerator_args") or {}),
    }


def merge_pod_config(base: dict[str, Any], extra: Any) -> dict[str, Any]:
    """`config.kubernetes.pod_config` merged into a pod (`{metadata, spec}`), as SkyPilot does: mappings merge
    key by key, the `containers` list merges item by item (the first is the node's), other lists are appended."""
    if not isinstance(extra, dict):
        return base
    merged = dict(base)
    for key, value in extra.items():
        mine = merged.get(key)
        if isinstance(mine, dict) and isinstance(value, dict):
            merged[key] = merge_pod_config(mine, value)
        elif key == "containers" and isinstance(mine, list) and isinstance(value, list):
            merged[key] = [merge_pod_config(a, b) if isinstance(a, dict) and isinstance(b, dict) else b
                           for a, b in zip(mine, value, strict=False)] + mine[len(value):] + value[len(mine):]
        elif isinstance(mine, list) and isinstance(value, list):
            merged[key] = mine + value
        else:
            merged[key] = value
    return merged


def attempt_features(task: dict[str, Any], infra: str, region: str | None) -> dict[str, Any]:
    """`cluster_features` of the candidate an attempt placed (the first of a stored task's candidates that fits
    the attempt's cloud and region; candidates share their features in nearly every YAML), with the task's
    `config_features`."""
    cloud = infra.split("/", 1)[0]
    for candidate in task.get("resources") or []:
        if candidate.get("cloud") not in (None, cloud) or candidate.get("region") not in (None, region):
            continue
        if offer_supports(candidate, cloud, "", region) is None or candidate.get("network_tier") == "best":
            return {**cluster_features(candidate, region), **config_features(task)}
    first = (task.get("resources") or [{}])[0]
    return {**cluster_features(first, region), **config_features(task)}


def config_features(task: dict[str, Any]) -> dict[str, Any]:
    """The ClusterSpec fields of a task's `config:` (the keys `orchestrator.spec.documents.CONFIG_KEYS`)."""
    config = task.get("config") or {}
    kubernetes: dict[str, Any] = config["kubernetes"] if isinstance(config.get("kubernetes"), dict) else {}
    docker: dict[str, Any] = config["docker"] if isinstance(config.get("docker"), dict) else {}
    options = docker.get("run_options") or []
    options = shlex.split(options) if isinstance(options, str) else [str(o) for o in options]
    return {"pod_config": dict(kubernetes.get("pod_config") or {}), "container_options": tuple(options)}


@functools.lru_cache(maxsize=1)
def local_container_engine() -> str | None:
    """The podman or docker this machine can run containers with (its daemon answers), else None."""
    for engine in ("podman", "docker"):
        path = shutil.which(engine)
        if path is None:
            continue
        try:
            if subprocess.run([path, "info"], capture_output=True, timeout=30).returncode == 0:
                return path
        except (OSError, subprocess.SubprocessError):
            continue
    return None
