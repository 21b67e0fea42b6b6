"""The path view of a confined agent: runs see absolute upload and link destinations at their own paths,
backed by the sandbox, and nothing is created on the machine outside it."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

from orchestrator.infra.agent_client import AgentClient, AgentError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mount namespaces are Linux")


def _run(client: AgentClient, command: str, timeout: float = 30) -> tuple[int | None, str]:
    run_id = client.run(command)
    status = client.wait(run_id, timeout=timeout)
    return status.exit_code, client.log(run_id)[0].decode()


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def confined(start_agent, tmp_path: Path):
    agent = start_agent(confine=True, link_roots=[tmp_path])  # links may target the test's directories
    _, out = _run(agent.client(), "true")
    if "no mount namespaces here" in out:
        pytest.skip("mount namespaces do not work on this machine")
    return agent


def test_upload_to_a_new_top_level_path_is_seen_there_and_writes_land_in_the_sandbox(
        confined, tmp_path: Path, tag: str) -> None:
    client = confined.client()
    src = tmp_path / "x.txt"
    src.write_text("hello view\n")
    top = f"/sortie-view-{tag}"
    path = client.upload(str(src), f"{top}/data/x.txt")
    assert path == str(confined.sandbox / "mounts" / top[1:] / "data" / "x.txt")
    code, out = _run(client, f'cat {top}/data/x.txt; echo out > {top}/out.txt; echo "root=$SORTIE_MOUNTS_ROOT"')
    assert code == 0, out
    assert out.splitlines() == ["hello view", f"root={confined.sandbox / 'mounts'}"]
    assert (confined.sandbox / "mounts" / top[1:] / "out.txt").read_text() == "out\n"
    assert json.loads((confined.sandbox / "views.json").read_text())["views"] == [f"{top}/data/x.txt"]
    assert not os.path.lexists(top)


def test_nested_view_under_an_existing_directory_shadows_it_without_touching_it(
        confined, tmp_path: Path, tag: str) -> None:
    client = confined.client()
    before = sorted(os.listdir("/opt"))
    src = tmp_path / "dir"
    src.mkdir()
    (src / "a.txt").write_text("A\n")
    view = f"/opt/sortie-view-{tag}/x"
    client.upload(str(src), view)
    code, out = _run(client, f"cat {view}/a.txt; echo b > {view}/b.txt; echo c > /opt/sortie-view-{tag}/c.txt; "
                             "ls -A /opt; pwd")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "A"
    assert lines[1:-1] == sorted([*before, f"sortie-view-{tag}"])  # the machine's entries are still there
    assert lines[-1] == str(confined.sandbox / "workdir")
    assert (confined.sandbox / "mounts" / "opt" / f"sortie-view-{tag}" / "x" / "b.txt").read_text() == "b\n"
    assert (confined.sandbox / "mounts" / "opt" / f"sortie-view-{tag}" / "c.txt").read_text() == "c\n"
    assert sorted(os.listdir("/opt")) == before


def test_view_beside_the_sandbox_keeps_the_sandbox_and_workdir_visible(confined, tmp_path: Path, tag: str) -> None:
    """Shadowing a directory that holds the sandbox itself (here the test's tmp dir)."""
    client = confined.client()
    src = tmp_path / "v.txt"
    src.write_text("beside\n")
    dest = tmp_path / f"sortie-view-{tag}" / "v.txt"
    client.upload(str(src), str(dest))
    client.upload(str(src), "rel.txt")
    code, out = _run(client, f"cat {dest}; cat rel.txt; ls {confined.sandbox}/.root | wc -l")
    assert code == 0, out
    assert out.splitlines() == ["beside", "beside", "0"]
    assert not dest.parent.exists()


def test_link_to_a_host_directory_is_written_through(confined, tmp_path: Path, tag: str) -> None:
    client = confined.client()
    target = tmp_path / "checkpoints"
    target.mkdir()
    (target / "old").write_text("old\n")
    path = client.link(f"/ckpt-{tag}", str(target))
    assert Path(path).is_symlink() and Path(path).resolve() == target.resolve()
    code, out = _run(client, f"echo a > /ckpt-{tag}/a; cat /ckpt-{tag}/old")
    assert (code, out) == (0, "old\n")
    assert (target / "a").read_text() == "a\n"
    assert not os.path.lexists(f"/ckpt-{tag}")
    # Linking again replaces the link; a target that is not an existing absolute directory is refused.
    other = tmp_path / "other"
    other.mkdir()
    client.link(f"/ckpt-{tag}", str(other))
    assert _run(client, f"echo b > /ckpt-{tag}/b")[0] == 0
    assert (other / "b").read_text() == "b\n" and not (target / "b").exists()
    for bad in ("relative/dir", str(tmp_path / "missing"), str(target / "old")):
        with pytest.raises(AgentError, match="existing directory") as err:
            client.link(f"/ckpt-{tag}", bad)
        assert err.value.status == 400


def test_views_survive_an_agent_restart(start_agent, confined, tmp_path: Path, tag: str) -> None:
    src = tmp_path / "keep.txt"
    src.write_text("kept\n")
    confined.client().upload(str(src), f"/sortie-view-{tag}/keep.txt")
    confined.stop()
    again = start_agent(sandbox=confined.sandbox, token=confined.token, confine=True)
    assert _run(again.client(), f"cat /sortie-view-{tag}/keep.txt") == (0, "kept\n")


def test_link_on_an_unconfined_agent_is_a_real_symlink(start_agent, tmp_path: Path) -> None:
    client = start_agent(link_roots=[tmp_path]).client()
    target = tmp_path / "t"
    target.mkdir()
    dest = tmp_path / "real" / "link"
    assert client.link(str(dest), str(target)) == str(dest)
    assert dest.is_symlink() and dest.resolve() == target.resolve()


def test_without_mount_namespaces_runs_see_no_view_and_are_told_where_mounts_are(
        start_agent, tmp_path: Path, tag: str) -> None:
    agent = start_agent(confine=True, env={"SORTIE_NO_MOUNT_NAMESPACE": "1"})
    client = agent.client()
    src = tmp_path / "x.txt"
    src.write_text("fallback\n")
    client.upload(str(src), f"/sortie-view-{tag}/x.txt")
    code, out = _run(client, f'cat "$SORTIE_MOUNTS_ROOT/sortie-view-{tag}/x.txt"; test -e /sortie-view-{tag}; echo $?')
    mounts = agent.sandbox / "mounts"
    assert code == 0
    assert out.splitlines() == [
        "sortie: no mount namespaces here; absolute paths of uploads and mounts are under "
        f"$SORTIE_MOUNTS_ROOT ({mounts})",
        "fallback", "1",
    ]


def test_exit_code_and_cancel_inside_a_view(confined, tmp_path: Path, tag: str) -> None:
    client = confined.client()
    src = tmp_path / "x.txt"
    src.write_text("x\n")
    client.upload(str(src), f"/sortie-view-{tag}/x.txt")
    assert _run(client, f"cat /sortie-view-{tag}/x.txt; exit 7") == (7, "x\n")
    run_id = client.run(f"sleep 300 & echo $! > /sortie-view-{tag}/child.pid; wait")
    pid_file = confined.sandbox / "mounts" / f"sortie-view-{tag}" / "child.pid"
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, client.log(run_id)[0]
        time.sleep(0.02)
    child, leader = int(pid_file.read_text()), client.status(run_id).pid
    status = client.cancel(run_id)
    assert status.state == "cancelled" and status.exit_code not in (None, 0)
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{p}").exists() for p in (child, leader)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not Path(f"/proc/{child}").exists() and not Path(f"/proc/{leader}").exists()


def test_view_over_an_ancestor_of_the_sandbox_still_shows_the_sandbox(confined, tmp_path: Path) -> None:
    client = confined.client()
    src = tmp_path / "src"
    src.mkdir()
    (src / "up.txt").write_text("over\n")
    client.upload(str(src), str(tmp_path))  # an existing directory that holds the sandbox
    code, out = _run(client, f"cat {tmp_path}/up.txt; pwd; ls {tmp_path}")
    assert code == 0, out
    assert out.splitlines() == ["over", str(confined.sandbox / "workdir"), "sandbox", "up.txt"]
    assert not (tmp_path / "up.txt").exists()
