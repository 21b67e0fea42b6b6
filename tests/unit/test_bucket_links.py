"""Issue 28: bucket paths are resolved inside the store's root without following a link. A symlink a job made in a
local bucket it MOUNTs (`ln -s / /data/evil`) is no object: it is not listed, not read, not written or deleted
through; a hard link to a file only root may read is not copied for a run whose user may not read it, and gets no
ACL; the agent links only to directories inside its roots."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from orchestrator.node import nofollow
from orchestrator.storage import LocalStore, StorageError

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="a second identity needs root (setfsuid)")
RUN_UID = 1_900_000_281


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "buckets")
    store.create_bucket("bkt")
    (store.root / "bkt" / "d").mkdir()
    (store.root / "bkt" / "d" / "ok.txt").write_text("ok\n")
    return store


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A directory of root's with a 0600 file in it, outside the store."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "shadow").write_text("root-secret-28\n")
    os.chmod(victim / "shadow", 0o600)
    return victim


def test_a_link_in_the_middle_is_not_followed(store: LocalStore, victim: Path, tmp_path: Path) -> None:
    (store.root / "bkt" / "evil").symlink_to(victim)
    with pytest.raises(OSError) as err:
        nofollow.open_file(store.root, "bkt/evil/shadow")
    assert err.value.errno in (errno.ELOOP, errno.ENOTDIR)
    with pytest.raises(StorageError, match="follows no symlinks"):
        store.get_file("bkt", "evil/shadow", tmp_path / "loot")
    assert not (tmp_path / "loot").exists()
    assert store.list_objects("bkt") == {"d/ok.txt": 3}  # the link is no object
    assert store.list_objects("bkt", "evil") == {} and store.list_objects("bkt", "evil/shadow") == {}


def test_an_absolute_link_to_the_root_reaches_nothing(store: LocalStore, tmp_path: Path) -> None:
    (store.root / "bkt" / "evil").symlink_to("/")
    with pytest.raises(StorageError):
        store.get_file("bkt", "evil/etc/passwd", tmp_path / "loot")
    with pytest.raises(OSError):
        nofollow.open_dir(store.root, "bkt/evil/etc")
    assert store.list_objects("bkt", "evil/etc") == {}
    assert not (tmp_path / "loot").exists()


def test_a_link_as_the_last_component_is_not_followed(store: LocalStore, victim: Path, tmp_path: Path) -> None:
    (store.root / "bkt" / "d" / "evil").symlink_to(victim / "shadow")
    with pytest.raises(StorageError):
        store.get_file("bkt", "d/evil", tmp_path / "loot")
    assert store.list_objects("bkt", "d") == {"d/ok.txt": 3}


@pytest.mark.parametrize("key", ["../victim/shadow", "d/../../victim/shadow", "./d/ok.txt", "d/./ok.txt"])
def test_dot_dot_and_dot_are_refused_before_anything_is_opened(store: LocalStore, key: str) -> None:
    with pytest.raises(OSError):
        nofollow.split_key(key)
    with pytest.raises(StorageError, match=r"'\.' or '\.\.'"):
        store.get_file("bkt", key, store.root.parent / "loot")


def test_writes_and_deletes_do_not_pass_through_a_link(store: LocalStore, victim: Path, tmp_path: Path) -> None:
    (store.root / "bkt" / "evil").symlink_to(victim)
    src = tmp_path / "new"
    src.write_text("overwritten\n")
    with pytest.raises(StorageError, match="symlink"):
        store.put_file("bkt", "evil/shadow", src)
    assert store.delete_prefix("bkt", "evil/shadow") == 0
    assert (victim / "shadow").read_text() == "root-secret-28\n"
    store.delete_prefix("bkt", "evil")  # the link itself goes, not what it points at
    assert not os.path.lexists(store.root / "bkt" / "evil") and (victim / "shadow").exists()
    (store.root / "bkt" / "d" / "ok.txt").unlink()
    (store.root / "bkt" / "d" / "ok.txt").symlink_to(victim / "shadow")
    store.put_file("bkt", "d/ok.txt", src)  # an object put at a link's name replaces the link, never its target
    assert (store.root / "bkt" / "d" / "ok.txt").read_text() == "overwritten\n"
    assert not (store.root / "bkt" / "d" / "ok.txt").is_symlink()
    assert (victim / "shadow").read_text() == "root-secret-28\n"


def test_a_linked_bucket_or_mount_directory_is_refused(store: LocalStore, victim: Path) -> None:
    (store.root / "linked").symlink_to(victim)
    assert not store.bucket_exists("linked")
    (store.root / "bkt" / "evil").symlink_to(victim)
    with pytest.raises(StorageError, match="symlink"):
        store.make_dir("bkt", "evil/sub")
    assert sorted(os.listdir(victim)) == ["shadow"]
    assert store.make_dir("bkt", "new/sub") == store.root / "bkt" / "new" / "sub"
    assert (store.root / "bkt" / "new" / "sub").is_dir()


def test_open_under_keeps_targets_inside_the_roots(store: LocalStore, victim: Path, tmp_path: Path) -> None:
    roots = [store.root]
    os.close(nofollow.open_under(str(store.root / "bkt" / "d"), roots))
    with pytest.raises(PermissionError):
        nofollow.open_under("/tmp", roots)
    with pytest.raises(PermissionError):
        nofollow.open_under(str(store.root / "bkt" / ".." / ".." / "victim"), roots)
    (store.root / "bkt" / "evil").symlink_to(victim)
    with pytest.raises(OSError):
        nofollow.open_under(str(store.root / "bkt" / "evil"), roots)


@root_only
def test_a_hard_link_to_a_root_only_file_is_not_copied_for_the_run(store: LocalStore, victim: Path,
                                                                   tmp_path: Path) -> None:
    from orchestrator.node.node_user import NodeUser, as_user

    if os.stat(victim).st_dev != os.stat(store.root).st_dev:
        pytest.skip("the store and the victim are on different filesystems")
    os.link(victim / "shadow", store.root / "bkt" / "d" / "linked")  # what fs.protected_hardlinks=0 would allow
    user = NodeUser(RUN_UID, RUN_UID)
    as_run = LocalStore(store.root, reader=lambda: as_user(user))
    with pytest.raises(StorageError, match="hard link"):
        as_run.get_file("bkt", "d/linked", tmp_path / "loot")
    assert not (tmp_path / "loot").exists()
    os.chmod(store.root / "bkt" / "d" / "ok.txt", 0o644)
    as_run.get_file("bkt", "d/ok.txt", tmp_path / "fine")  # a plain file of the bucket's is still copied
    assert (tmp_path / "fine").read_text() == "ok\n"


@root_only
def test_grant_tree_sets_no_acl_through_a_link_or_on_a_hard_link(store: LocalStore, victim: Path) -> None:
    from orchestrator.node import node_user
    from orchestrator.node.node_user import ACL_ACCESS, NodeUser

    bucket = store.root / "bkt"
    (bucket / "evil").symlink_to(victim)
    same_fs = os.stat(victim).st_dev == os.stat(bucket).st_dev
    if same_fs:
        os.link(victim / "shadow", bucket / "hard")
    top = nofollow.open_under(str(bucket), [store.root])
    try:
        why = node_user.grant_tree(top, NodeUser(RUN_UID, RUN_UID))
    finally:
        os.close(top)
    if why and "not supported" in why.lower():
        pytest.skip(f"no ACLs on this filesystem: {why}")
    assert why is None
    with pytest.raises(OSError):
        os.getxattr(victim / "shadow", ACL_ACCESS)
    with pytest.raises(OSError):
        os.getxattr(victim, ACL_ACCESS)
    assert os.getxattr(bucket / "d" / "ok.txt", ACL_ACCESS)
