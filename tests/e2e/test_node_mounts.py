"""FUSE mounts of buckets on local-cloud nodes: the bucket work runs outside the path view (so what it mounts is
there for the runs after it), and a node's teardown detaches every mount in its sandbox before removing it, so
removing the sandbox never reaches into a bucket."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.errors import SortieError
from orchestrator.infra.local_cloud import LocalCloud
from orchestrator.node import node_storage, node_view

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mount namespaces and FUSE are Linux")


def fuse_works(tool: str = "rclone") -> str | None:
    """Why a FUSE mount with `tool` cannot be made here, or None when it can."""
    if shutil.which(tool) is None:
        return f"no {tool} (apt-get install -y {tool} fuse3)"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    return None


def _run(client, command: str, view: bool = True) -> tuple[int | None, str]:
    run_id = client.run(command, view=view)
    status = client.wait(run_id, timeout=60)
    return status.exit_code, client.log(run_id)[0].decode()


def test_a_run_outside_the_view_shares_the_agents_mount_namespace(start_agent) -> None:
    agent = start_agent(confine=True)
    client = agent.client()
    code, inside = _run(client, "readlink /proc/self/ns/mnt")
    if "no mount namespaces here" in inside:
        pytest.skip("mount namespaces do not work on this machine")
    assert code == 0
    code, outside = _run(client, "readlink /proc/self/ns/mnt; echo root=$SORTIE_MOUNTS_ROOT", view=False)
    assert code == 0
    ours = os.readlink("/proc/self/ns/mnt")  # the agent was started from this process: the same namespace
    assert inside.strip().splitlines()[-1] != ours
    assert outside.splitlines() == [ours, f"root={agent.sandbox / 'mounts'}"]


def test_the_agent_refuses_a_view_that_is_not_a_boolean(start_agent) -> None:
    from orchestrator.infra.agent_client import AgentError

    client = start_agent(confine=True).client()
    with pytest.raises(AgentError, match="view: must be true or false"):
        client._json("POST", "/runs", {"command": "true", "view": "no"})


def test_mounts_under_reads_escaped_paths(tmp_path: Path) -> None:
    assert node_view._unescape(r"/a\040b\011c\134d") == "/a b\tc\\d"
    assert node_view.mounts_under(str(tmp_path)) == []
    assert "/proc" in node_view.mounts_under("/proc")


@pytest.mark.parametrize("preempted", [False, True], ids=["live-mount", "dead-mount-after-preemption"])
def test_terminate_detaches_a_fuse_mount_and_leaves_the_bucket_whole(sortie_home: Path, tmp_path: Path,
                                                                      preempted: bool) -> None:
    why = fuse_works()
    if why:
        pytest.skip(why)
    bucket = tmp_path / "bucket"
    (bucket / "ckpt").mkdir(parents=True)
    (bucket / "ckpt" / "step").write_text("7\n")
    cloud = LocalCloud(sortie_home / "local")
    node = cloud.launch("fuse-node-0", "fuse", 0, "local", "token-fuse-test-123")
    from orchestrator.infra.agent_client import AgentClient

    client = AgentClient(node.url, "token-fuse-test-123")
    mount = Path(node.sandbox) / "mounts" / "data"
    code, out = _run(client, f"mkdir -p {mount} && rclone mount :local:{bucket} {mount} --daemon "
                             "--vfs-cache-mode off", view=False)
    try:
        if code != 0:
            pytest.skip(f"FUSE mounts are refused here: {out.strip().splitlines()[-1:]}")
        assert node_view.mounts_under(node.sandbox) == [str(mount)]
        assert (mount / "ckpt" / "step").read_text() == "7\n"  # the bucket shows through the mount
        if preempted:
            cloud.preempt(node.node_id)  # rclone dies with the node: the mount is left dead
            time.sleep(0.2)
            assert node_view.mounts_under(node.sandbox) == [str(mount)]
    finally:
        cloud.terminate(node.node_id)
    assert (bucket / "ckpt" / "step").read_text() == "7\n"  # the sandbox went; the bucket's files did not
    assert not Path(node.sandbox).exists()
    assert cloud.leftovers() == []
    running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    assert not [line for line in running if f":local:{bucket}" in line]  # rclone went with the node


def test_fuse_mount_command_for_rclone_moves_the_ca_bundle_to_a_flag(tmp_path: Path) -> None:
    env = {"AWS_CA_BUNDLE": "/etc/ca.pem", "AWS_ACCESS_KEY_ID": "k"}
    command, run_env = node_storage.fuse_mount_command("rclone", "b/p", tmp_path / "m",
                                                       {"endpoint_url": "http://127.0.0.1:9", "region": "eu-west-1"},
                                                       tmp_path / "r.log", env)
    assert command[:4] == ["rclone", "mount", ":s3:b/p", str(tmp_path / "m")]
    assert command[command.index("--ca-cert") + 1] == "/etc/ca.pem" and "AWS_CA_BUNDLE" not in run_env
    assert command[command.index("--s3-provider") + 1] == "Other"
    assert command[command.index("--s3-endpoint") + 1] == "http://127.0.0.1:9"
    assert command[command.index("--s3-region") + 1] == "eu-west-1" and "--s3-profile" not in command
    assert command[command.index("--vfs-cache-mode") + 1] == "off"  # nothing waits in a cache at teardown
    assert env["AWS_CA_BUNDLE"] == "/etc/ca.pem"  # the caller's environment is left as it was
    aws, _ = node_storage.fuse_mount_command("rclone", "b", tmp_path / "m", {"profile": "team"}, tmp_path / "r.log",
                                             {})
    assert aws[aws.index("--s3-provider") + 1] == "AWS" and "--s3-endpoint" not in aws and "--ca-cert" not in aws
    assert aws[aws.index("--s3-profile") + 1] == "team"


def test_fuse_mount_command_for_s3fs(tmp_path: Path) -> None:
    command, _ = node_storage.fuse_mount_command("s3fs", "b/p/q", tmp_path / "m",
                                                 {"endpoint_url": "http://h:9", "region": "eu-west-1"},
                                                 tmp_path / "l", {})
    assert command[:3] == ["s3fs", "b:/p/q", str(tmp_path / "m")]
    assert "url=http://h:9" in command and "use_path_request_style" in command and "endpoint=eu-west-1" in command


def test_mount_without_a_fuse_tool_names_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_storage.shutil, "which", lambda _tool: None)
    with pytest.raises(SortieError) as err:
        node_storage._fuse_mount({"dest": "/mnt/b", "url": "s3://b", "where": "file_mounts./mnt/b"}, {})
    message = str(err.value)
    assert message.startswith("file_mounts./mnt/b: MOUNT of s3://b needs a FUSE mount tool")
    assert "neither rclone nor s3fs" in message and "MOUNT_CACHED" in message and "install rclone" in message


def test_a_chosen_mount_tool_that_is_missing_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_storage.shutil, "which", lambda tool: None if tool == "s3fs" else f"/usr/bin/{tool}")
    plan = {"storage": {"s3": {"mount_tool": "s3fs"}}}
    with pytest.raises(SortieError, match=r"storage\.s3\.mount_tool is s3fs, which is not installed"):
        node_storage._fuse_mount({"dest": "/mnt/b", "url": "s3://b"}, plan)


@pytest.mark.parametrize("tool", ["rclone", "s3fs"])
def test_each_mount_tool_mounts_a_bucket_that_reads_and_writes_through(
        tool: str, s3_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """node_storage's own mount, with each tool, of a bucket on moto's server: a read, a write that is in the
    bucket once the file is closed, and a teardown detach that leaves the bucket whole."""
    from orchestrator.storage import S3Store

    why = fuse_works(tool)
    if why:
        pytest.skip(why)
    s3 = S3Store(s3_env)
    bucket = f"tool-{tool}"
    s3.create_bucket(bucket)
    (tmp_path / "in.txt").write_text("in-bucket\n")
    s3.put_file(bucket, "data/in.txt", tmp_path / "in.txt")
    monkeypatch.setenv("SORTIE_MOUNTS_ROOT", str(tmp_path / "mounts"))
    monkeypatch.setenv("SORTIE_NODE_SANDBOX", str(tmp_path))
    plan = {"storage": {"s3": {"endpoint_url": s3_env.endpoint_url, "mount_tool": tool}}}
    node_storage._fuse_mount({"dest": "/mnt/b", "url": f"s3://{bucket}"}, plan)
    mount = tmp_path / "mounts" / "mnt" / "b"
    try:
        assert node_view.mounts_under(str(tmp_path)) == [str(mount)]
        assert (mount / "data" / "in.txt").read_text() == "in-bucket\n"
        (mount / "out.txt").write_text("from-the-node\n")
        assert s3.list_objects(bucket) == {"data/in.txt": 10, "out.txt": 14}
    finally:
        assert node_view.detach(str(mount))
    assert node_view.mounts_under(str(tmp_path)) == [] and s3.list_objects(bucket)["data/in.txt"] == 10
