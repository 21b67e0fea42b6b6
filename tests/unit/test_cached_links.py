"""Issue 17: the MOUNT_CACHED uploader (root, on a local-cloud node with node users) never uploads what a symlink in
the cached directory points at: not a file outside it (another job's sandbox, the Sortie home, /etc/shadow), not a
directory outside it, not one a run swaps in for a directory after the scan; with the run user's identity
(`SORTIE_RUN_UID`), not a hard link to a file only root may read either."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.node import node_storage
from orchestrator.storage import CachedSync, LocalStore, parse_bucket_url


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "buckets")
    store.create_bucket("out")
    return store


def bucket_files(store: LocalStore) -> dict[str, bytes]:
    root = store.root / "out"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_symlinks_in_a_cached_directory_upload_nothing(store: LocalStore, tmp_path: Path) -> None:
    secret_dir = tmp_path / "victim"
    secret_dir.mkdir()
    (secret_dir / "shadow").write_text("root-secret-7f3a\n")
    cached = tmp_path / "cached"
    cached.mkdir()
    (cached / "mine.txt").write_text("mine\n")
    (cached / "to-file").symlink_to(secret_dir / "shadow")
    (cached / "to-dir").symlink_to(secret_dir)
    (cached / "sub").mkdir()
    (cached / "sub" / "deep").symlink_to("/etc/passwd")
    sync = CachedSync(store, parse_bucket_url("local://out/job"), cached)
    stats = sync.push()
    files = bucket_files(store)
    assert files == {"job/mine.txt": b"mine\n"}, files
    assert stats.files == 1
    assert not any(b"root-secret" in data for data in files.values())


def test_a_directory_swapped_for_a_symlink_after_the_scan_is_not_followed(store: LocalStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.txt").write_text("root-secret-91c2\n")
    cached = tmp_path / "cached"
    (cached / "d").mkdir(parents=True)
    (cached / "d" / "a.txt").write_text("mine\n")
    sync = CachedSync(store, parse_bucket_url("local://out/job"), cached)
    _present, changed = sync._changed()
    assert [key for key, _p, _s in changed] == ["d/a.txt"]
    (cached / "d" / "a.txt").unlink()
    (cached / "d").rmdir()
    (cached / "d").symlink_to(outside)  # the run's swap, between the scan and the upload
    from orchestrator.node.nofollow import open_file as open_in_tree

    with pytest.raises(OSError):
        os.close(open_in_tree(cached, "d/a.txt"))
    sync.push()
    assert not any(b"root-secret" in data for data in bucket_files(store).values())


@pytest.mark.skipif(os.geteuid() != 0, reason="the run user's identity needs root (setfsuid)")
def test_a_hard_link_to_a_root_only_file_is_not_uploaded_as_the_run_user(store: LocalStore, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    os.chmod(tmp_path, 0o755)
    secret = tmp_path / "root-only"
    secret.write_text("root-secret-c0de\n")
    os.chmod(secret, 0o600)
    cached = tmp_path / "cached"
    cached.mkdir()
    uid = 1_900_000_123
    (cached / "mine.txt").write_text("mine\n")
    os.chown(cached / "mine.txt", uid, uid)
    os.chown(cached, uid, uid)
    os.link(secret, cached / "linked")  # what fs.protected_hardlinks=0 would let the run do
    monkeypatch.setenv("SORTIE_RUN_UID", f"{uid}:{uid}")
    plan = {"storage": {"local_root": str(store.root)}, "home": str(tmp_path / "home"),
            "steps": [{"kind": "cached", "url": "local://out/job", "dest": str(cached)}]}
    monkeypatch.setenv("SORTIE_NODE_SANDBOX", str(tmp_path))
    assert node_storage.flush(plan) == 1
    files = bucket_files(store)
    assert files == {"job/mine.txt": b"mine\n"}, files
