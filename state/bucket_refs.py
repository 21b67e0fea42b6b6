"""References from jobs to the buckets they mount by name (issue 17, item 7): a `persistent: false` bucket is
deleted only when no live job mounts it. Each change is one transaction with its event.

The window (issue 17): deciding "no other job mounts it" and deleting the bucket used to be two steps, the
decision committed first. A job that referenced the bucket in between (its `add_refs` landing after the decision,
its staging finding the bucket still there) lost it when the deletion came. Now every transaction that adds or
drops a reference to a bucket first takes that bucket's lock, and `release_refs` deletes the buckets it decided on
(its `delete` callback) inside the same transaction, holding the locks: a job adding a reference meanwhile waits,
then finds the bucket gone and makes it again. The lock is a transaction-scoped advisory lock on PostgreSQL
(`pg_advisory_xact_lock`, keyed by the bucket's URL: a row lock cannot hold a reference that does not exist
yet); on SQLite the database's single writer already orders the two transactions (each writes before it reads)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import cast

from sqlalchemy import Table, delete, select, text, update
from sqlalchemy.orm import Session

from state.models import BucketRefRow, EventRow
from state.store import StateStore

bucket_refs = cast(Table, BucketRefRow.__table__)
_LOCK_NAMESPACE = b"sortie-bucket-ref:"


def lock_key(bucket: str) -> int:
    """The advisory lock's key of a bucket URL: a signed 64-bit integer, the same in every process."""
    return int.from_bytes(hashlib.sha256(_LOCK_NAMESPACE + bucket.encode()).digest()[:8], "big", signed=True)


def _lock_buckets(session: Session, buckets: Iterable[str]) -> None:
    """Take each bucket's lock until the transaction ends (sorted, so two transactions never deadlock)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for key in sorted({lock_key(b) for b in buckets}):
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def add_refs(store: StateStore, job_id: int, buckets: Mapping[str, bool]) -> None:
    """Job `job_id` mounts these buckets (`bucket URL -> delete it once unused`), before it makes or uses them.
    Waits while another job's `release_refs` is deciding on (and deleting) one of them."""
    if not buckets:
        return
    now = time.time()
    with store.session() as session, session.begin():
        _lock_buckets(session, buckets)
        have = set(session.scalars(select(bucket_refs.c.bucket).where(bucket_refs.c.job_id == job_id)))
        rows = [{"bucket": b, "job_id": job_id, "delete_when_unused": d, "created_at": now}
                for b, d in buckets.items() if b not in have]
        if rows:
            session.execute(bucket_refs.insert(), rows)
            session.add(EventRow(job_id=job_id, at=now, who="user", what="buckets-referenced",
                                 why=", ".join(sorted(str(r["bucket"]) for r in rows))))


def release_refs(store: StateStore, job_id: int, delete_candidates: Sequence[str],
                 delete_bucket: Callable[[str], object] | None = None) -> list[str]:
    """Job `job_id` has ended: drop its references. Of `delete_candidates` (the buckets it would delete) return
    those no other job mounts; a bucket another job still mounts is kept and the duty to delete it passes to the
    jobs that mount it. One transaction, with an event when a bucket is kept.

    With `delete_bucket`, each bucket returned is deleted by `delete_bucket(url)` inside that transaction, under
    the buckets' locks, so no other job can reference it between the decision and the deletion (module docstring);
    if a deletion fails, the whole release is rolled back (the references stay) and the error is raised, to be
    retried. Without it the caller deletes them afterwards, and the window stays open."""
    now = time.time()
    to_delete: list[str] = []
    kept: list[str] = []
    with store.session() as session, session.begin():
        mine = {row.bucket: row.delete_when_unused for row in session.execute(
            select(bucket_refs.c.bucket, bucket_refs.c.delete_when_unused).where(bucket_refs.c.job_id == job_id))}
        candidates = list(dict.fromkeys([*delete_candidates, *[b for b, d in mine.items() if d]]))
        _lock_buckets(session, [*candidates, *mine])
        session.execute(delete(bucket_refs).where(bucket_refs.c.job_id == job_id))
        for bucket in candidates:
            others = list(session.scalars(select(bucket_refs.c.job_id).where(bucket_refs.c.bucket == bucket)))
            if others:
                session.execute(update(bucket_refs).where(bucket_refs.c.bucket == bucket)
                                .values(delete_when_unused=True))
                kept.append(f"{bucket} (job {', '.join(str(o) for o in sorted(others))} still mounts it)")
            else:
                to_delete.append(bucket)
        if kept:
            session.add(EventRow(job_id=job_id, at=now, who="controller", what="bucket-kept",
                                 why="not deleted: " + "; ".join(kept)))
        if delete_bucket is not None:
            session.flush()  # SQLite: the write lock is held from here, before any bucket goes
            for bucket in to_delete:
                delete_bucket(bucket)
    return to_delete
