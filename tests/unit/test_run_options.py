"""Which config.docker.run_options a task may give its container (issue 28, item 2): an allow-list, the operator's
docker.allowed_run_options on top, each refusal one line naming the option."""

from __future__ import annotations

import pytest

from orchestrator.policy.run_options import problems

SAFE_SETS = [
    [],
    ["--shm-size=16g"],
    ["--ulimit=nofile=1024:4096", "--ulimit", "nproc=4096:8192"],
    ["-e", "A=1", "-eB=2", "--env=C=3", "--env", "D=4"],
    ["--memory", "8g", "-m4g", "--cpus=2", "--pids-limit", "100", "--tmpfs", "/scratch:size=1g"],
    ["-it", "--init", "--read-only"],
    ["--gpus", "all", "--label", "team=ml", "-l", "x=y"],
]


@pytest.mark.parametrize("options", SAFE_SETS)
def test_options_that_shape_only_the_container_pass(options: list[str]) -> None:
    assert problems(options) == []


REFUSED = [
    (["-v", "/:/host"], "-v is refused (mounts a host path"),
    (["-v/:/host"], "-v is refused (mounts a host path"),
    (["--volume=/:/host"], "--volume is refused (mounts a host path"),
    (["--volume", "/etc:/etc"], "--volume is refused (mounts a host path"),
    (["--mount", "type=bind,src=/,dst=/host"], "--mount is refused (mounts a host path"),
    (["--device=/dev/sda"], "--device is refused (gives the container a host device"),
    (["--cap-add", "SYS_ADMIN"], "--cap-add is refused (adds capabilities"),
    (["--cap-add=ALL"], "--cap-add is refused (adds capabilities"),
    (["--privileged"], "--privileged is refused (turns off"),
    (["--pid=host"], "--pid is refused (shares a process namespace"),
    (["--pid", "host"], "--pid is refused (shares a process namespace"),
    (["--userns=host"], "--userns is refused (changes the user namespace"),
    (["--network=host"], "--network is refused (changes the node's network"),
    (["--net", "none"], "--net is refused (changes"),
    (["--ipc=host"], "--ipc is refused (shares an IPC namespace"),
    (["--security-opt", "seccomp=unconfined"], "--security-opt is refused (changes the container's confinement"),
    (["--security-opt=apparmor=unconfined"], "--security-opt is refused ("),
    (["-u", "0"], "-u is refused (chooses the container's user"),
    (["--user=root"], "--user is refused (chooses"),
    (["-itv", "/:/host"], "-v is refused (mounts a host path"),
    (["--group-add=0"], "--group-add is refused (adds host groups"),
    (["--env-file", "/etc/shadow"], "--env-file is refused (reads a file of the node's"),
    (["--env-host"], "--env-host is refused (copies"),
    (["--uidmap", "0:0:1"], "--uidmap is refused (changes the user namespace"),
    (["--sysctl", "net.ipv4.ip_forward=1"], "--sysctl is refused (changes kernel settings"),
    (["--annotation", "run.oci.hooks=x"], "--annotation is refused (can trigger hooks"),
    (["--some-future-option", "x"], "--some-future-option is not an option Sortie lets"),
    (["-Z"], "-Z is not an option Sortie lets"),
]


@pytest.mark.parametrize(("options", "said"), REFUSED)
def test_options_that_reach_the_host_are_refused_naming_the_option(options: list[str], said: str) -> None:
    found = problems(options)
    assert len(found) == 1, found
    assert found[0].startswith("config.docker.run_options: ") and said in found[0]
    assert "docker.allowed_run_options" in found[0] and "\n" not in found[0]


def test_every_refused_option_is_named_and_a_value_is_not_taken_for_an_option() -> None:
    found = problems(["--shm-size=1g", "-v", "/:/host", "--privileged", "--cap-add", "ALL", "--cpus=1"])
    assert [line.split(": ")[1].split()[0] for line in found] == ["-v", "--privileged", "--cap-add"]


def test_a_bare_env_name_and_a_stray_word_are_refused() -> None:
    assert "must be NAME=VALUE" in problems(["-e", "AWS_SECRET_ACCESS_KEY"])[0]
    assert "must be NAME=VALUE" in problems(["--env=SORTIE_TOKEN"])[0]
    assert "'/:/host' is not an option" in problems(["/:/host"])[0]
    assert "--shm-size needs a value" in problems(["--shm-size"])[0]


def test_the_operator_may_allow_options_by_name() -> None:
    assert problems(["-v", "/data:/data", "--ipc=host"], allowed=["--volume", "--ipc"]) == []
    assert problems(["--volume=/data:/data"], allowed=["-v"]) == []  # a short name stands for its long one
    still = problems(["-v", "/data:/data", "--privileged"], allowed=["--volume"])
    assert len(still) == 1 and "--privileged" in still[0]


def test_a_local_node_is_not_built_with_a_refused_option(tmp_path, monkeypatch) -> None:
    """The guard behind launch: a job submitted before the operator's list changed stops at its node's build."""
    from orchestrator.errors import UsageError
    from stacks.builders.local import build_local_nodes
    from stacks.spec import ClusterSpec

    monkeypatch.setenv("SORTIE_HOME", str(tmp_path))
    spec = ClusterSpec(name="c1", container_image="img:1", container_options=("-v", "/:/host"))
    with pytest.raises(UsageError, match=r"cluster c1: config.docker.run_options: -v is refused"):
        build_local_nodes(spec)


def test_a_pool_with_a_refused_option_is_refused_at_apply() -> None:
    from orchestrator.errors import UsageError
    from orchestrator.pool_service import _pool_task
    from orchestrator.spec import load_yaml_text

    text = ("pool: {workers: 1}\nresources: {infra: local, image_id: 'docker:img:1'}\n"
            "config: {docker: {run_options: ['--privileged']}}\nsetup: echo hi\n")
    with pytest.raises(UsageError, match=r"config.docker.run_options: --privileged is refused") as refused:
        _pool_task("p1", load_yaml_text(text))
    assert refused.value.exit_code == 2
    assert _pool_task("p1", load_yaml_text(text), ["--privileged"]).pool is not None
