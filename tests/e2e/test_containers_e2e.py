"""`image_id: docker:<image>` on the local cloud with this machine's podman (or docker): setup and run execute in
one long-lived container of the image, built here from a local root filesystem (no registry is reachable)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from orchestrator.policy.cloud_features import local_container_engine
from tests.support.e2e import Sortie, one_line_error, path_view_works, write

pytestmark = pytest.mark.e2e
ENGINE = local_container_engine()
# This machine's runc cannot raise rlimits: containers start with lower ones (docker.run_options).
RUN_OPTIONS = '["--ulimit=nofile=1024:4096", "--ulimit=nproc=4096:8192"]'


@pytest.fixture
def sortie(sortie_cli) -> Sortie:
    return _default(sortie_cli("controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  "
                               "autostop_idle_minutes: 5\n"))


def _default(cli: Sortie) -> Sortie:
    """Node users as Sortie makes them by default (the suite opts out: tests/conftest.py)."""
    cli.env.pop("SORTIE_NO_RUN_USERS", None)
    return cli


@pytest.fixture
def image(tmp_path: Path):
    """A tiny image: this machine's bash, sh, sleep and cat with their libraries, and a marker file."""
    if ENGINE is None:
        pytest.skip("no working podman or docker on this machine (apt-get install podman)")
    root = tmp_path / "rootfs"
    for tool in ("bash", "sh", "sleep", "cat", "ln", "id", "touch"):
        path = Path(shutil.which(tool) or f"/bin/{tool}").resolve()
        libs = subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout.split()
        for item in [str(path), *[p for p in libs if p.startswith("/")]]:
            target = root / "bin" / tool if item == str(path) else root / item.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(item).resolve(), target)
    (root / "etc").mkdir()
    (root / "etc" / "sortie-image-marker").write_text("inside-the-image\n")
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    archive = tmp_path / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    name = f"localhost/sortie-test-{secrets.token_hex(3)}:1"
    subprocess.run([ENGINE, "import", str(archive), name], check=True, capture_output=True, timeout=300)
    yield name
    subprocess.run([ENGINE, "rmi", "-f", name], capture_output=True, timeout=300)


def test_setup_and_run_execute_in_the_task_image(sortie: Sortie, tmp_path: Path, image: str) -> None:
    assert not Path("/etc/sortie-image-marker").exists()  # only the image has it
    (tmp_path / "in.txt").write_text("mounted-file")
    yaml = write(tmp_path, "c.yaml", f"envs: {{GREETING: hello-container}}\n"
                 f"file_mounts:\n  /data/in.txt: {tmp_path / 'in.txt'}\n"
                 f"resources:\n  infra: local\n  image_id: docker:{image}\n"
                 f"config:\n  docker:\n    run_options: {RUN_OPTIONS}\n"
                 "setup: cat /etc/sortie-image-marker\n"
                 "run: echo \"$GREETING $(cat /etc/sortie-image-marker) $(cat /data/in.txt) "
                 "rank=$SKYPILOT_NODE_RANK\"\n")
    plan = sortie.run("jobs", "launch", "--dryrun", yaml).stdout
    assert "Local" in plan
    job = sortie.wait(sortie.launch(yaml), timeout=300)
    logs = sortie.logs(job["id"])
    assert job["status"] == "SUCCEEDED", (job["failure_reason"], logs)
    assert "(setup) inside-the-image" in logs and "hello-container inside-the-image mounted-file rank=0" in logs
    left = subprocess.run([ENGINE, "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True).stdout
    assert not [n for n in left.split() if n.startswith("sortie-")]  # the node's container went with it


# --- issue 28, item 2: what a container job can no longer reach ---------------------------------------------------


@pytest.mark.parametrize("options", ['["-v", "/:/host"]', '["--privileged"]', '["--cap-add=ALL"]',
                                     '["--pid=host"]', '["--security-opt", "seccomp=unconfined"]'])
def test_run_options_that_reach_the_host_are_refused_and_nothing_is_submitted(
        sortie: Sortie, tmp_path: Path, options: str) -> None:
    yaml = write(tmp_path, "c.yaml", "resources:\n  infra: local\n  image_id: docker:localhost/any:1\n"
                 f"config:\n  docker:\n    run_options: {options}\nrun: cat /host/etc/shadow\n")
    name = json.loads(options)[0].split("=")[0]
    for args in (("--dryrun",), ("-y", "-d")):
        out = sortie.run("jobs", "launch", *args, yaml, check=False)
        assert out.returncode == 2, (out.stdout, out.stderr)
        line = one_line_error(out) if ENGINE else out.stderr
        assert f"config.docker.run_options: {name} is refused" in line and "docker.allowed_run_options" in line
    assert json.loads(sortie.run("jobs", "queue", "-a", "--json").stdout) == []


def test_a_container_is_the_node_user_even_with_a_host_mount_the_operator_allowed(
        sortie_cli, tmp_path: Path, image: str) -> None:
    """The operator allows --volume; a task binds the machine's / into its container. Its processes are its node's
    user, with no capabilities: root's files (/etc/shadow, the home's secrets/state.key) stay out of reach."""
    sortie = _default(sortie_cli("controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n"
                                 "docker:\n  allowed_run_options: [--volume]\n"))
    key = sortie.home / "secrets" / "state.key"
    options = RUN_OPTIONS.replace("[", '["-v", "/:/host", ')
    mark = Path(f"/etc/sortie-h28-{secrets.token_hex(4)}")  # what a write as root would leave
    yaml = write(tmp_path, "c.yaml", f"resources:\n  infra: local\n  image_id: docker:{image}\n"
                 f"config:\n  docker:\n    run_options: {options}\n"
                 f"run: |\n  echo uid=$(id -u)\n  cat /host/etc/shadow && echo SHADOW-READ\n"
                 f"  cat /host{key} && echo KEY-READ\n  touch /host{mark} && echo ETC-WRITTEN\n"
                 "  echo finished\n")
    job = sortie.wait(sortie.launch(yaml), timeout=300)
    logs = sortie.logs(job["id"])
    assert job["status"] == "SUCCEEDED", (job["failure_reason"], logs)
    assert key.exists() and key.stat().st_mode & 0o077 == 0  # the root-only file the run tried
    assert "finished" in logs and "uid=0" not in logs and "uid=" in logs
    assert "SHADOW-READ" not in logs and "KEY-READ" not in logs and "ETC-WRITTEN" not in logs
    assert key.read_text().strip() not in logs and not mark.exists()


def test_a_container_run_cannot_swap_its_log_for_a_link_to_a_root_file(
        sortie: Sortie, tmp_path: Path, image: str) -> None:
    """The attack: the run replaces its own runs/<id>/output.log with a link to a root-only file, so that the agent
    (root) serves that file as the run's log. The agent's records are not in the container, and the agent opens
    logs without following links."""
    _swap_log_attack(sortie, tmp_path,
                     f"  image_id: docker:{image}\nconfig:\n  docker:\n    run_options: {RUN_OPTIONS}\n")


def test_a_plain_run_cannot_swap_its_log_either(sortie: Sortie, tmp_path: Path) -> None:
    """The same attack from a plain (non-container) run: the node user cannot enter the agent's root-only runs/."""
    if os.geteuid() != 0 or not path_view_works():
        pytest.skip("node users need root and mount namespaces")
    _swap_log_attack(sortie, tmp_path, "")


def _swap_log_attack(sortie: Sortie, tmp_path: Path, resources: str) -> None:
    secret = tmp_path / "root-only.txt"
    secret.write_text("x" * 8192 + "\nTOPSECRET-H28\n")
    os.chmod(secret, 0o600)
    yaml = write(tmp_path, "c.yaml", f"resources:\n  infra: local\n{resources}"
                 "run: |\n  echo started\n"
                 f'  for log in "$SORTIE_NODE_SANDBOX"/runs/*/output.log; do ln -sf {secret} "$log" && '
                 "echo SWAPPED; done\n  sleep 2\n  echo finished\n")
    job = sortie.wait(sortie.launch(yaml), timeout=300)
    logs = sortie.logs(job["id"])
    assert job["status"] == "SUCCEEDED", (job["failure_reason"], logs)
    assert "TOPSECRET-H28" not in logs and "SWAPPED" not in logs and "finished" in logs


def test_a_container_run_is_cancelled_through_its_pid_file(sortie: Sortie, tmp_path: Path, image: str) -> None:
    """The run's shell records its pid where the run (the node user) may write, outside the agent's records; a
    cancel signals it in the container."""
    yaml = write(tmp_path, "c.yaml", f"resources:\n  infra: local\n  image_id: docker:{image}\n"
                 f"config:\n  docker:\n    run_options: {RUN_OPTIONS}\n"
                 "run: |\n  echo waiting\n  sleep 300\n")
    job_id = sortie.launch(yaml)
    sortie.wait_for_log(job_id, "waiting", timeout=240)
    sortie.run("jobs", "cancel", "-y", str(job_id))
    assert sortie.wait(job_id, timeout=120)["status"] == "CANCELLED"
    deadline = time.monotonic() + 60
    while [n for n in _containers() if n.startswith("sortie-")]:  # the node's container went with it
        assert time.monotonic() < deadline, _containers()
        time.sleep(1)


def _containers() -> list[str]:
    assert ENGINE is not None
    return subprocess.run([ENGINE, "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True,
                          timeout=60).stdout.split()


def test_a_container_as_the_node_user_reads_and_writes_its_mounted_bucket(
        sortie: Sortie, tmp_path: Path, image: str) -> None:
    """A local-store bucket the node links to (ACL for the node user) is bound into the container, writable to it."""
    bucket = f"h28-bucket-{secrets.token_hex(3)}"
    yaml = write(tmp_path, "c.yaml", f"resources:\n  infra: local\n  image_id: docker:{image}\n"
                 f"config:\n  docker:\n    run_options: {RUN_OPTIONS}\n"
                 f"file_mounts:\n  /data:\n    name: {bucket}\n    store: local\n    mode: MOUNT\n"
                 "    persistent: false\n"
                 "run: |\n  echo in-bucket > /data/x.txt && cat /data/x.txt\n  echo uid=$(id -u)\n")
    job = sortie.wait(sortie.launch(yaml), timeout=300)
    logs = sortie.logs(job["id"])
    assert job["status"] == "SUCCEEDED", (job["failure_reason"], logs)
    assert "(task) in-bucket" in logs and "uid=0" not in logs
