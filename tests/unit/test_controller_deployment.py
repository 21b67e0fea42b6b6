"""Controller replicas on Kubernetes (issue 14): the program `sortie controller up --replicas N` deploys, under
`pulumi.runtime.set_mocks` (no engine, no cluster), and the refusals of `--replicas` through the real CLI."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pulumi
import pytest
import yaml

from orchestrator.config import CONTROLLER_ID_ENV, ControllerConfig, SortieConfig, load_config
from orchestrator.deploy.kubernetes import deployment_program, without_password
from orchestrator.errors import SortieError
from stacks.controller_deployment import (
    AUTOSTOP_NEVER_MINUTES,
    PASSPHRASE_FILE,
    SECRETS_DIR,
    TYPE,
    SortieControllers,
    pod_config,
)
from tests.support.cloud_mocks import is_secret, public, reveal
from tests.support.e2e import one_line_error

pytest.importorskip("pulumi_kubernetes")

SORTIE = Path(sys.executable).parent / "sortie"
DB_PASSWORD = "s3cr3t-Pw%2F"  # percent-encoded in URLs: the pod gets it decoded
STATE_URL = f"postgresql://sortie:{DB_PASSWORD}@db.internal:5432/sortie"
BACKEND_URL = f"postgres://sortie:{DB_PASSWORD}@db.internal:5432/sortie?table=pulumi_state"
IMAGE = "registry.example/sortie:1.0"
SECRET = "kubernetes:core/v1:Secret"
CONFIG_MAP = "kubernetes:core/v1:ConfigMap"
DEPLOYMENT = "kubernetes:apps/v1:Deployment"


class Mocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[tuple[str, str, dict[str, Any]]] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append((args.typ, args.name, dict(args.inputs)))
        return f"{args.name}-id", dict(args.inputs)

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}

    def of_type(self, typ: str) -> list[dict[str, Any]]:
        return [inputs for t, _n, inputs in self.resources if t == typ]


@pytest.fixture
def mocks() -> Mocks:
    found = Mocks()
    pulumi.runtime.set_mocks(found, project="sortie", stack="test", preview=False)
    return found


def run(program: Callable[[], Any]) -> None:
    @pulumi.runtime.test
    def body() -> None:
        program()

    body()


@pytest.fixture
def ha_home(sortie_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home set up for replicas on Kubernetes: PostgreSQL for both states, passwords in the URLs."""
    monkeypatch.delenv("SORTIE_DB_URL", raising=False)
    monkeypatch.delenv("SORTIE_STATE_KEY", raising=False)
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE_FILE", raising=False)
    (sortie_home / "config.yaml").write_text(yaml.safe_dump({
        "state": {"url": STATE_URL},
        "pulumi": {"backend_url": BACKEND_URL},
        "controller": {"id": "laptop", "lease_seconds": 20, "autostop_idle_minutes": 5, "logs_dir": "/home/me/logs"},
        "jobs": {"controller": {"infra": "kubernetes", "resources": {"cpus": "2", "memory": "4+"}}},
    }))
    return sortie_home


def deploy(home: Path, replicas: int) -> Callable[[], None]:
    program, _chosen = deployment_program(load_config(home), home, replicas, IMAGE)
    return program.build()


@pytest.mark.parametrize("replicas", [1, 2, 5])
def test_the_deployment_runs_n_replicas_of_the_image(ha_home: Path, mocks: Mocks, replicas: int) -> None:
    run(deploy(ha_home, replicas))
    (deployment,) = mocks.of_type(DEPLOYMENT)
    spec = deployment["spec"]
    assert spec["replicas"] == replicas
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = spec["template"]["spec"]["containers"]
    assert container["image"] == IMAGE
    assert container["command"] == ["python", "-m", "orchestrator.controller.daemon"]
    assert "livenessProbe" not in container  # nothing in the daemon to probe: see the module's docstring
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2"}}
    assert [t for t, _n, _i in mocks.resources].count(TYPE) == 1  # one component holds it all


def test_the_secret_holds_the_secrets_as_pulumi_secrets(ha_home: Path, mocks: Mocks) -> None:
    from orchestrator.config import passphrase_file
    from state.secrets_box import SecretsBox

    run(deploy(ha_home, 2))
    (secret,) = mocks.of_type(SECRET)
    assert is_secret(secret["stringData"])
    assert reveal(secret["stringData"]) == {
        "pulumi-passphrase": passphrase_file(ha_home).read_text().strip(),
        "state-key": SecretsBox(ha_home).key,
        "state-url": STATE_URL,
        "pg-password": "s3cr3t-Pw/",
    }
    secrets = ("s3cr3t", passphrase_file(ha_home).read_text().strip(), SecretsBox(ha_home).key)
    for typ, name, inputs in mocks.resources:  # what the stack's state keeps in clear, of every resource
        stored = repr(public(inputs))
        assert not [s for s in secrets if s in stored], (typ, name)


def test_the_config_map_holds_no_password(ha_home: Path, mocks: Mocks) -> None:
    from orchestrator.config import passphrase_file
    from state.secrets_box import SecretsBox

    run(deploy(ha_home, 2))
    (config_map,) = mocks.of_type(CONFIG_MAP)
    text = config_map["data"]["config.yaml"]
    for secret in ("s3cr3t", passphrase_file(ha_home).read_text().strip(), SecretsBox(ha_home).key):
        assert secret not in text
    config = yaml.safe_load(text)
    assert "url" not in config.get("state", {})  # $SORTIE_DB_URL, from the Secret
    assert config["pulumi"]["backend_url"] == "postgres://sortie@db.internal:5432/sortie?table=pulumi_state"
    assert "id" not in config["controller"]  # each pod's name is its id
    assert "logs_dir" not in config["controller"]  # this home's path, not the pod's
    assert config["controller"]["lease_seconds"] == 20
    assert config["controller"]["autostop_idle_minutes"] == AUTOSTOP_NEVER_MINUTES
    assert config["jobs"]["controller"]["infra"] == "local"
    SortieConfig.model_validate(config)  # a config the daemon loads


def test_each_pod_gets_its_name_the_passphrase_file_and_the_secrets(ha_home: Path, mocks: Mocks) -> None:
    run(deploy(ha_home, 2))
    (secret,) = mocks.of_type(SECRET)
    (deployment,) = mocks.of_type(DEPLOYMENT)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PULUMI_CONFIG_PASSPHRASE_FILE"]["value"] == PASSPHRASE_FILE
    assert env["SORTIE_CONTROLLER_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    name = secret["metadata"]["name"]
    for var, key in (("SORTIE_STATE_KEY", "state-key"), ("SORTIE_DB_URL", "state-url"), ("PGPASSWORD", "pg-password")):
        assert env[var]["valueFrom"] == {"secretKeyRef": {"name": name, "key": key}}, var
        assert "value" not in env[var]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["secrets"]["mountPath"] == SECRETS_DIR
    (item,) = volumes["secrets"]["secret"]["items"]  # the file the env names is the Secret's, mounted
    assert env["PULUMI_CONFIG_PASSPHRASE_FILE"]["value"] == f"{mounts['secrets']['mountPath']}/{item['path']}"
    assert volumes["secrets"]["secret"]["secretName"] == name
    assert volumes["secrets"]["secret"]["items"] == [{"key": "pulumi-passphrase", "path": "pulumi-passphrase"}]
    assert mounts["config"]["mountPath"] == "/var/lib/sortie/config.yaml" and env["SORTIE_HOME"]["value"] == \
        "/var/lib/sortie"


def test_logs_go_to_the_shared_claim(ha_home: Path, mocks: Mocks) -> None:
    program, _ = deployment_program(load_config(ha_home), ha_home, 2, IMAGE, logs_claim="sortie-logs")
    run(program.build())
    (deployment,) = mocks.of_type(DEPLOYMENT)
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "shared", "persistentVolumeClaim": {"claimName": "sortie-logs"}} in pod["volumes"]
    (config_map,) = mocks.of_type(CONFIG_MAP)
    assert yaml.safe_load(config_map["data"]["config.yaml"])["controller"]["logs_dir"] == "/var/lib/sortie-shared/logs"


def test_the_program_travels_pickled_to_the_stack_worker(ha_home: Path) -> None:
    program, chosen = deployment_program(load_config(ha_home), ha_home, 3, IMAGE)
    assert program.kind == "controller" and program.spec.name == "sortie-controller-1"  # controller down's stack
    assert "s3cr3t" not in repr(program)
    again = pickle.loads(pickle.dumps(program))
    assert again == program and callable(again.build())
    assert chosen == {"namespace": "sortie-controller", "replicas": 3, "image": IMAGE}


def test_controller_up_records_the_stack_that_controller_down_destroys(ha_home: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`up` deploys the replicas as the controller's stack and records it UP; `down` destroys that same stack
    (driver and store stand-ins: no engine, no database)."""
    import orchestrator.infra.pulumi_driver
    import state.store
    from cli.jobs import controller_down
    from orchestrator.deploy.kubernetes import controller_up_kubernetes
    from orchestrator.infra.stack_driver import UpResult

    calls: list[tuple[str, str]] = []

    class Driver:
        def __init__(self, *_args: Any) -> None:
            pass

        def up(self, name: str, program: Any) -> UpResult:
            calls.append(("up", name))
            assert program.deployment.replicas == 2
            return UpResult(name, {"controller": {"namespace": "sortie-controller", "deployment": name,
                                                  "replicas": 2, "image": IMAGE}, "infra": "kubernetes"})

        def destroy(self, name: str) -> None:
            calls.append(("destroy", name))

    class Store:
        def __init__(self, *_args: Any, **_kwargs: Any) -> None:
            pass

        def record_stack(self, name: str, kind: Any) -> None:
            calls.append((f"record {kind.value}", name))

        def stack_up(self, name: str, outputs: dict[str, Any]) -> None:
            calls.append(("stack_up", name))

        def stack_destroyed(self, name: str, missing_ok: bool = False) -> None:
            calls.append(("stack_destroyed", name))

    monkeypatch.setattr(orchestrator.infra.pulumi_driver, "PulumiStackDriver", Driver)
    monkeypatch.setattr(state.store, "StateStore", Store)
    said: list[str] = []
    assert not controller_up_kubernetes(load_config(ha_home), ha_home, 2, IMAGE, None, say=said.append,
                                        confirm=lambda _q: False)
    assert calls == []  # the user said no: nothing recorded, nothing made
    assert controller_up_kubernetes(load_config(ha_home), ha_home, 2, IMAGE, None, say=said.append, confirm=None)
    controller_down(yes=True)
    stack = "sortie-controller-1"
    assert calls == [("record controller", stack), ("up", stack), ("stack_up", stack), ("destroy", stack),
                     ("stack_destroyed", stack)], calls
    assert "2 replica(s) on kubernetes" in said[-1] and "sortie-controller/sortie-controller-1" in said[-1], said


def test_the_component_refuses_a_password_in_its_config_map(mocks: Mocks) -> None:
    with pytest.raises(ValueError, match=r"pulumi\.backend_url .* holds a password"):
        pod_config({"pulumi": {"backend_url": BACKEND_URL}})
    with pytest.raises(ValueError, match="replicas must be between 1 and 16"):
        SortieControllers("c", image=IMAGE, config={"pulumi": {"backend_url": "postgres://u@h/d"}}, passphrase="p",
                          state_key="k", state_url="postgresql://u@h/d", replicas=17)


def test_without_password() -> None:
    assert without_password(BACKEND_URL) == ("postgres://sortie@db.internal:5432/sortie?table=pulumi_state",
                                             "s3cr3t-Pw/")
    assert without_password("postgres://u@h/d?table=t") == ("postgres://u@h/d?table=t", None)


def test_the_replica_id_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = ControllerConfig(id="from-config")
    monkeypatch.delenv(CONTROLLER_ID_ENV, raising=False)
    assert config.replica_id(tmp_path) == "from-config"
    monkeypatch.setenv(CONTROLLER_ID_ENV, "sortie-controller-1-5d8f7-x2x9q")
    assert config.replica_id(tmp_path) == "sortie-controller-1-5d8f7-x2x9q"
    monkeypatch.setenv(CONTROLLER_ID_ENV, "no spaces/allowed")
    with pytest.raises(SortieError, match=CONTROLLER_ID_ENV):
        config.replica_id(tmp_path)


# --- `sortie controller up --replicas`: what refuses, as one line ---------------------------------------------------


def sortie(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SORTIE_DEBUG", "SORTIE_DB_URL", "COLUMNS", "LINES")}
    env["SORTIE_HOME"] = str(home)
    return subprocess.run([str(SORTIE), *args], capture_output=True, text=True, env=env, timeout=120)



@pytest.mark.parametrize(("settings", "replicas", "names"), [
    ({"pulumi": {"backend_url": BACKEND_URL}}, "2", "state.url"),  # SQLite, the default
    ({"state": {"url": "sqlite:////tmp/state.db"}, "pulumi": {"backend_url": BACKEND_URL}}, "3", "state.url"),
    ({"state": {"url": STATE_URL}}, "2", "pulumi.backend_url"),  # the file backend, the default
    ({"state": {"url": STATE_URL}, "pulumi": {"backend_url": "file:///srv/pulumi"}}, "2", "pulumi.backend_url"),
    ({"state": {"url": STATE_URL}, "pulumi": {"backend_url": BACKEND_URL}}, "0", "between 1 and 16"),
    ({"state": {"url": STATE_URL}, "pulumi": {"backend_url": BACKEND_URL}}, "17", "between 1 and 16"),
], ids=["sqlite-default", "sqlite-url", "file-default", "file-url", "zero", "seventeen"])
def test_controller_up_replicas_refusals(sortie_home: Path, settings: dict[str, Any], replicas: str,
                                         names: str) -> None:
    config = {**settings, "jobs": {"controller": {"infra": "kubernetes"}}}
    (sortie_home / "config.yaml").write_text(yaml.safe_dump(config))
    line = one_line_error(sortie(sortie_home, "controller", "up", "--replicas", replicas, "--image", IMAGE, "-y"))
    assert names in line, line
    assert "s3cr3t" not in line


def test_several_replicas_need_kubernetes(sortie_home: Path) -> None:
    (sortie_home / "config.yaml").write_text(yaml.safe_dump({
        "state": {"url": STATE_URL}, "pulumi": {"backend_url": BACKEND_URL},
        "jobs": {"controller": {"infra": "aws"}}}))
    line = one_line_error(sortie(sortie_home, "controller", "up", "--replicas", "2", "-y"))
    assert "jobs.controller.infra" in line and "examples/ha" in line, line


def test_controller_pods_need_an_image(sortie_home: Path) -> None:
    (sortie_home / "config.yaml").write_text(yaml.safe_dump({
        "state": {"url": STATE_URL}, "pulumi": {"backend_url": BACKEND_URL},
        "jobs": {"controller": {"infra": "kubernetes"}}}))
    env_image = os.environ.pop("SORTIE_CONTROLLER_IMAGE", None)
    try:
        line = one_line_error(sortie(sortie_home, "controller", "up", "--replicas", "2", "-y"))
    finally:
        if env_image is not None:
            os.environ["SORTIE_CONTROLLER_IMAGE"] = env_image
    assert "--image" in line, line


def test_the_dashboard_says_the_pods_serve_none(ha_home: Path) -> None:
    from orchestrator.deploy.remote import controller_ssh_target
    from orchestrator.errors import UsageError

    with pytest.raises(UsageError, match="pods on Kubernetes"):
        controller_ssh_target(load_config(ha_home), ha_home)
