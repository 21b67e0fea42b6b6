"""The API server next to the controller replicas (issue 23, section 5): `SortieControllers(..., api=ApiServer(...))`
under `pulumi.runtime.set_mocks` (no engine, no cluster): its Deployment, Service, secrets and probes."""

from __future__ import annotations

from typing import Any

import pulumi
import pytest

from stacks.api_deployment import ADMIN_TOKEN_ENV, HEALTH_PATH, TLS_DIR, ApiServer
from stacks.controller_deployment import PASSPHRASE_FILE, SECRETS_DIR, SortieControllers
from tests.support.cloud_mocks import is_secret, public, reveal
from tests.unit.test_controller_deployment import CONFIG_MAP, DEPLOYMENT, IMAGE, SECRET, Mocks, run

pytest.importorskip("pulumi_kubernetes")

SERVICE = "kubernetes:core/v1:Service"
CONFIG = {"pulumi": {"backend_url": "postgres://sortie@db.internal:5432/sortie?table=pulumi_state"},
          "controller": {"lease_seconds": 30}}
STATE_URL = "postgresql://sortie:db-Pw-9f1@db.internal:5432/sortie"
SECRETS = {"passphrase": "pass-8c2d1e", "state_key": "key-77aa0b", "state_url": STATE_URL,
           "backend_password": "db-Pw-9f1"}
ADMIN_TOKEN = "sortie_admin_3b9f0c2e71d4"


@pytest.fixture
def mocks() -> Mocks:
    found = Mocks()
    pulumi.runtime.set_mocks(found, project="sortie", stack="test", preview=False)
    return found


def deploy(api: ApiServer | None = None, **kwargs: Any) -> None:
    settings = {**SECRETS, **kwargs}
    run(lambda: SortieControllers("sortie", image=IMAGE, config=CONFIG, namespace="platform", api=api,
                                  logs_claim="sortie-logs", **settings))


def deployments(mocks: Mocks) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in mocks.of_type(DEPLOYMENT)}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_the_api_server_is_a_deployment_and_a_service(mocks: Mocks) -> None:
    deploy(ApiServer(replicas=2, admin_token=ADMIN_TOKEN))
    found = deployments(mocks)
    assert set(found) == {"sortie", "sortie-api"}
    api, controllers = found["sortie-api"]["spec"], found["sortie"]["spec"]
    assert api["replicas"] == 2
    (container,) = api["template"]["spec"]["containers"]
    assert container["image"] == IMAGE
    assert container["command"] == ["sortie", "api", "start", "--host", "0.0.0.0", "--port", "8080"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": HEALTH_PATH, "port": "http", "scheme": "HTTP"}, probe
    (service,) = mocks.of_type(SERVICE)
    assert service["metadata"] == {"name": "sortie-api", "namespace": "platform",
                                   "labels": api["template"]["metadata"]["labels"]}
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    # The Service and each Deployment pick their own pods, never the other workload's.
    api_labels, controller_labels = (d["template"]["metadata"]["labels"] for d in (api, controllers))
    assert matches(service["spec"]["selector"], api_labels)
    assert not matches(service["spec"]["selector"], controller_labels)
    assert matches(api["selector"]["matchLabels"], api_labels)
    assert not matches(api["selector"]["matchLabels"], controller_labels)
    assert not matches(controllers["selector"]["matchLabels"], api_labels)


def test_the_server_pods_get_the_state_the_key_and_the_admin_token_from_the_secret(mocks: Mocks) -> None:
    deploy(ApiServer(admin_token=ADMIN_TOKEN))
    (secret,) = mocks.of_type(SECRET)
    assert is_secret(secret["stringData"])
    assert reveal(secret["stringData"])["admin-token"] == ADMIN_TOKEN
    name = secret["metadata"]["name"]
    pod = deployments(mocks)["sortie-api"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    for var, key in (("SORTIE_STATE_KEY", "state-key"), ("SORTIE_DB_URL", "state-url"), ("PGPASSWORD", "pg-password")):
        assert env[var]["valueFrom"] == {"secretKeyRef": {"name": name, "key": key}}, var
    assert "SORTIE_CONTROLLER_ID" not in env  # a server is no replica
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["secrets"]["mountPath"] == SECRETS_DIR
    items = {i["key"]: i["path"] for i in volumes["secrets"]["secret"]["items"]}
    assert env[ADMIN_TOKEN_ENV]["value"] == f"{SECRETS_DIR}/{items['admin-token']}"
    assert env["PULUMI_CONFIG_PASSPHRASE_FILE"]["value"] == PASSPHRASE_FILE == f"{SECRETS_DIR}/" + \
        items["pulumi-passphrase"]
    # The server reads `jobs logs` where the controllers write them, and the same config.
    assert volumes["shared"] == {"name": "shared", "persistentVolumeClaim": {"claimName": "sortie-logs"}}
    (config_map,) = mocks.of_type(CONFIG_MAP)
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    # The controllers' pods do not get the admin token.
    controller_pod = deployments(mocks)["sortie"]["spec"]["template"]["spec"]
    (controller_secrets,) = [v for v in controller_pod["volumes"] if v["name"] == "secrets"]
    assert [i["key"] for i in controller_secrets["secret"]["items"]] == ["pulumi-passphrase"]
    # Nothing any resource keeps in the clear holds a secret.
    for typ, rname, inputs in mocks.resources:
        stored = repr(public(inputs))
        assert not [s for s in (ADMIN_TOKEN, *SECRETS.values()) if s in stored], (typ, rname)


def test_the_platforms_own_secret(mocks: Mocks) -> None:
    """`existing_secret`: a Secret the platform's secret store keeps (External Secrets, Vault's injector); the
    component makes none and asks for no value."""
    run(lambda: SortieControllers("sortie", image=IMAGE, config=CONFIG, existing_secret="vault-sortie",
                                  existing_secret_has_pg_password=True, api=ApiServer()))
    assert mocks.of_type(SECRET) == []
    for deployment in deployments(mocks).values():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e
                and "secretKeyRef" in e["valueFrom"]}
        assert set(refs) == {"SORTIE_STATE_KEY", "SORTIE_DB_URL", "PGPASSWORD"}
        assert {r["name"] for r in refs.values()} == {"vault-sortie"}
        (volume,) = [v for v in pod["volumes"] if v["name"] == "secrets"]
        assert volume["secret"]["secretName"] == "vault-sortie"


def test_tls_from_the_platforms_certificate(mocks: Mocks) -> None:
    deploy(ApiServer(admin_token=ADMIN_TOKEN, port=8443, tls_secret="sortie-api-tls", service_type="LoadBalancer"))
    pod = deployments(mocks)["sortie-api"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][-4:] == ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    assert {"name": "tls", "mountPath": TLS_DIR, "readOnly": True} in container["volumeMounts"]
    assert {"name": "tls", "secret": {"secretName": "sortie-api-tls", "defaultMode": 0o440}} in pod["volumes"]
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    (service,) = mocks.of_type(SERVICE)
    assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["ports"][0]["port"] == 8443


def test_behind_a_proxy(mocks: Mocks) -> None:
    deploy(ApiServer(admin_token=ADMIN_TOKEN, behind_proxy=True))
    (container,) = deployments(mocks)["sortie-api"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][-1] == "--behind-proxy" and "--tls-cert" not in container["command"]


def test_without_api_nothing_of_it(mocks: Mocks) -> None:
    deploy()
    assert set(deployments(mocks)) == {"sortie"} and mocks.of_type(SERVICE) == []
    assert "admin-token" not in reveal(mocks.of_type(SECRET)[0]["stringData"])


@pytest.mark.parametrize(("api", "kwargs", "message"), [
    (ApiServer(), {}, "api.admin_token is required"),
    (ApiServer(admin_token="t", replicas=0), {}, "api.replicas must be between 1 and 16"),
    (ApiServer(admin_token="t", port=80), {}, "api.port must be between 1024"),
    (ApiServer(admin_token="t", tls_secret="x", behind_proxy=True), {}, "not both"),
    (None, {"passphrase": None}, "give passphrase, or existing_secret"),
])
def test_refusals(mocks: Mocks, api: ApiServer | None, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        deploy(api, **kwargs)
    assert mocks.resources == [] or all(t == "sortie:index:SortieControllers" for t, _n, _i in mocks.resources)


def test_the_program_with_the_api_travels_pickled_and_exports_its_service(mocks: Mocks,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    from stacks.controller_deployment import ControllerDeploymentSpec, deployment_stack_program
    from tests.support.pulumi_mocks import run_and_resolve

    spec = ControllerDeploymentSpec(name="sortie-controller-1", image=IMAGE, replicas=1, config=CONFIG,
                                    passphrase="p", state_key="k", state_url=STATE_URL,
                                    api=ApiServer(admin_token=ADMIN_TOKEN, port=9090))
    program = deployment_stack_program(spec)
    assert ADMIN_TOKEN not in repr(program) and "db-Pw-9f1" not in repr(program)
    again = pickle.loads(pickle.dumps(program))
    assert again == program
    exported: dict[str, Any] = {}
    monkeypatch.setattr(pulumi, "export", exported.__setitem__)
    resolved = run_and_resolve(again.build(), exported)
    assert resolved["api"] == ({"service": "sortie-controller-1-api", "port": 9090}, False)
    assert {d["metadata"]["name"] for d in mocks.of_type(DEPLOYMENT)} == {"sortie-controller-1",
                                                                         "sortie-controller-1-api"}


def test_the_server_pods_start_no_controller_of_their_own(mocks: Mocks) -> None:
    """The replicas are the controllers: the shared config says `api.start_controller: false` when a server is
    deployed beside them, and nothing of `api` without one (the controllers' pods do not roll)."""
    import yaml

    deploy(ApiServer(admin_token=ADMIN_TOKEN))
    (config_map,) = mocks.of_type(CONFIG_MAP)
    assert yaml.safe_load(config_map["data"]["config.yaml"])["api"] == {"start_controller": False}
    mocks.resources.clear()
    deploy()
    (config_map,) = mocks.of_type(CONFIG_MAP)
    assert "api" not in yaml.safe_load(config_map["data"]["config.yaml"])
