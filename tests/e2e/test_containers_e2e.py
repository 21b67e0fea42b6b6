"""`image_id: docker:<image>` on the local cloud with this machine's podman (or docker): setup and run execute in
one long-lived container of the image, built here from a local root filesystem (no registry is reachable)."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from orchestrator.policy.cloud_features import local_container_engine
from tests.support.e2e import Sortie, write

pytestmark = pytest.mark.e2e
ENGINE = local_container_engine()
# This machine's runc cannot raise rlimits: containers start with lower ones (docker.run_options).
RUN_OPTIONS = '["--ulimit=nofile=1024:4096", "--ulimit=nproc=4096:8192"]'


@pytest.fixture
def sortie(sortie_cli) -> Sortie:
    return sortie_cli("controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  autostop_idle_minutes: 5\n")


@pytest.fixture
def image(tmp_path: Path):
    """A tiny image: this machine's bash, sh, sleep and cat with their libraries, and a marker file."""
    if ENGINE is None:
        pytest.skip("no working podman or docker on this machine (apt-get install podman)")
    root = tmp_path / "rootfs"
    for tool in ("bash", "sh", "sleep", "cat"):
        path = Path(shutil.which(tool) or f"/bin/{tool}").resolve()
        libs = subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout.split()
        for item in [str(path), *[p for p in libs if p.startswith("/")]]:
            target = root / "bin" / tool if item == str(path) else root / item.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(item).resolve(), target)
    (root / "etc").mkdir()
    (root / "etc" / "sortie-image-marker").write_text("inside-the-image\n")
    (root / "tmp").mkdir()
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
