"""References from jobs to the buckets they mount by name (issue 17, item 7): a `persistent: false` bucket is
deleted only when no live job mounts it. Each change is one transaction with its event."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import cast

from sqlalchemy import Table, delete, select, update

from state.models import BucketRefRow, EventRow
from state.store import StateStore

bucket_refs = cast(Table, BucketRefRow.__table__)


def add_refs(store: StateStore, job_id: int, buckets: Mapping[str, bool]) -> None:
    """Job `job_id` mounts these buckets (`bucket URL -> delete it once unused`), before it makes or uses them."""
    if not buckets:
        return
    now = time.time()
    with store.session() as session, session.begin():
        have = set(session.scalars(select(bucket_refs.c.bucket).where(bucket_refs.c.job_id == job_id)))
        rows = [{"bucket": b, "job_id": job_id, "delete_when_unused": d, "created_at": now}
                for b, d in buckets.items() if b not in have]
        if rows:
            session.execute(bucket_refs.insert(), rows)
            session.add(EventRow(job_id=job_id, at=now, who="user", what="buckets-referenced",
                                 why=", ".join(sorted(str(r["bucket"]) for r in rows))))


def release_refs(store: StateStore, job_id: int, delete_candidates: Sequence[str]) -> list[str]:
    """Job `job_id` has ended: drop its references. Of `delete_candidates` (the buckets it would delete) return
    those no other job mounts; a bucket another job still mounts is kept and the duty to delete it passes to the
    jobs that mount it. One transaction, with an event when a bucket is kept."""
    now = time.time()
    to_delete: list[str] = []
    kept: list[str] = []
    with store.session() as session, session.begin():
        mine = {row.bucket: row.delete_when_unused for row in session.execute(
            select(bucket_refs.c.bucket, bucket_refs.c.delete_when_unused).where(bucket_refs.c.job_id == job_id))}
        session.execute(delete(bucket_refs).where(bucket_refs.c.job_id == job_id))
        for bucket in dict.fromkeys([*delete_candidates, *[b for b, d in mine.items() if d]]):
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
    return to_delete
