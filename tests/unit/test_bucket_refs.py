"""A `persistent: false` bucket is deleted only when no live job mounts it (issue 17, item 7)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from orchestrator.config import load_config
from orchestrator.spec import Overrides, load_yaml_text
from orchestrator.storage.staging import clean, named_buckets, prepare, stage
from orchestrator.storage.stores import open_store
from state.bucket_refs import add_refs, release_refs
from state.store import StateStore

TASK = """
run: ls /data
file_mounts:
  /data:
    name: shared-scratch
    source: {src}
    persistent: false
"""


def _submit(store: StateStore) -> int:
    (job_id,) = store.submit({"name": "j", "tasks": [{"name": "t", "run": "true", "num_nodes": 1,
                                                      "resources": [{}]}]}, [{}], user="u", staging=True)
    return job_id


def _launch(store: StateStore, home: Path, src: Path) -> tuple[int, dict]:
    """What `jobs launch` does for the storage of one job: reference, then stage."""
    config = load_config(home)
    plan = prepare(load_yaml_text(textwrap.dedent(TASK.format(src=src)), Overrides(), src.parent), config, home)
    job_id = _submit(store)
    add_refs(store, job_id, named_buckets(plan))
    storage = stage(plan, job_id, config, home, record=lambda _s: None)
    return job_id, storage


def test_a_bucket_two_jobs_mount_outlives_the_first_and_goes_with_the_last(sortie_home: Path,
                                                                           tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.txt").write_text("for both")
    store = StateStore(sortie_home)
    config = load_config(sortie_home)
    bucket_store = open_store("local", config.storage, sortie_home)
    job_a, storage_a = _launch(store, sortie_home, src)
    job_b, storage_b = _launch(store, sortie_home, src)  # same name, 3 s later: the bucket exists already
    assert storage_a["cleanup"]["buckets"] and not storage_b["cleanup"]["buckets"]  # A made it
    # A ends first: the bucket stays, B still mounts it; an event says so.
    removed = clean(storage_a, config, sortie_home, lambda b: release_refs(store, job_a, b))
    assert removed == []
    assert bucket_store.bucket_exists("shared-scratch")
    kept = [e for e in store.events(job_a) if e.what == "bucket-kept"]
    assert len(kept) == 1 and f"job {job_b} still mounts it" in (kept[0].why or "")
    # B ends: the last one out deletes it, though B did not make it.
    removed = clean(storage_b, config, sortie_home, lambda b: release_refs(store, job_b, b))
    assert removed == ["local://shared-scratch"]
    assert not bucket_store.bucket_exists("shared-scratch")


def test_release_is_idempotent_and_leaves_persistent_buckets(sortie_home: Path) -> None:
    store = StateStore(sortie_home)
    one, two = _submit(store), _submit(store)
    add_refs(store, one, {"local://keep": False, "local://tmp": True})
    add_refs(store, one, {"local://keep": False})  # asked twice: one reference
    add_refs(store, two, {"local://keep": False})
    assert release_refs(store, one, []) == ["local://tmp"]  # its own duty, no other job mounts it
    assert release_refs(store, one, []) == []
    assert release_refs(store, two, []) == []  # persistent: never deleted


def test_a_bucket_that_existed_before_is_never_deleted(sortie_home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    store = StateStore(sortie_home)
    config = load_config(sortie_home)
    bucket_store = open_store("local", config.storage, sortie_home)
    bucket_store.create_bucket("shared-scratch")  # made by someone else, before any job
    job_a, storage_a = _launch(store, sortie_home, src)
    job_b, storage_b = _launch(store, sortie_home, src)
    assert clean(storage_a, config, sortie_home, lambda b: release_refs(store, job_a, b)) == []
    assert clean(storage_b, config, sortie_home, lambda b: release_refs(store, job_b, b)) == []
    assert bucket_store.bucket_exists("shared-scratch")
