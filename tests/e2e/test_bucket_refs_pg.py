"""Issue 17: the window in bucket references, on a real PostgreSQL. Job A's release decides "no live job mounts
the bucket" and deletes it; job B references the same bucket meanwhile, from another thread (another connection).
B's reference must never land between A's decision and A's deletion: it waits for A to finish, then finds the
bucket gone (and makes it again when it stages). The opposite order keeps the bucket."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from state.bucket_refs import add_refs, lock_key, release_refs
from state.store import StateStore

pytest_plugins = ["tests.support.pg"]

BUCKET = "local://shared-scratch"


@pytest.fixture
def pg_store(pg_database_url: str, sortie_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StateStore]:
    monkeypatch.setenv("SORTIE_DB_URL", pg_database_url)
    store = StateStore(sortie_home)
    assert store.engine.dialect.name == "postgresql"
    yield store
    store.engine.dispose()


def _wait_for_a_waiter(store: StateStore, timeout: float = 10.0) -> bool:
    """Wait until another connection to this test's database waits for the bucket's advisory lock (the event the
    other side's step is about); False after `timeout` (the lock is not taken: the test then fails on its order)."""
    from sqlalchemy import text

    query = text("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                 "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()")
    deadline = time.monotonic() + timeout
    with store.engine.connect() as conn:
        while time.monotonic() < deadline:
            if conn.execute(query).scalar():
                return True
            conn.rollback()
            time.sleep(0.02)
    return False


def _submit(store: StateStore) -> int:
    (job_id,) = store.submit({"name": "j", "tasks": [{"name": "t", "run": "true", "num_nodes": 1,
                                                      "resources": [{}]}]}, [{}], user="u", staging=True)
    return job_id


def test_a_reference_added_while_the_last_job_deletes_the_bucket_waits_for_the_deletion(
        pg_store: StateStore, sortie_home: Path) -> None:
    job_a, job_b = _submit(pg_store), _submit(pg_store)
    add_refs(pg_store, job_a, {BUCKET: True})  # A made it, persistent: false
    other = StateStore(sortie_home)  # B's own engine and connections, as another controller or CLI has
    deciding = threading.Event()
    timeline: list[tuple[str, float]] = []
    exists = {BUCKET: True}

    def slow_delete(url: str) -> None:  # a bucket deletion takes a while (S3: listing, deleting objects)
        timeline.append(("decided", time.monotonic()))
        deciding.set()
        _wait_for_a_waiter(pg_store)  # B is at the lock while A deletes (a slow S3 deletion, in effect)
        exists[url] = False
        timeline.append(("deleted", time.monotonic()))

    def job_a_ends() -> None:
        assert release_refs(pg_store, job_a, [BUCKET], slow_delete) == [BUCKET]

    def job_b_launches() -> None:
        assert deciding.wait(10)
        add_refs(other, job_b, {BUCKET: False})
        timeline.append(("b-referenced", time.monotonic()))
        timeline.append(("b-sees-bucket" if exists[BUCKET] else "b-sees-no-bucket", time.monotonic()))

    threads = [threading.Thread(target=job_a_ends), threading.Thread(target=job_b_launches)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    other.engine.dispose()
    events = [name for name, _ in sorted(timeline, key=lambda e: e[1])]
    # B's reference came only once the deletion was done, and B then saw the bucket gone (so it makes it again);
    # before the fix B referenced it while A was deleting it, saw it still there, and lost it.
    assert events.index("b-referenced") > events.index("deleted"), events
    assert "b-sees-no-bucket" in events, events
    # B's reference is the only one left: when B ends, the bucket is its to delete if it made it again.
    assert release_refs(pg_store, job_b, [BUCKET]) == [BUCKET]


def test_a_release_waits_for_a_reference_being_added_and_keeps_the_bucket(pg_store: StateStore,
                                                                        sortie_home: Path) -> None:
    """B's transaction is adding its reference (inserted, not yet committed) when A releases: A waits for B's
    lock, then sees B's reference and keeps the bucket. Without the lock, A read past the uncommitted row under
    READ COMMITTED and deleted the bucket B was about to use."""
    from sqlalchemy import text

    from state.bucket_refs import bucket_refs

    job_a, job_b = _submit(pg_store), _submit(pg_store)
    add_refs(pg_store, job_a, {BUCKET: True})
    other = StateStore(sortie_home)
    inserted = threading.Event()
    committed_at: list[float] = []

    def job_b_adds() -> None:  # add_refs, slowed down between its insert and its commit
        with other.session() as session, session.begin():
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key(BUCKET)})
            session.execute(bucket_refs.insert(), [{"bucket": BUCKET, "job_id": job_b, "delete_when_unused": False,
                                                   "created_at": time.time()}])
            inserted.set()
            _wait_for_a_waiter(other)  # A's release is at the lock while B's insert is not committed yet
            committed_at.append(time.monotonic())

    thread = threading.Thread(target=job_b_adds)
    thread.start()
    assert inserted.wait(10)
    deleted: list[str] = []
    result = release_refs(pg_store, job_a, [BUCKET], deleted.append)
    released_at = time.monotonic()
    thread.join(10)
    other.engine.dispose()
    assert committed_at and released_at >= committed_at[0]  # A waited for B's transaction
    assert result == [] and deleted == []  # and kept the bucket B mounts
    kept = [e for e in pg_store.events(job_a) if e.what == "bucket-kept"]
    assert len(kept) == 1 and f"job {job_b} still mounts it" in (kept[0].why or "")
    assert release_refs(pg_store, job_b, []) == [BUCKET]  # the duty passed to B: the last one out deletes it
