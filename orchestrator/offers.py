"""What the optimizer chooses among, as plain data below both policy and infra (issue 27, section 2): infra turns a
Kubernetes cluster's nodes into offers (`infra/kube_capacity.py`), the policy prices and orders them
(`policy/optimizer.py`), and neither imports the other for it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Offer:
    """One instance type in one region (or zone) of one cloud, with its prices."""

    cloud: str
    instance_type: str
    vcpus: float
    memory_gib: float
    accelerators: dict[str, float]
    region: str
    zone: str | None
    price: float
    spot_price: float | None
