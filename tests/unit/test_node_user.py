"""Issue 17: each local-cloud node's runs get a user of their own, allocated deterministically from a reserved
range (orchestrator/node/node_user.py)."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.node import node_user
from orchestrator.node.node_user import (
    NODE_UID_BASE,
    NODE_UID_SLOTS,
    NodeUser,
    acl_with,
    candidate_uid,
    choose_uid,
    in_range,
    taken_uids,
)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown and setfsuid need root")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user may pass through (pytest's tmp_path lies under a 0700 directory of root's)."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="sortie-node-user-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_node_uid_is_deterministic_and_in_the_reserved_range() -> None:
    uid = candidate_uid("sortie-job-1-1-node-0")
    assert uid == candidate_uid("sortie-job-1-1-node-0")  # the same after a restart, on any machine
    assert in_range(uid) and NODE_UID_BASE <= uid < NODE_UID_BASE + NODE_UID_SLOTS < 2**31 - 1
    assert candidate_uid("sortie-job-1-1-node-1") != uid
    assert candidate_uid("sortie-job-1-1-node-0", 1) != uid
    uids = {candidate_uid(f"sortie-job-{i}-1-node-0") for i in range(2000)}
    assert len(uids) >= 1999 and all(in_range(u) for u in uids)  # 2^24 slots: collisions are rare ...


def test_a_taken_uid_or_an_account_moves_on_to_the_next_candidate() -> None:
    first, second, third = (candidate_uid("n", i) for i in range(3))
    assert choose_uid("n", set()) == first
    assert choose_uid("n", {first}) == second  # ... and a collision with a live node is skipped
    assert choose_uid("n", {first}, has_account=lambda uid: uid == second) == third  # never a real account's
    assert not in_range(0) and not in_range(65534) and not in_range(NODE_UID_BASE + NODE_UID_SLOTS)


def test_choose_gives_up_after_its_tries() -> None:
    with pytest.raises(RuntimeError, match="no free node uid"):
        choose_uid("n", set(), has_account=lambda uid: True)


def test_taken_uids_are_the_groups_of_the_other_sandboxes(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes"
    for name in ("a", "b", "c"):
        (nodes / name).mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(nodes / "a", 0, NODE_UID_BASE + 5)
        os.chown(nodes / "b", 0, NODE_UID_BASE + 6)
        assert taken_uids(nodes, nodes / "b") == {NODE_UID_BASE + 5}  # its own is not "taken"
    assert taken_uids(nodes, nodes / "c") <= {NODE_UID_BASE + 5, NODE_UID_BASE + 6}


@root_only
def test_prepare_sandbox_allocates_once_and_owns_the_run_dirs(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes"
    one, two = nodes / "node-one", nodes / "node-two"
    one.mkdir(parents=True)
    two.mkdir()
    os.chown(two, 0, candidate_uid("node-one"))  # a live node holds node-one's first choice
    user = node_user.prepare_sandbox(one, "node-one")
    assert user == NodeUser(candidate_uid("node-one", 1), candidate_uid("node-one", 1))
    st = one.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, user.gid, 0o710)
    for name in ("workdir", "home", "mounts", "tmp"):
        sub = (one / name).stat()
        assert (sub.st_uid, sub.st_gid, stat.S_IMODE(sub.st_mode)) == (user.uid, user.gid, 0o700)
    runs = (one / "runs").stat()
    assert (runs.st_uid, stat.S_IMODE(runs.st_mode)) == (0, 0o700)
    assert node_user.prepare_sandbox(one, "node-one") == user  # an agent restart keeps the node's user


@root_only
def test_two_nodes_starting_at_once_never_share_a_uid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = tmp_path / "nodes"
    sandboxes = [nodes / f"n{i}" for i in range(8)]
    for sandbox in sandboxes:
        sandbox.mkdir(parents=True)
    # every node's first candidate is the same uid: only the flock keeps them apart
    monkeypatch.setattr(node_user, "candidate_uid", lambda node_id, n=0: NODE_UID_BASE + n)
    users: dict[str, NodeUser] = {}
    threads = [threading.Thread(target=lambda s=s: users.__setitem__(s.name, node_user.prepare_sandbox(s, s.name)))
               for s in sandboxes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({u.uid for u in users.values()}) == len(sandboxes)


@root_only
def test_as_user_writes_as_the_node_user_in_this_thread_only(open_dir: Path) -> None:
    tmp_path = open_dir
    user = NodeUser(NODE_UID_BASE + 11, NODE_UID_BASE + 11)
    mine = tmp_path / "mine"
    mine.mkdir()
    os.chown(mine, user.uid, user.gid)
    secret = tmp_path / "root-only"
    secret.write_text("x")
    os.chmod(secret, 0o600)
    with node_user.as_user(user):
        (mine / "made").write_text("by the user")
        with pytest.raises(PermissionError):
            secret.read_text()
        with pytest.raises(PermissionError):
            (tmp_path / "elsewhere").write_text("no")
    assert (mine / "made").stat().st_uid == user.uid
    assert secret.read_text() == "x"  # root again after


@root_only
def test_give_tree_follows_no_symlink(tmp_path: Path) -> None:
    user = NodeUser(NODE_UID_BASE + 12, NODE_UID_BASE + 12)
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("f")
    outside.mkdir()
    (outside / "keep").write_text("k")
    (tree / "link").symlink_to(outside)
    node_user.give_tree(tree, user)
    assert (tree / "sub" / "f").stat().st_uid == user.uid and (tree / "sub").stat().st_uid == user.uid
    assert (tree / "link").lstat().st_uid == user.uid
    assert outside.stat().st_uid == 0 and (outside / "keep").stat().st_uid == 0


def test_an_acl_adds_the_user_and_a_mask() -> None:
    data = acl_with(None, 0o700, NODE_UID_BASE + 1, 7)
    entries = [struct.unpack_from("<HHI", data, off) for off in range(4, len(data), 8)]
    assert struct.unpack_from("<I", data)[0] == 2
    assert entries == [(0x01, 7, 0xFFFFFFFF), (0x02, 7, NODE_UID_BASE + 1), (0x04, 0, 0xFFFFFFFF),
                       (0x10, 7, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]
    again = acl_with(data, 0o700, NODE_UID_BASE + 2, 6)  # a second node keeps the first's entry
    users = [e for e in (struct.unpack_from("<HHI", again, off) for off in range(4, len(again), 8)) if e[0] == 2]
    assert users == [(2, 7, NODE_UID_BASE + 1), (2, 6, NODE_UID_BASE + 2)]


@root_only
def test_grant_tree_lets_the_user_read_and_write_a_bucket(open_dir: Path) -> None:
    tmp_path = open_dir
    user = NodeUser(NODE_UID_BASE + 13, NODE_UID_BASE + 13)
    bucket = tmp_path / "bucket"
    (bucket / "d").mkdir(parents=True)
    (bucket / "d" / "f").write_text("data")
    for path in (bucket, bucket / "d"):
        os.chmod(path, 0o700)
    os.chmod(bucket / "d" / "f", 0o600)
    top = os.open(bucket, os.O_RDONLY | os.O_DIRECTORY)
    try:
        why = node_user.grant_tree(top, user)
    finally:
        os.close(top)
    if why and "not supported" in why.lower():
        pytest.skip(f"no ACLs on this filesystem: {why}")
    assert why is None
    with node_user.as_user(user):
        assert (bucket / "d" / "f").read_text() == "data"
        (bucket / "d" / "new").write_text("by the user")
    with node_user.as_user(NodeUser(NODE_UID_BASE + 14, NODE_UID_BASE + 14)), pytest.raises(PermissionError):
        (bucket / "d" / "f").read_text()  # another node's user is not let in


def test_an_s3_mount_for_a_node_user_is_its_own(tmp_path: Path) -> None:
    """The node's bucket steps run as root; an S3 MOUNT they make is for the node's user (SORTIE_RUN_UID)."""
    from orchestrator.node.node_storage import fuse_mount_command

    owner = {"SORTIE_RUN_UID": f"{NODE_UID_BASE + 3}:{NODE_UID_BASE + 3}"}
    rclone, _ = fuse_mount_command("rclone", "b/p", tmp_path / "m", {}, tmp_path / "log", owner)
    assert rclone[-7:] == ["--allow-other", "--uid", str(NODE_UID_BASE + 3), "--gid", str(NODE_UID_BASE + 3),
                           "--umask", "077"]
    s3fs, _ = fuse_mount_command("s3fs", "b", tmp_path / "m", {}, tmp_path / "log", owner)
    assert s3fs[-2:] == ["-o", f"allow_other,uid={NODE_UID_BASE + 3},gid={NODE_UID_BASE + 3},umask=077"]
    plain, _ = fuse_mount_command("rclone", "b", tmp_path / "m", {}, tmp_path / "log", {})
    assert "--allow-other" not in plain
