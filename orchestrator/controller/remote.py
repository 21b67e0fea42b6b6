"""The jobs controller on a cloud (`jobs.controller.infra`): a VM of its own stack that runs the controller daemon
against the shared PostgreSQL state, so the machine running `sortie` can go away. `sortie controller up/down`."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from orchestrator.config import CONFIG_FILE, SortieConfig
from orchestrator.errors import UsageError

CONTROLLER_STACK_KIND = "controller"


def controller_stack(config: SortieConfig) -> str:
    return f"{config.pulumi.stack_prefix}-controller-1"


def _shared_state_url(config: SortieConfig) -> str:
    import os

    url = os.environ.get("SORTIE_DB_URL") or config.state.url
    if not url or not url.startswith("postgresql"):
        raise UsageError(f"jobs.controller.infra: {config.jobs.controller.infra} needs a state DB the VM and you "
                         "share: set state.url to a PostgreSQL URL")
    return url


def check_remote(config: SortieConfig) -> None:
    """For a cloud controller: its stack must be up (else a clear error saying how to start it)."""
    from state.store import StateStore

    _shared_state_url(config)
    store = StateStore(config=config)
    row = next((r for r in store.live_stacks() if r.name == controller_stack(config)), None)
    if row is None or row.status != "UP":
        raise UsageError(f"the jobs controller runs on {config.jobs.controller.infra} (jobs.controller.infra) and is "
                         "not up: start it with `sortie controller up`")


def controller_program(config: SortieConfig, home: Path) -> tuple[Any, dict[str, Any]]:
    """The controller stack's program and what was chosen for it (instance, region, price)."""
    from orchestrator.clouds import check
    from orchestrator.optimizer import plan_for
    from stacks.spec import ClusterSpec, StackProgram, cloud_fields

    wanted = config.jobs.controller
    if wanted.infra == "kubernetes":
        raise UsageError("jobs.controller.infra: kubernetes is not supported yet (aws, gcp, azure are); "
                         "run the controller in a pod of your own with `python -m orchestrator.controller.daemon`")
    state_url = _shared_state_url(config)
    status = {c.cloud: c for c in check(config)}[wanted.infra]
    if not status.enabled:
        raise UsageError(f"jobs.controller.infra: {wanted.infra} is not enabled: {status.reason}")
    candidate = {"cloud": wanted.infra, "region": wanted.region, "cpus": wanted.resources.cpus,
                 "memory": wanted.resources.memory, "accelerators": {}}
    plan = plan_for([candidate], 1, config, ordered=False, enabled=(wanted.infra,))
    if plan.chosen is None:
        raise UsageError(f"no instance for the controller: {plan.infeasible}")
    option = plan.chosen
    config_file = home / CONFIG_FILE
    env = [f"SORTIE_DB_URL={state_url}"]
    if config_file.exists():
        env.append(f"SORTIE_CONFIG_B64={base64.b64encode(config_file.read_bytes()).decode()}")
    spec = ClusterSpec(name=controller_stack(config), infra=wanted.infra, region=option.offer.region,
                       zone=option.offer.zone, instance_type=option.offer.instance_type,
                       disk_size=wanted.resources.disk_size, token="\n".join(env) + "\n",
                       controller_package=wanted.package, **cloud_fields(config))
    chosen = {"instance_type": option.offer.instance_type, "region": option.offer.region,
              "price_per_hour": option.price_per_node}
    return StackProgram(CONTROLLER_STACK_KIND, spec), chosen
