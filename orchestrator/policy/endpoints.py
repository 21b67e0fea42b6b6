"""Policy, a job's endpoints: the `ports` its task opened, on the head node's address (`sortie jobs endpoints ID`,
`sortie jobs queue -v`). On the local cloud the ports are on the node's loopback (127.0.0.1); on a cloud, the head
node's public address (else its private one), where the firewall admits `cloud.ports_cidr`; on Kubernetes, what the
head pod's Service says (its load balancer's address, or the node IP and node port: the head node's `endpoints`)."""

from __future__ import annotations

from typing import Any

LOOPBACK = "127.0.0.1"


def task_ports(task: dict[str, Any]) -> list[str]:
    """The ports of a stored task (`Task.to_json()`): those of its candidates, merged in order."""
    found: list[str] = []
    for candidate in task.get("resources") or []:
        for port in candidate.get("ports") or []:
            if port not in found:
                found.append(str(port))
    return found


def _expand(port: str) -> list[int]:
    low, _, high = port.partition("-")
    return list(range(int(low), int(high or low) + 1))


def endpoints(task: dict[str, Any], infra: str | None, nodes: list[dict[str, Any]] | None) -> dict[int, str]:
    """Port -> `host:port` for a task's head node; {} while the task has no node (or opened no port).
    A range lists each port (ranges are bounded by parse_ports to 1-65535; shown up to 100 ports)."""
    ports = [p for spec in task_ports(task) for p in _expand(spec)][:100]
    head = next((n for n in nodes or [] if int(n.get("rank", 0) or 0) == 0), None)
    if not ports or head is None:
        return {}
    exposed = head.get("endpoints")
    if isinstance(exposed, dict) and exposed:  # a Kubernetes Service: its own address and port per port
        return {port: str(exposed[str(port)]) for port in ports if exposed.get(str(port))}
    cloud = (infra or "").split("/", 1)[0]
    host = LOOPBACK if cloud == "local" else (head.get("public_ip") or head.get("ip") or head.get("host"))
    if not host:
        return {}
    return {port: f"{host}:{port}" for port in ports}
