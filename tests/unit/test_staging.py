"""Staging: what a launch uploads and creates, the node steps it records, and the cleanup (local store)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import JobsConfig, SortieConfig, StorageConfig
from orchestrator.node.node_storage import main as node_storage_main
from orchestrator.spec import load_yaml_text
from orchestrator.storage import LocalStore, StorageError, UploadTooLarge
from orchestrator.storage.staging import NodeStep, clean, prepare, stage


def config(tmp_path: Path, **jobs: object) -> SortieConfig:
    return SortieConfig(storage=StorageConfig(local_root=str(tmp_path / "buckets")), jobs=JobsConfig(**jobs))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    work = tmp_path / "proj"
    (work / "pkg").mkdir(parents=True)
    (work / "pkg" / "a.py").write_text("print(1)\n")
    (work / "out.log").write_text("ignored\n")
    (work / ".skyignore").write_text("*.log\n")
    (tmp_path / "single.txt").write_text("one file\n")
    return work


def load(text: str, base: Path):
    return load_yaml_text(text, base_dir=base)


def test_workdir_and_mounts_go_under_the_job_prefix_of_the_intermediate_bucket(tmp_path: Path, project: Path) -> None:
    pipeline = load(f"workdir: {project}\nfile_mounts:\n  /data: {project / 'pkg'}\n  /cfg/x.txt: single.txt\n"
                    "run: ls\n", tmp_path)
    cfg = config(tmp_path, bucket="local://team-bucket/sortie")
    LocalStore(tmp_path / "buckets").create_bucket("team-bucket")
    plan = prepare(pipeline, cfg, tmp_path)
    assert [t.folder for t in plan.trees] == ["workdir", "local-file-mounts/0", "tmp-files/1"]
    assert plan.trees[0].files == 2  # pkg/a.py and .skyignore; out.log is ignored
    records: list[dict] = []
    storage = stage(plan, 7, cfg, tmp_path, record=records.append)
    keys = LocalStore(tmp_path / "buckets").list_objects("team-bucket", "sortie/job-7")
    assert set(keys) == {"sortie/job-7/workdir/pkg/a.py", "sortie/job-7/workdir/.skyignore",
                         "sortie/job-7/local-file-mounts/0/a.py", "sortie/job-7/tmp-files/1/single.txt"}
    steps = [NodeStep.from_json(s) for s in storage["tasks"][0]]
    assert [(s.dest, s.kind, s.url) for s in steps] == [
        (".", "copy", "local://team-bucket/sortie/job-7/workdir"),
        ("/data", "copy", "local://team-bucket/sortie/job-7/local-file-mounts/0"),
        ("/cfg/x.txt", "copy", "local://team-bucket/sortie/job-7/tmp-files/1/single.txt"),
    ]
    assert records and records[0]["cleanup"]["prefixes"] == ["local://team-bucket/sortie/job-7"]
    clean(storage, cfg, tmp_path)
    assert LocalStore(tmp_path / "buckets").list_objects("team-bucket") == {}
    assert LocalStore(tmp_path / "buckets").bucket_exists("team-bucket")  # the team's bucket stays


def test_temporary_bucket_and_two_hop(tmp_path: Path, project: Path) -> None:
    pipeline = load(f"workdir: {project}\nrun: ls\n", tmp_path)
    cfg = config(tmp_path)
    plan = prepare(pipeline, cfg, tmp_path)
    assert plan.temporary and plan.intermediate and plan.intermediate.bucket.startswith("sortie-tmp-")
    storage = stage(plan, 3, cfg, tmp_path, record=lambda _: None)
    bucket_dir = tmp_path / "buckets" / plan.intermediate.bucket
    assert (bucket_dir / "job-3" / "workdir" / "pkg" / "a.py").exists()
    clean(storage, cfg, tmp_path)
    assert not bucket_dir.exists()

    two_hop = config(tmp_path, force_disable_cloud_bucket=True)
    plan = prepare(pipeline, two_hop, tmp_path)
    assert plan.intermediate is None
    storage = stage(plan, 4, two_hop, tmp_path, record=lambda _: None)
    (step,) = [NodeStep.from_json(s) for s in storage["tasks"][0]]
    assert step.kind == "push" and Path(step.path or "").joinpath("pkg", "a.py").exists()
    clean(storage, two_hop, tmp_path)
    assert not (tmp_path / "jobs" / "4").exists()


def test_storage_objects_are_created_and_only_non_persistent_ones_deleted(tmp_path: Path, project: Path) -> None:
    store = LocalStore(tmp_path / "buckets")
    store.create_bucket("existing-b")
    pipeline = load(f"""\
file_mounts:
  /a: {{name: keep-b, source: {project / 'pkg'}}}
  /b: {{name: temp-b, persistent: false, mode: MOUNT_CACHED}}
  /c: {{name: existing-b, persistent: false}}
  /d: local://existing-b
run: ls
""", tmp_path)
    cfg = config(tmp_path)
    plan = prepare(pipeline, cfg, tmp_path)
    assert plan.trees == [] and plan.intermediate is None
    storage = stage(plan, 1, cfg, tmp_path, record=lambda _: None)
    assert store.list_objects("keep-b") == {"a.py": len("print(1)\n")}
    assert [(s["dest"], s["kind"]) for s in storage["tasks"][0]] == [("/a", "mount"), ("/b", "cached"),
                                                                      ("/c", "mount"), ("/d", "copy")]
    clean(storage, cfg, tmp_path)
    assert store.bucket_exists("keep-b") and store.bucket_exists("existing-b")
    assert not store.bucket_exists("temp-b")


def test_prepare_refuses_without_writing(tmp_path: Path, project: Path) -> None:
    cfg = config(tmp_path, max_upload_mb=0.001)  # 1 KiB
    (project / "pkg" / "big.bin").write_bytes(b"x" * 4096)
    with pytest.raises(UploadTooLarge, match=r"workdir .* over the .* limit \(jobs.max_upload_mb\)"):
        prepare(load(f"workdir: {project}\nrun: ls\n", tmp_path), cfg, tmp_path)
    with pytest.raises(StorageError, match="bucket nope-bucket does not exist"):
        prepare(load("file_mounts:\n  /x: local://nope-bucket\nrun: ls\n", tmp_path), config(tmp_path), tmp_path)
    with pytest.raises(StorageError, match="name different buckets"):
        prepare(load("file_mounts:\n  /x: {name: aaa, source: local://bbb}\nrun: ls\n", tmp_path),
                config(tmp_path), tmp_path)
    assert not (tmp_path / "buckets").exists() or not any((tmp_path / "buckets").iterdir())


def test_node_storage_copies_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.node.node_storage import encode_plan

    store = LocalStore(tmp_path / "buckets")
    store.create_bucket("src-b")
    (tmp_path / "f.txt").write_text("hello\n")
    store.put_file("src-b", "dir/f.txt", tmp_path / "f.txt")
    store.create_bucket("cache-b")
    mounts = tmp_path / "node-mounts"
    monkeypatch.setenv("SORTIE_MOUNTS_ROOT", str(mounts))
    monkeypatch.setenv("SORTIE_NODE_SANDBOX", str(tmp_path / "sandbox"))
    plan = {"storage": {"local_root": str(tmp_path / "buckets")}, "home": str(tmp_path),
            "steps": [{"dest": "/in", "kind": "copy", "url": "local://src-b/dir"},
                      {"dest": "/ckpt", "kind": "cached", "url": "local://cache-b"}]}
    assert node_storage_main(["fetch", encode_plan(plan)]) == 0
    assert (mounts / "in" / "f.txt").read_text() == "hello\n"
    (mounts / "ckpt" / "w.txt").write_text("written on the node\n")
    assert node_storage_main(["flush", encode_plan(plan)]) == 0
    assert store.list_objects("cache-b") == {"w.txt": len("written on the node\n")}
    bad = {**plan, "steps": [{"dest": "/in", "kind": "copy", "url": "gs://x"}]}
    assert node_storage_main(["fetch", encode_plan(bad)]) == 3


def test_cache_uploader_flushes_on_sigterm(tmp_path: Path) -> None:
    """A checkpoint written just before a clean stop (a preemption's SIGTERM) reaches the bucket, even when the
    periodic upload is far off."""
    import os
    import signal
    import subprocess
    import sys

    from orchestrator.node.node_storage import encode_plan

    store = LocalStore(tmp_path / "buckets")
    store.create_bucket("ckpt-b")
    mounts = tmp_path / "mounts"
    plan = {"storage": {"local_root": str(tmp_path / "buckets")}, "home": str(tmp_path), "interval": 600,
            "steps": [{"dest": "/ckpt", "kind": "cached", "url": "local://ckpt-b"}]}
    env = {**os.environ, "SORTIE_MOUNTS_ROOT": str(mounts), "SORTIE_NODE_SANDBOX": str(tmp_path / "sb")}
    (mounts / "ckpt").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.node.node_storage", "cache", encode_plan(plan)],
                            env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the uploader is up, its SIGTERM handler set, waiting for its next round
    assert "every 600s" in first, first
    (mounts / "ckpt" / "step").write_text("41\n")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert store.list_objects("ckpt-b") == {"step": 3}, out


def test_upload_progress_lines() -> None:
    from cli.output import UploadProgress

    class Console:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def print(self, text: str) -> None:
            self.lines.append(text)

    console = Console()
    progress = UploadProgress(console)
    total = 20 * 1024 * 1024
    for done in range(0, total + 1, 1024 * 1024):
        progress("workdir", done, total)
    progress("file_mounts./small", 10, 10)
    progress("file_mounts./small", 10, 10)
    assert console.lines[-2] == "Uploading workdir: 20.0 MiB of 20.0 MiB (100%)"
    assert len([ln for ln in console.lines if "workdir" in ln]) == 11  # 0%, 10%, ..., 100%
    assert console.lines[-1] == "Uploading file_mounts./small: 10 B of 10 B (100%)"
