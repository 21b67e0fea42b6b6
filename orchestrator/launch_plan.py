"""Services, the plan of a `jobs launch` (issue 23 / 27): what the CLI shows before it submits, made by the service so
that the in-process and HTTP transports show the same thing. SkyPilot's "Considered resources" tables, the refusals
(nothing can serve it; outside the workspace's `allowed_infra`), where a job group goes, and the files and buckets."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.config import SortieConfig
    from orchestrator.spec import Pipeline
    from orchestrator.storage.staging import StoragePlan

MAX_TABLE_ROWS = 8
CLOUD_NAMES = {"local": "Local", "aws": "AWS", "gcp": "GCP", "azure": "Azure", "kubernetes": "Kubernetes"}


@dataclass
class LaunchPlan:
    """What `jobs launch` prints before it asks, and why it must not submit (`refusals`, one line)."""

    tables: list[str]
    refusals: list[str]
    shared_infra: str | None
    storage_lines: list[str]
    storage: StoragePlan | None = field(default=None, repr=False)  # in-process only; the HTTP server keeps its own
    storage_error: tuple[str, int] | None = None  # the storage check's one line and exit code, raised after the tables

    def raise_storage_error(self) -> None:
        from orchestrator.errors import SortieError, UsageError

        if self.storage_error is not None:
            line, code = self.storage_error
            raise (UsageError if code == 2 else SortieError)(line)

    def to_json(self) -> dict[str, Any]:
        return {"tables": self.tables, "refusals": self.refusals, "shared_infra": self.shared_infra,
                "storage_lines": self.storage_lines, "storage_error": self.storage_error}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LaunchPlan:
        return cls([str(t) for t in data["tables"]], [str(r) for r in data["refusals"]], data.get("shared_infra"),
                   [str(s) for s in data.get("storage_lines") or []],
                   storage_error=tuple(data["storage_error"]) if data.get("storage_error") else None)  # type: ignore[arg-type]


def render(item: Any, width: int) -> str:
    """A Rich renderable as the CLI's console prints it (plain text, `width` columns)."""
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=width, highlight=False, soft_wrap=True, markup=False, color_system=None).print(item)
    return out.getvalue().rstrip("\n")


def infra_refusals(pipeline: Pipeline, allowed: list[str] | None, workspace: str | None) -> list[str]:
    """A task whose resources may land outside the workspace's `allowed_infra` (one line each, naming it)."""
    if allowed is None:
        return []
    found: list[str] = []
    for index, task in enumerate(pipeline.tasks):
        for candidate in task.candidates():
            infra = candidate.infra
            if infra is None or not any(infra == a or infra.startswith(a.rstrip("/") + "/") for a in allowed):
                prefix = f"task[{index}]: " if len(pipeline.tasks) > 1 else ""
                found.append(f"{prefix}infra {infra or '(any)'} is outside workspace {workspace}'s allowed_infra "
                             f"({', '.join(allowed)}); set --infra to one of them")
                break
    return found


def considered_tables(pipeline: Pipeline, config: SortieConfig | None = None,
                      enabled: tuple[str, ...] | None = None) -> list[Any]:
    """SkyPilot's "Considered resources" table for each task: the cheapest option of each cloud and
    alternative, priced for all its nodes, the chosen one marked."""
    from rich.table import Table

    from orchestrator.config import load_config
    from orchestrator.policy.optimizer import plan_for

    config = config or load_config()
    out: list[Any] = []
    for index, task in enumerate(pipeline.tasks):
        cands = [c.to_json() for c in task.candidates()]
        plan = plan_for(cands, task.num_nodes, config, ordered=task.resources_ordered(), enabled=enabled)
        nodes = f"{task.num_nodes} node{'s' if task.num_nodes > 1 else ''}"
        title = f"Considered resources ({nodes})" + (f" for task {index} ({task.name})" if len(pipeline.tasks) > 1
                                                     else "")
        table = Table("INFRA", "INSTANCE", "vCPUs", "Mem(GB)", "GPUS", "COST ($)", "CHOSEN", box=None, title=title,
                      title_justify="left")
        shown: set[tuple[str, int]] = set()
        for option in plan.options:
            key = (option.offer.cloud, option.candidate_index)
            if key in shown and option is not plan.chosen:
                continue
            shown.add(key)
            offer = option.offer
            local = offer.cloud == "local"
            gpus = ", ".join(f"{k}:{v:g}" for k, v in offer.accelerators.items()) or "-"
            cloud_name = CLOUD_NAMES.get(offer.cloud, offer.cloud)
            table.add_row(f"{cloud_name} ({offer.region}{', spot' if option.use_spot else ''})",
                          offer.instance_type, "-" if local else f"{offer.vcpus:g}",
                          "-" if local else f"{offer.memory_gib:g}", gpus, f"{option.cost_per_hour:.2f}",
                          "✔" if option is plan.chosen else "")
            if len(shown) >= MAX_TABLE_ROWS:
                break
        if plan.options:
            out.append(table)
        if plan.infeasible:
            out.append(f"No feasible resources: {plan.infeasible}")
    return out
