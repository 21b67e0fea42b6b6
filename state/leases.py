"""Leases: which controller replica drives which job, pool and janitor (issue 14).

Where this sits: in `state`, beside the named transitions. Several controller replicas may share one PostgreSQL;
each drives only the work whose lease it holds:
- a job: `jobs.lock_owner` / `jobs.lock_expires_at`;
- work that is not a job (a pool with its workers and its jobs, each janitor): a row of `leases`.

A replica **claims** free or expired work (`SELECT ... FOR UPDATE SKIP LOCKED`, then sets the owner), only while it
holds fewer than `controller.max_jobs_per_replica` jobs, **renews** what it holds every few ticks, and **releases**
it on a clean stop. Every transition a replica makes is **guarded** by the lease: `hold_job` / `hold` run inside the
transition's own transaction (the job's row is locked `FOR UPDATE` and its owner compared), so a replica that lost a
lease (paused, partitioned, taken over) writes nothing; the transition raises `LeaseLost`. Expiry is judged by the
claimer, never by the guard: a lease nobody took over is still its owner's.

A replica's id is stable across its restarts (`controller.id`, or host plus a hash of its home), so a restarted
replica keeps its leases at once: the home's lock guarantees its previous process is gone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError

from state.machine import ACTIVE, TransitionError
from state.models import EventRow, JobRow, LeaseRow, ReplicaRow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from state.store import StateStore

_ACTIVE = sorted(ACTIVE)
CLAIM_BATCH = 1000  # jobs claimed in one tick at most: short transactions, even with 10,000 submitted at once
OWNER_KEY = "lease_owner"  # in `Session.info`: the replica whose leases guard this session's transitions


class LeaseLost(TransitionError):
    """This replica no longer holds the lease of the row it meant to change: another replica drives it now."""


def owner_of(session: Session) -> str | None:
    return session.info.get(OWNER_KEY)


def hold_job(session: Session, job_id: int) -> None:
    """Inside a transition: lock the job's row and check that this session's replica holds its lease."""
    me = owner_of(session)
    if me is None:  # the CLI, the services, the tests: not a replica
        return
    owner = session.execute(select(JobRow.lock_owner).where(JobRow.id == job_id).with_for_update()).scalar()
    if owner != me:
        raise LeaseLost(f"job {job_id}: replica {me} does not hold its lease (held by {owner or 'nobody'})")


def hold(session: Session, name: str) -> None:
    """Inside a transition: lock the lease row `name` and check that this session's replica holds it."""
    me = owner_of(session)
    if me is None:
        return
    owner = session.execute(select(LeaseRow.owner).where(LeaseRow.name == name).with_for_update()).scalar()
    if owner != me:
        raise LeaseLost(f"{name}: replica {me} does not hold its lease (held by {owner or 'nobody'})")


@dataclass(frozen=True)
class ReplicaView:
    """A replica as `controller status` shows it."""

    id: str
    host: str
    pid: int
    home: str
    version: str | None
    started_at: float
    heartbeat_at: float
    lease_seconds: float
    stopped_at: float | None
    jobs_held: int
    leases_held: tuple[str, ...]

    @property
    def live(self) -> bool:
        return self.stopped_at is None and time.time() - self.heartbeat_at <= self.lease_seconds


class ReplicaConflict(Exception):
    """Another live replica already uses this replica id."""


class Leases:
    """One replica's side of the leases, over the shared state."""

    def __init__(self, store: StateStore, replica_id: str, lease_seconds: float, max_jobs: int) -> None:
        self.store = store
        self.me = replica_id
        self.lease_seconds = lease_seconds
        self.max_jobs = max_jobs
        self._renewed_at = 0.0

    # --- the replica itself ---------------------------------------------------------------------------------

    def register(self, *, host: str, pid: int, home: str, version: str | None,
                 pid_alive: Any = None) -> None:
        """Record this replica (at start). Refused (`ReplicaConflict`) when another live process already runs under
        this id: one on another host with a fresh heartbeat, or one on this host whose pid is alive."""
        now = time.time()
        with self.store.session() as session, session.begin():
            row = session.get(ReplicaRow, self.me, with_for_update=True)
            if row is not None and row.stopped_at is None and row.pid != pid and (
                    (row.host != host and now - row.heartbeat_at <= row.lease_seconds)
                    or (row.host == host and pid_alive is not None and pid_alive(row.pid))):
                raise ReplicaConflict(f"controller id {self.me} is in use by a live replica (host {row.host}, pid "
                                      f"{row.pid}); give each replica its own `controller.id`")
            if row is None:
                row = ReplicaRow(id=self.me)
                session.add(row)
            row.host, row.pid, row.home, row.version = host, pid, home, version
            row.started_at, row.heartbeat_at, row.lease_seconds, row.stopped_at = now, now, self.lease_seconds, None

    def renew(self, *, force: bool = False) -> bool:
        """Heartbeat and push out every lease this replica holds; done at most every third of a lease (each tick
        asks). Returns whether it renewed."""
        now = time.time()
        if not force and now - self._renewed_at < self.lease_seconds / 3:
            return False
        until = now + self.lease_seconds
        with self.store.session() as session, session.begin():
            session.execute(update(ReplicaRow).where(ReplicaRow.id == self.me).values(heartbeat_at=now,
                                                                                      stopped_at=None))
            session.execute(update(JobRow).where(JobRow.lock_owner == self.me, JobRow.status.in_(_ACTIVE))
                            .values(lock_expires_at=until))
            session.execute(update(LeaseRow).where(LeaseRow.owner == self.me).values(expires_at=until))
        self._renewed_at = now
        return True

    def release(self) -> None:
        """A clean stop: every lease goes back at once, for another replica to take without waiting."""
        with self.store.session() as session, session.begin():
            session.execute(update(JobRow).where(JobRow.lock_owner == self.me, JobRow.status.in_(_ACTIVE))
                            .values(lock_owner=None, lock_expires_at=None))
            session.execute(update(LeaseRow).where(LeaseRow.owner == self.me).values(owner=None, expires_at=None))
            session.execute(update(ReplicaRow).where(ReplicaRow.id == self.me).values(stopped_at=time.time()))

    # --- jobs -----------------------------------------------------------------------------------------------

    def claim_jobs(self, pools: set[str]) -> list[int]:
        """Take jobs in progress that nobody holds (new ones) or whose lease expired (their replica died or
        stalled), up to `max_jobs` held. A pool job goes only to the holder of its pool's lease. Rows another
        replica is claiming right now are skipped (`SKIP LOCKED`), never waited for. Returns the ids taken."""
        now = time.time()
        with self.store.session() as session, session.begin():
            held = session.scalar(select(func.count()).select_from(JobRow).where(
                JobRow.lock_owner == self.me, JobRow.status.in_(_ACTIVE))) or 0
            room = min(self.max_jobs - held, CLAIM_BATCH)
            if room <= 0:
                return []
            free = or_(JobRow.lock_owner.is_(None), JobRow.lock_expires_at.is_(None), JobRow.lock_expires_at < now)
            mine = or_(JobRow.pool.is_(None), JobRow.pool.in_(sorted(pools))) if pools else JobRow.pool.is_(None)
            rows = session.execute(
                select(JobRow.id, JobRow.lock_owner, JobRow.current_task)
                .where(JobRow.status.in_(_ACTIVE), JobRow.lock_owner.is_distinct_from(self.me), free, mine)
                .order_by(JobRow.id).limit(room).with_for_update(skip_locked=True)).all()
            if not rows:
                return []
            ids = [job_id for job_id, _, _ in rows]
            session.execute(update(JobRow).where(JobRow.id.in_(ids), JobRow.lock_owner.is_distinct_from(self.me),
                                                 free).values(lock_owner=self.me,
                                                              lock_expires_at=now + self.lease_seconds))
            taken = set(session.scalars(select(JobRow.id).where(JobRow.id.in_(ids), JobRow.lock_owner == self.me)))
            for job_id, previous, task_index in rows:
                if job_id in taken and previous is not None:  # a takeover: say so in the job's history
                    session.add(EventRow(job_id=job_id, task_index=task_index, at=now, who="controller",
                                         what="taken-over", why=f"replica {previous}'s lease expired",
                                         replica=self.me, data={"from": previous}))
            return sorted(taken)

    def jobs_held(self) -> set[int]:
        with self.store.session() as session:
            return set(session.scalars(select(JobRow.id).where(JobRow.lock_owner == self.me,
                                                               JobRow.status.in_(_ACTIVE))))

    def still_holds_job(self, job_id: int) -> bool:
        """Before an action outside the state (a stack operation): the lease is this replica's and not expired."""
        with self.store.session() as session:
            row = session.execute(select(JobRow.lock_owner, JobRow.lock_expires_at).where(
                JobRow.id == job_id)).one_or_none()
        return row is not None and row[0] == self.me and (row[1] or 0) > time.time()

    # --- leases on work that is not a job -------------------------------------------------------------------

    def claim(self, name: str) -> bool:
        """Hold the lease `name` (a pool, a janitor): already ours, free, or expired. False if another live
        replica holds it."""
        now = time.time()
        try:
            with self.store.session() as session, session.begin():
                row = session.get(LeaseRow, name, with_for_update=True)
                if row is None:
                    session.add(LeaseRow(name=name, owner=self.me, expires_at=now + self.lease_seconds,
                                         acquired_at=now))
                    return True
                if row.owner == self.me:
                    return True
                if row.owner is not None and (row.expires_at or 0) >= now:
                    return False
                row.owner, row.expires_at, row.acquired_at = self.me, now + self.lease_seconds, now
                return True
        except IntegrityError:  # another replica inserted it first
            return False

    def held(self, prefix: str = "") -> set[str]:
        with self.store.session() as session:
            return set(session.scalars(select(LeaseRow.name).where(LeaseRow.owner == self.me,
                                                                   LeaseRow.name.startswith(prefix))))

    def drop(self, name: str) -> None:
        """Give a lease back (its work is over: a terminated pool)."""
        with self.store.session() as session, session.begin():
            session.execute(update(LeaseRow).where(LeaseRow.name == name, LeaseRow.owner == self.me).values(
                owner=None, expires_at=None))


def replicas(store: StateStore) -> list[ReplicaView]:
    """Every replica the shared state knows, with the jobs and leases each holds now."""
    with store.session() as session:
        rows = list(session.scalars(select(ReplicaRow).order_by(ReplicaRow.started_at)))
        jobs = dict(session.execute(select(JobRow.lock_owner, func.count()).where(
            JobRow.status.in_(_ACTIVE), JobRow.lock_owner.is_not(None)).group_by(JobRow.lock_owner)).tuples().all())
        leases: dict[str, list[str]] = {}
        for name, owner in session.execute(select(LeaseRow.name, LeaseRow.owner).where(LeaseRow.owner.is_not(None))):
            leases.setdefault(owner, []).append(name)
    return [ReplicaView(r.id, r.host, r.pid, r.home, r.version, r.started_at, r.heartbeat_at, r.lease_seconds,
                        r.stopped_at, int(jobs.get(r.id, 0)), tuple(sorted(leases.get(r.id, []))))
            for r in rows]


def live_hosts(store: StateStore) -> set[str]:
    """Hosts where some replica has a fresh heartbeat (its stack locks are alive, not stale)."""
    now = time.time()
    with store.session() as session:
        return {host for host, beat, lease, stopped in session.execute(select(
            ReplicaRow.host, ReplicaRow.heartbeat_at, ReplicaRow.lease_seconds, ReplicaRow.stopped_at))
            if stopped is None and now - beat <= lease}
