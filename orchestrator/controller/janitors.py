"""The janitors: what outlives the job or worker that made it is removed.

Where this sits: composed by the daemon (`Controller`) after the job and pool reconcilers, over the shared
`ControllerContext`, each on its own period.
- The stacks janitor: a stack row not yet DESTROYED whose attempt is over and which no live worker or cloud
  controller owns (a failed `up` whose own cleanup failed, an older crash) is destroyed. Nothing Sortie made is
  forgotten.
- The storage janitor: an ended job's job prefix, temporary or non-persistent buckets and two-hop uploads are
  removed, once no `jobs launch` is still uploading for it; a failure is retried on a later pass.
"""

from __future__ import annotations

import logging
import time

from orchestrator.controller.context import ControllerContext
from state.machine import TransitionError

log = logging.getLogger("sortie.controller")


class Periodic:
    """A reconciler that runs at most once per `period` seconds, on one replica at a time (its `lease`)."""

    period = 0.0
    lease = ""

    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx
        self._last = 0.0

    def tick(self) -> int:
        if time.monotonic() - self._last < self.period:
            return 0
        self._last = time.monotonic()
        if not self.ctx.holds(self.lease):  # issue 14: another replica sweeps
            return 0
        try:
            self.sweep()
        except TransitionError as exc:
            log.warning("%s: %s; re-reading", type(self).__name__, exc)
        return 0

    def sweep(self) -> None:  # pragma: no cover - each janitor has its own
        raise NotImplementedError


class StackJanitor(Periodic):
    period = 10.0
    lease = "janitor:stacks"
    unlock_every = 30.0  # issue 14: stale backend locks of dead replicas (a PostgreSQL backend), this often

    def sweep(self) -> None:
        """Open attempts are read after the stacks, so a stack placed meanwhile is never taken for a leftover
        (an attempt and its stack row are written in one transaction)."""
        self._unlock_stale()
        store = self.ctx.store
        live = store.live_stacks()
        owned = store.open_stack_names()
        for row in live:
            if row.name in owned:
                continue
            result = self.ctx.stack_ops.ensure(("destroy", row.name), self.ctx.driver.destroy, row.name)
            if result is None:
                continue
            if result.ok:
                store.stack_destroyed(row.name, lease=self._lease_held())
                log.info("janitor: destroyed leftover stack %s", row.name)
            else:
                store.stack_failed(row.name, str(result.error), lease=self._lease_held())
                log.warning("janitor: destroy of %s failed, will retry: %s", row.name, result.error)


    def _lease_held(self) -> str | None:
        return self.lease if self.ctx.leases is not None else None

    def _unlock_stale(self) -> None:
        """A replica that died mid-operation left its stack locks in the shared backend: once no replica on its
        host holds a live lease, they are cancelled, so the replica that took its jobs over can go on."""
        from orchestrator.infra.pulumi_pg import is_postgres

        cancel = getattr(self.ctx.driver, "cancel_stale_locks", None)
        if self.ctx.leases is None or cancel is None or not is_postgres(self.ctx.config.pulumi.backend_url) \
                or time.monotonic() - self._unlocked_at < self.unlock_every:
            return
        self._unlocked_at = time.monotonic()
        from state.leases import live_hosts

        result = self.ctx.stack_ops.ensure(("unlock", ""), cancel, live_hosts(self.ctx.store))
        if result is not None and result.ok and result.value:
            log.info("janitor: cancelled stale locks of dead replicas on: %s", ", ".join(result.value))

    _unlocked_at = 0.0


class StorageJanitor(Periodic):
    period = 2.0
    lease = "janitor:storage"

    def sweep(self) -> None:
        from functools import partial

        from orchestrator.controller.jobs import STAGING_STALE_SECONDS
        from orchestrator.storage.staging import clean
        from state.bucket_refs import release_refs

        store = self.ctx.store
        for job in store.storage_to_clean(STAGING_STALE_SECONDS):
            # a non-persistent bucket goes only when no other live job mounts it (references in the state)
            result = self.ctx.agent_ops.ensure(("clean", job.id), clean, job.storage or {}, self.ctx.config,
                                               self.ctx.home, partial(release_refs, store, job.id))
            if result is None:
                continue
            if result.ok:
                store.storage_cleaned(job.id, result.value or [],
                                      lease=self.lease if self.ctx.leases is not None else None)
            else:
                log.warning("job %s: storage cleanup failed, will retry: %s", job.id, result.error)
