"""The jobs controller on a cloud (`jobs.controller.infra`): a VM of its own stack that runs the controller daemon
against the shared PostgreSQL state, so the machine running `sortie` can go away. `sortie controller up/down`."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import CONFIG_FILE, DASHBOARD_PORT, SortieConfig
from orchestrator.errors import UsageError

if TYPE_CHECKING:
    from state.models import StackRow

CONTROLLER_KEY = "sortie-controller"  # under <home>/ssh/, made at `controller up` unless cloud.ssh_public_key is set


@dataclass(frozen=True)
class SshTarget:
    """Where SSH reaches the controller VM, and the far end of the dashboard's tunnel on it."""

    host: str
    user: str
    port: int
    identity: Path | None  # None: ssh's own keys and agent
    known_hosts: Path
    dashboard_port: int

    def __str__(self) -> str:
        return f"{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")


def ssh_dir(home: Path) -> Path:
    return home / "ssh"


def controller_public_key(config: SortieConfig, home: Path) -> str:
    """The SSH key the controller VM admits: `cloud.ssh_public_key`, else Sortie's own (made now if missing,
    private half 0600 under <home>/ssh/)."""
    if config.cloud.ssh_public_key:
        return config.cloud.ssh_public_key.strip()
    private = ssh_dir(home) / CONTROLLER_KEY
    public = private.with_suffix(".pub")
    if not (private.exists() and public.exists()):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        private.unlink(missing_ok=True)
        with os.fdopen(os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption()))
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        public.write_text(f"{line.decode()} sortie-controller\n")
    return public.read_text().strip()


def forget_host_key(home: Path) -> None:
    """A new controller VM has a new host key: drop the one the tunnel accepted for the old VM."""
    (ssh_dir(home) / "known_hosts").unlink(missing_ok=True)


def remote_status(config: SortieConfig) -> str:
    """One line on the cloud controller's VM, from the shared state: its stack's status and address."""
    name = controller_stack(config)
    row = controller_row(config)
    where = f"runs on a VM on {config.jobs.controller.infra} (jobs.controller.infra)"
    if row is None or row.status != "UP":
        state = row.status if row else "never created"
        return f"controller: {where}, stack {name} {state}: start it with `sortie controller up`"
    if config.jobs.controller.infra == "kubernetes":  # issue 14: replicas of a Deployment, not a VM
        return deployment_status(config, name, dict(row.outputs or {}))
    node = dict((row.outputs or {}).get("controller") or {})
    address = node.get("public_ip") or node.get("ip") or "address not recorded"
    return (f"controller: {where}, stack {name} UP at {address} ({node.get('instance_type') or '?'}, "
            f"{node.get('region') or '?'}); `sortie dashboard` opens its dashboard")


def deployment_status(config: SortieConfig, name: str, outputs: dict[str, Any]) -> str:
    """`controller status` for replicas on Kubernetes, from the stack's outputs in the shared state."""
    found = dict(outputs.get("controller") or {})
    namespace = found.get("namespace") or "?"
    return (f"controller: {found.get('replicas', '?')} replica(s) on kubernetes (jobs.controller.infra), "
            f"Deployment {namespace}/{found.get('deployment') or name}, image {found.get('image') or '?'}, "
            f"stack {name} UP; `kubectl -n {namespace} get pods` lists them")


def controller_ssh_target(config: SortieConfig, home: Path) -> SshTarget:
    """How `sortie dashboard` reaches the cloud controller's VM, from its stack's outputs in the shared state."""
    if config.jobs.controller.infra == "kubernetes":  # issue 14: pods, no VM to tunnel to
        raise UsageError("the controllers run as pods on Kubernetes (jobs.controller.infra) and serve no dashboard; "
                         "`sortie dashboard` tunnels only to a controller VM")
    node = dict((check_remote(config).outputs or {}).get("controller") or {})
    host = node.get("public_ip") or node.get("ip")
    user = config.jobs.controller.ssh_user or node.get("ssh_user")
    if not host or not user:
        raise UsageError(f"the state has no SSH address for the controller VM ({controller_stack(config)}): "
                         "run `sortie controller up` again to record it")
    if config.cloud.ssh_public_key:
        identity = Path(config.cloud.ssh_private_key).expanduser() if config.cloud.ssh_private_key else None
    else:
        identity = ssh_dir(home) / CONTROLLER_KEY
    if identity is not None and not identity.exists():
        raise UsageError(f"the SSH key for the controller VM is missing: {identity} (cloud.ssh_private_key, or "
                         "Sortie's own key, made by the `sortie controller up` that created the VM)")
    return SshTarget(host=str(host), user=str(user), port=int(node.get("ssh_port") or 22), identity=identity,
                     known_hosts=ssh_dir(home) / "known_hosts",
                     dashboard_port=int(node.get("dashboard_port") or DASHBOARD_PORT))


def controller_stack(config: SortieConfig) -> str:
    return f"{config.pulumi.stack_prefix}-controller-1"


def _shared_state_url(config: SortieConfig) -> str:
    import os

    url = os.environ.get("SORTIE_DB_URL") or config.state.url
    if not url or not url.startswith("postgresql"):
        raise UsageError(f"jobs.controller.infra: {config.jobs.controller.infra} needs a state DB the VM and you "
                         "share: set state.url to a PostgreSQL URL")
    return url


def controller_row(config: SortieConfig) -> StackRow | None:
    """The cloud controller's stack row in the shared state (None: never created)."""
    from state.store import StateStore

    _shared_state_url(config)
    return StateStore(config=config).stack(controller_stack(config))


def check_remote(config: SortieConfig) -> StackRow:
    """For a cloud controller: its stack must be up (else a clear error saying how to start it)."""
    row = controller_row(config)
    if row is None or row.status != "UP":
        raise UsageError(f"the jobs controller runs on {config.jobs.controller.infra} (jobs.controller.infra) and is "
                         "not up: start it with `sortie controller up`")
    return row


def controller_program(config: SortieConfig, home: Path) -> tuple[Any, dict[str, Any]]:
    """The controller stack's program and what was chosen for it (instance, region, price)."""
    from orchestrator.infra.clouds import check
    from orchestrator.policy.optimizer import plan_for
    from stacks.spec import ClusterSpec, StackProgram, cloud_fields

    wanted = config.jobs.controller
    if wanted.infra == "kubernetes":
        raise UsageError("jobs.controller.infra: kubernetes is not supported yet (aws, gcp, azure are); "
                         "run the controller in a pod of your own with `python -m orchestrator.controller.daemon`")
    state_url = _shared_state_url(config)
    status = {c.cloud: c for c in check(config)}[wanted.infra]
    if not status.enabled:
        raise UsageError(f"jobs.controller.infra: {wanted.infra} is not enabled: {status.reason}")
    candidate: dict[str, Any] = {"cloud": wanted.infra, "region": wanted.region, "cpus": wanted.resources.cpus,
                 "memory": wanted.resources.memory, "accelerators": {}}
    plan = plan_for([candidate], 1, config, ordered=False, enabled=(wanted.infra,))
    if plan.chosen is None:
        raise UsageError(f"no instance for the controller: {plan.infeasible}")
    option = plan.chosen
    config_file = home / CONFIG_FILE
    env = [f"SORTIE_DB_URL={state_url}"]
    from state.secrets_box import STATE_KEY_ENV, SecretsBox

    env.append(f"{STATE_KEY_ENV}={SecretsBox(home).key}")  # issue 17: the VM opens the secrets this home sealed
    if config_file.exists():
        env.append(f"SORTIE_CONFIG_B64={base64.b64encode(config_file.read_bytes()).decode()}")
    fields = {**cloud_fields(config), "ssh_public_key": controller_public_key(config, home),
              "ssh_cidr": wanted.ssh_cidr}
    spec = ClusterSpec(name=controller_stack(config), infra=wanted.infra, region=option.offer.region,
                       zone=option.offer.zone, instance_type=option.offer.instance_type,
                       disk_size=wanted.resources.disk_size, token="\n".join(env) + "\n",
                       controller_package=wanted.package, **fields)
    chosen = {"instance_type": option.offer.instance_type, "region": option.offer.region,
              "price_per_hour": option.price_per_node}
    return StackProgram("controller", spec), chosen


def controller_up_vm(config: SortieConfig, home: Path, *, say: Callable[[str], Any],
                     confirm: Callable[[str], bool] | None) -> bool:
    """`sortie controller up` on a cloud: the controller's VM as its own stack, its address (public outputs only)
    in the shared state, so `sortie dashboard` tunnels to it from anywhere. False: the user said no."""
    from orchestrator.infra.pulumi_driver import PulumiStackDriver
    from state.machine import StackKind
    from state.store import StateStore

    program, chosen = controller_program(config, home)
    name = controller_stack(config)
    say(f"Controller VM: {config.jobs.controller.infra}/{chosen['region']} {chosen['instance_type']} "
        f"(${chosen['price_per_hour']:.3f}/h), stack {name}")
    if confirm is not None and not confirm("Proceed?"):
        return False
    store = StateStore(home, config)
    store.record_stack(name, StackKind.CONTROLLER)
    forget_host_key(home)
    result = PulumiStackDriver(home, config).up(name, program)
    store.stack_up(name, outputs=result.public_outputs())
    node = result.outputs.get("controller") or {}
    say(f"controller up: {node.get('node_id')} at {node.get('public_ip') or node.get('ip')} (private "
        f"{node.get('ip')}); `sortie dashboard` opens its dashboard")
    return True


def controller_down_vm(config: SortieConfig, home: Path) -> str:
    """`sortie controller down`: destroy the controller's stack and forget it; returns the stack's name."""
    from orchestrator.infra.pulumi_driver import PulumiStackDriver
    from state.store import StateStore

    name = controller_stack(config)
    PulumiStackDriver(home, config).destroy(name)
    StateStore(home, config).stack_destroyed(name, missing_ok=True)
    forget_host_key(home)
    return name
