"""The layers of ARCHITECTURE.md, "Parts and their rooms": nothing below imports from above, and the CLI, the
dashboard and the services reach the controller only through `orchestrator.controller_service`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ABOVE_INFRA = ("orchestrator.controller", "orchestrator.service", "orchestrator.pool_service",
               "orchestrator.controller_service", "orchestrator.launch_checks", "orchestrator.dashboard", "cli")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _offenders(folder: str, banned: tuple[str, ...], skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in skip:
            continue
        hits = sorted(m for m in _imports(path) if any(m == b or m.startswith(b + ".") for b in banned))
        if hits:
            bad[rel] = hits
    return bad


def test_the_node_package_imports_nothing_of_sortie_but_itself() -> None:
    """node_storage is the exception: it runs with Sortie installed on the node (storage, config)."""
    banned = ("orchestrator.config", "orchestrator.errors", "orchestrator.infra", "orchestrator.policy",
              "orchestrator.storage", "orchestrator.spec", *ABOVE_INFRA, "state", "stacks")
    assert _offenders("orchestrator/node", banned, skip=("orchestrator/node/node_storage.py",)) == {}


def test_infra_and_policy_never_import_the_controller_or_the_services() -> None:
    assert _offenders("orchestrator/infra", ABOVE_INFRA) == {}
    assert _offenders("orchestrator/policy", (*ABOVE_INFRA, "orchestrator.infra.pulumi_driver")) == {}


def test_state_never_imports_the_controller_the_services_or_the_cli() -> None:
    assert _offenders("state", ABOVE_INFRA) == {}


def test_cli_dashboard_and_services_reach_the_controller_through_its_service_only() -> None:
    internals = ("orchestrator.controller",)
    assert _offenders("cli", internals) == {}
    assert _offenders("orchestrator/dashboard", internals) == {}
    for service in ("orchestrator/service.py", "orchestrator/pool_service.py", "orchestrator/launch_checks.py"):
        hits = sorted(m for m in _imports(ROOT / service) if m.startswith("orchestrator.controller."))
        assert hits == [], (service, hits)
