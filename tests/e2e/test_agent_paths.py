"""The agent keeps every destination inside the sandbox's roots and never removes what it did not place
(issue 17, item 1)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.infra.agent_client import AgentError
from orchestrator.node.agent import destination_parts, place_destination


def _tar_of(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _post(agent, path: str, body: bytes, content_type: str = "application/x-tar") -> tuple[int, str]:
    req = urllib.request.Request(f"{agent.url}{path}", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {agent.token}", "Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("dest", ["..", "../x", "a/../../x", "~/..", "~/../../../..", "~/a/../../b", "/a/../../b",
                                  "~root/x", "a\0b"])
def test_destination_parts_refuse_going_up(dest: str) -> None:
    with pytest.raises(ValueError, match="destination"):
        destination_parts(dest)


def test_place_destination_keeps_inside_roots(tmp_path: Path) -> None:
    workdir, home, mounts = tmp_path / "w", tmp_path / "h", tmp_path / "m"
    for root in (workdir, home, mounts):
        root.mkdir()
    assert place_destination("a/./b", workdir, home, mounts) == workdir / "a" / "b"
    assert place_destination("~/x", workdir, home, mounts) == home / "x"
    assert place_destination("/data/x", workdir, home, mounts) == mounts / "data" / "x"
    assert place_destination("/data/x", workdir, home, None) == Path("/data/x")  # a node that is all the job's
    (home / "out").symlink_to(tmp_path.parent)  # a symlink that leads out of the root
    with pytest.raises(ValueError, match="outside"):
        place_destination("~/out/victim", workdir, home, mounts)


@pytest.mark.parametrize("confine", [False, True])
def test_uploads_and_links_outside_the_sandbox_are_refused(start_agent, tmp_path: Path, confine: bool) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    agent = start_agent(sandbox=tmp_path / "deep" / "sandbox", confine=confine)
    ups = "../" * 8
    for dest in ("~/../../../..", f"{ups}{victim.relative_to('/')}", f"~/{ups}{victim.relative_to('/')}"):
        status, body = _post(agent, f"/files?dest={urllib.request.quote(dest)}", _tar_of("f.txt", b"evil"))
        assert status == 400, body
        assert "'..'" in json.loads(body)["error"]
        status, body = _post(agent, "/links", json.dumps({"dest": dest, "target": str(tmp_path)}).encode(),
                             "application/json")
        assert status == 400, body
    assert (victim / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["sandbox"]


def test_an_existing_directory_sortie_did_not_place_is_never_removed(start_agent, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    src = tmp_path / "src"
    src.mkdir()
    (src / "new.txt").write_text("new")
    # not confined: absolute paths are the node's own; links may target the test's directories
    agent = start_agent(sandbox=tmp_path / "sandbox", link_roots=[tmp_path])
    client = agent.client()
    with pytest.raises(AgentError) as err:
        client.upload(str(src), str(victim))
    assert err.value.status == 409 and "did not place" in str(err.value)
    with pytest.raises(AgentError) as err:
        client.link(str(victim), str(src))
    assert err.value.status == 409
    assert (victim / "precious.txt").read_text() == "keep me" and not victim.is_symlink()
    # What it placed itself it replaces; so does a re-upload to the workdir.
    placed = tmp_path / "placed"
    client.upload(str(src), str(placed))
    (src / "new.txt").write_text("newer")
    client.upload(str(src), str(placed))
    assert (placed / "new.txt").read_text() == "newer"
    # A run's own directory inside the sandbox, with content, is left alone too.
    run_id = client.run("mkdir -p ~/made && echo mine > ~/made/f && mkdir -p made2 && echo x > made2/f",
                        env={"HOME": str(agent.sandbox / "home")})
    assert client.wait(run_id, timeout=20).exit_code == 0
    with pytest.raises(AgentError) as err:
        client.upload(str(src), "made2")
    assert err.value.status == 409
    assert (agent.sandbox / "workdir" / "made2" / "f").read_text() == "x\n"


def test_node_storage_paths_follow_the_agent_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.errors import SortieError
    from orchestrator.node.node_storage import node_path

    (tmp_path / "work").mkdir()
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SORTIE_MOUNTS_ROOT", str(tmp_path / "mounts"))
    assert node_path("data") == tmp_path / "work" / "data"
    assert node_path("~/data") == tmp_path / "home" / "data"
    assert node_path("/data") == tmp_path / "mounts" / "data"
    for dest in ("../x", "~/../../x", "/a/../../x"):
        with pytest.raises(SortieError, match=r"'\.\.'"):
            node_path(dest)


def test_links_target_only_directories_inside_the_nodes_roots(start_agent, tmp_path: Path) -> None:
    """Issue 28, item 3: `POST /links` took any existing directory (`/tmp`) and gave the node user a recursive ACL
    on it. A target is now a directory under the sandbox's roots or a --link-root (the local store), reached from
    there through no symlink."""
    store = tmp_path / "store"
    (store / "bkt" / "d").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (store / "bkt" / "evil").symlink_to(outside)
    (store / "bkt" / "root").symlink_to("/")
    agent = start_agent(sandbox=tmp_path / "sandbox", link_roots=[store])
    for target in ("/tmp", "/", str(outside), str(store / "bkt" / "evil"), str(store / "bkt" / "evil") + "/.",
                   str(store / "bkt" / "root" / "etc"), str(store / "bkt" / ".." / ".." / "outside"),
                   str(store / "bkt" / "missing")):
        status, body = _post(agent, "/links", json.dumps({"dest": "x", "target": target}).encode(),
                             "application/json")
        assert status == 400, (target, body)
        assert "inside the node's roots" in json.loads(body)["error"], body
    assert not os.path.lexists(agent.sandbox / "workdir" / "x")
    (agent.sandbox / "workdir" / "sub").mkdir()
    for target in (store / "bkt" / "d", agent.sandbox / "workdir" / "sub"):
        status, body = _post(agent, "/links", json.dumps({"dest": "x", "target": str(target)}).encode(),
                             "application/json")
        assert status == 201, body
        assert os.readlink(agent.sandbox / "workdir" / "x") == str(target)
