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
    """A reconciler that runs at most once per `period` seconds."""

    period = 0.0

    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx
        self._last = 0.0

    def tick(self) -> int:
        if time.monotonic() - self._last < self.period:
            return 0
        self._last = time.monotonic()
        try:
            self.sweep()
        except TransitionError as exc:
            log.warning("%s: %s; re-reading", type(self).__name__, exc)
        return 0

    def sweep(self) -> None:  # pragma: no cover - each janitor has its own
        raise NotImplementedError


class StackJanitor(Periodic):
    period = 10.0

    def sweep(self) -> None:
        """Open attempts are read after the stacks, so a stack placed meanwhile is never taken for a leftover
        (an attempt and its stack row are written in one transaction)."""
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
                store.stack_destroyed(row.name)
                log.info("janitor: destroyed leftover stack %s", row.name)
            else:
                store.stack_failed(row.name, str(result.error))
                log.warning("janitor: destroy of %s failed, will retry: %s", row.name, result.error)


class StorageJanitor(Periodic):
    period = 2.0

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
                store.storage_cleaned(job.id, result.value or [])
            else:
                log.warning("job %s: storage cleanup failed, will retry: %s", job.id, result.error)
