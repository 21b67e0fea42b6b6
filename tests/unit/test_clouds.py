"""`sortie check`: which clouds are enabled and why, from SDK extras and credentials, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import SortieConfig
from orchestrator.infra import clouds


@pytest.fixture
def sdks(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    installed: set[str] = set()
    monkeypatch.setattr(clouds, "_has_sdk", lambda cloud: cloud in installed)
    return installed


def by_cloud(env: dict[str, str], home: Path, config: SortieConfig | None = None) -> dict[str, clouds.CloudCheck]:
    return {c.cloud: c for c in clouds.check(config or SortieConfig(), env=env, home=home)}


def test_without_sdks_or_credentials_only_local_is_enabled(tmp_path: Path, sdks: set[str]) -> None:
    found = by_cloud({}, tmp_path)
    assert [c for c, v in found.items() if v.enabled] == ["local"]
    assert found["aws"].reason == "the SDK extra is not installed: pip install 'sortie[aws]'"
    sdks.update({"aws", "gcp", "azure", "kubernetes"})
    found = by_cloud({}, tmp_path)
    assert found["aws"].reason.startswith("no credentials found: set AWS_ACCESS_KEY_ID")
    assert found["gcp"].reason.startswith("no credentials found: run `gcloud auth application-default login`")


def test_credentials_in_the_environment_and_in_files_enable_clouds(tmp_path: Path, sdks: set[str]) -> None:
    sdks.update({"aws", "gcp", "azure", "kubernetes"})
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text(
        "apiVersion: v1\ncurrent-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
        "clusters: [{name: k, cluster: {server: 'https://k8s.example:6443'}}]\nusers: [{name: u, user: {token: t}}]\n")
    key = tmp_path / "sa.json"
    key.write_text("{}")
    env = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "x", "GOOGLE_APPLICATION_CREDENTIALS": str(key),
           "ARM_CLIENT_ID": "a", "ARM_TENANT_ID": "t", "ARM_SUBSCRIPTION_ID": "s"}
    found = by_cloud(env, tmp_path)
    assert all(c.enabled for c in found.values()), found
    assert found["kubernetes"].reason == f"kubeconfig {tmp_path}/.kube/config, context c (https://k8s.example:6443)"
    narrowed = by_cloud(env, tmp_path, SortieConfig(allowed_clouds=["local", "aws"]))
    assert [c for c, v in narrowed.items() if v.enabled] == ["local", "aws"]
    assert narrowed["gcp"].reason == "not in allowed_clouds of the config"


def test_sortie_check_cli_without_credentials(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_", "ARM_", "AZURE_", "KUBE"))}
    env.update(SORTIE_HOME=str(tmp_path / "home"), HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "cli.main", "check", "--json"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found = {c["cloud"]: c for c in json.loads(proc.stdout)}
    assert found["local"]["enabled"] and not found["aws"]["enabled"]


def test_a_cloud_controller_needs_shared_state_and_an_enabled_cloud(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SORTIE_DB_URL"))}
    home = tmp_path / "home"
    home.mkdir()
    env.update(SORTIE_HOME=str(home), HOME=str(tmp_path))

    def sortie(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True,
                              timeout=60)

    (home / "config.yaml").write_text("jobs:\n  controller:\n    infra: aws\n")
    first = sortie("controller", "up", "-y")
    assert first.returncode != 0 and "set state.url to a PostgreSQL URL" in first.stderr
    (home / "config.yaml").write_text("jobs:\n  controller:\n    infra: aws\n"
                                      "state:\n  url: postgresql://sortie@db.invalid/sortie\n")
    second = sortie("controller", "up", "-y")
    assert second.returncode != 0 and "jobs.controller.infra: aws is not enabled" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr


def test_the_controller_vm_admits_sorties_own_ssh_key_unless_the_team_names_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stat

    from orchestrator.deploy.remote import controller_program

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setattr(clouds, "_has_sdk", lambda cloud: True)
    config = SortieConfig.model_validate({
        "jobs": {"controller": {"infra": "aws", "ssh_cidr": "198.51.100.0/24"}},
        "state": {"url": "postgresql://sortie@db.invalid/sortie"}})
    program, _chosen = controller_program(config, tmp_path)
    key = tmp_path / "ssh" / "sortie-controller"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY")
    assert program.spec.ssh_public_key == (tmp_path / "ssh" / "sortie-controller.pub").read_text().strip()
    assert program.spec.ssh_public_key.startswith("ssh-ed25519 ") and program.spec.ssh_cidr == "198.51.100.0/24"
    again, _ = controller_program(config, tmp_path)  # the same key next time
    assert again.spec.ssh_public_key == program.spec.ssh_public_key
    team = config.model_copy(update={"cloud": config.cloud.model_copy(update={"ssh_public_key": "ssh-rsa AAAB team"})})
    theirs, _ = controller_program(team, tmp_path / "other")
    assert theirs.spec.ssh_public_key == "ssh-rsa AAAB team" and not (tmp_path / "other" / "ssh").exists()
