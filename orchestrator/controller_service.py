"""Services, beside `service.py` and `pool_service.py`: the controller daemon and the controller VM as the CLI, the
dashboard and the job services see them (start, stop, status, log, SSH target). The one module above the
controller that reaches into `orchestrator.controller`; a test keeps the CLI, the dashboard and the other services
from importing its internals.

For now it re-exports the functions that live in `controller/daemon.py` and `deploy/remote.py` (being edited
for the HA leases); they can move here once that work has landed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.controller.daemon import (
    ControllerInfo,
    check_controller,
    controller_info,
    controller_log_path,
    ensure_controller,
    stop_controller,
)
from orchestrator.deploy.kubernetes import controller_up_kubernetes
from orchestrator.deploy.remote import (
    SshTarget,
    controller_down_vm,
    controller_program,
    controller_ssh_target,
    controller_stack,
    controller_up_vm,
    forget_host_key,
    remote_status,
)

if TYPE_CHECKING:
    from orchestrator.config import SortieConfig
    from state.leases import ReplicaView


def replicas(config: SortieConfig) -> list[ReplicaView]:
    """Every controller replica sharing this state DB, with the jobs and leases each holds."""
    from state.leases import replicas as all_replicas
    from state.store import StateStore

    return all_replicas(StateStore(config=config))


def state_db_error_line(exc: Exception) -> str:
    """One line on a state DB that cannot be opened, naming where it is (without a password)."""
    from orchestrator.config import load_config, sortie_home
    from state.db import database_url, safe_url
    from state.db_errors import describe_db_error

    try:
        home = sortie_home()
        where = safe_url(database_url(home, load_config(home)))
    except Exception:  # the config itself may be what fails; the line still says what happened
        where = "the configured state database"
    return describe_db_error(exc, where.removeprefix("sqlite:///"))  # type: ignore[arg-type]

__all__ = ["ControllerInfo", "SshTarget", "check_controller", "controller_down_vm", "controller_info",
           "controller_log_path", "controller_program", "controller_ssh_target", "controller_stack",
           "controller_up_kubernetes", "controller_up_vm", "ensure_controller", "forget_host_key", "remote_status",
           "replicas", "state_db_error_line", "stop_controller"]
