"""Services, beside `service.py` and `pool_service.py`: the controller daemon and the controller VM as the CLI, the
dashboard and the job services see them (start, stop, status, log, SSH target). The one module above the
controller that reaches into `orchestrator.controller`; a test keeps the CLI, the dashboard and the other services
from importing its internals.

For now it re-exports the functions that live in `controller/daemon.py` and `deploy/remote.py` (being edited
for the HA leases); they can move here once that work has landed.
"""

from __future__ import annotations

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
    controller_program,
    controller_ssh_target,
    controller_stack,
    forget_host_key,
    remote_status,
)

__all__ = ["ControllerInfo", "SshTarget", "check_controller", "controller_info", "controller_log_path",
           "controller_program", "controller_ssh_target", "controller_stack", "controller_up_kubernetes",
           "ensure_controller", "forget_host_key", "remote_status", "stop_controller"]
