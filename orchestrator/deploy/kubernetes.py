"""Controller replicas on Kubernetes (issue 14): `sortie controller up --replicas N` with
`jobs.controller.infra: kubernetes` deploys `stacks/controller_deployment.py` as the controller's stack (the same
stack name as a controller VM, so `controller down`, `controller status` and the submit check see it).

Several replicas share Sortie's state and Pulumi's through PostgreSQL; what refuses otherwise is `check_replicas`.
The secrets this home holds (the Pulumi passphrase, the state key, the database passwords) go into the stack as
Pulumi secrets, and from there into a Kubernetes Secret; the replicas' config.yaml (a ConfigMap) holds none."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from orchestrator.config import CONFIG_FILE, SortieConfig
from orchestrator.deploy.remote import controller_stack, deployment_status
from orchestrator.errors import UsageError

if TYPE_CHECKING:
    from stacks.spec import StackProgram

MAX_REPLICAS = 16  # stacks.controller_deployment.MAX_REPLICAS (not imported: that module imports pulumi)
PG_HINT = "postgres://USER@HOST:5432/DB?table=pulumi_state"


def check_replicas(config: SortieConfig, home: Path, replicas: int) -> None:
    """One line saying what to change when `replicas` controllers cannot run on this config."""
    from orchestrator.infra.engine import backend_url
    from orchestrator.infra.pulumi_pg import is_postgres
    from state.db import database_url

    if not 1 <= replicas <= MAX_REPLICAS:
        raise UsageError(f"--replicas must be between 1 and {MAX_REPLICAS} (got {replicas})")
    infra = config.jobs.controller.infra
    if replicas > 1 and infra != "kubernetes":
        raise UsageError(f"--replicas {replicas} runs controller pods on Kubernetes: set jobs.controller.infra to "
                         f"kubernetes (it is {infra}); for replicas on VMs see examples/ha/")
    several = f"{replicas} controller replicas" if replicas > 1 else "a controller pod (it keeps no files)"
    if not database_url(home, config).startswith("postgresql"):
        raise UsageError(f"{several} need Sortie's state in PostgreSQL: set state.url to postgresql://... "
                         "(SQLite allows one controller)")
    if not is_postgres(backend_url(config, home)):
        raise UsageError(f"{several} need Pulumi's state in PostgreSQL: set pulumi.backend_url to {PG_HINT} "
                         "(a file:// backend is one machine's)")


def without_password(url: str) -> tuple[str, str | None]:
    """`url` with its password taken out, and the password (decoded), if it had one."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), unquote(parts.password)


def _quantities(text: str, unit: str) -> tuple[str, bool]:
    """`2+` -> ("2", False); `4` -> ("4", True): the request, and whether it is exact (also the limit)."""
    value = text.strip()
    return value.rstrip("+").strip() + unit, not value.endswith("+")


def pod_resources(config: SortieConfig) -> dict[str, dict[str, str]]:
    """Requests from `jobs.controller.resources` (limits too where exact, as for nodes)."""
    wanted = config.jobs.controller.resources
    cpu, cpu_exact = _quantities(wanted.cpus, "")
    memory, memory_exact = _quantities(wanted.memory, "Gi")
    limits = {k: v for k, v, exact in (("cpu", cpu, cpu_exact), ("memory", memory, memory_exact)) if exact}
    return {"requests": {"cpu": cpu, "memory": memory}, **({"limits": limits} if limits else {})}


def deployment_program(config: SortieConfig, home: Path, replicas: int, image: str,
                       logs_claim: str | None = None) -> tuple[StackProgram, dict[str, Any]]:
    """The controller stack's program (a Deployment of `replicas` pods of `image`), and what was chosen."""
    import yaml

    from orchestrator.config import passphrase_file
    from stacks.controller_deployment import ControllerDeploymentSpec, deployment_stack_program
    from state.db import database_url
    from state.secrets_box import SecretsBox

    check_replicas(config, home, replicas)
    if not image:
        raise UsageError("controller pods need an image with Sortie and the engine installed: --image "
                         "REGISTRY/sortie:TAG (examples/ha/README.md builds one)")
    path = home / CONFIG_FILE
    raw: dict[str, Any] = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    backend, backend_password = without_password(str(config.pulumi.backend_url))
    raw["pulumi"] = {**dict(raw.get("pulumi") or {}), "backend_url": backend}
    raw["state"] = {k: v for k, v in dict(raw.get("state") or {}).items() if k != "url"}  # the Secret's
    passphrase = passphrase_file(home).read_text().strip() if config.pulumi.secrets_provider == "passphrase" else ""
    kube = config.kubernetes
    namespace = kube.namespace or "sortie-controller"
    spec = ControllerDeploymentSpec(
        name=controller_stack(config), image=image, replicas=replicas, config=raw, namespace=namespace,
        create_namespace=kube.namespace is None, logs_claim=logs_claim, resources=pod_resources(config),
        labels={"sortie": "controller"},
        kubeconfig=kube.kubeconfig, context=kube.context, passphrase=passphrase, state_key=SecretsBox(home).key,
        state_url=database_url(home, config), backend_password=backend_password)
    return deployment_stack_program(spec), {"namespace": namespace, "replicas": replicas, "image": image}




def controller_up_kubernetes(config: SortieConfig, home: Path, replicas: int, image: str, logs_claim: str | None,
                             *, say: Callable[[str], Any], confirm: Callable[[str], bool] | None) -> bool:
    """`sortie controller up [--replicas N]` on kubernetes: deploy the replicas as the controller's stack, recorded
    in the shared state like a controller VM. False: the user said no."""
    from orchestrator.infra.pulumi_driver import PulumiStackDriver
    from state.machine import StackKind
    from state.store import StateStore

    program, chosen = deployment_program(config, home, replicas, image, logs_claim)
    name = program.spec.name
    say(f"Controller: {replicas} replica(s) of {image} on kubernetes, namespace {chosen['namespace']}, stack {name}")
    if confirm is not None and not confirm("Proceed?"):
        return False
    store = StateStore(home, config)
    store.record_stack(name, StackKind.CONTROLLER)
    result = PulumiStackDriver(home, config).up(name, program)
    store.stack_up(name, outputs=result.public_outputs())
    say(deployment_status(config, name, result.public_outputs()))
    return True
