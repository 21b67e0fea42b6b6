"""The stack driver over the Pulumi Automation API.

- Inline programs from `stacks/` (no language host).
- One work dir per stack under `<home>/stacks/` (a shared workspace file races: pulumi#8186).
- Each operation in a fresh worker process (`orchestrator.infra._stack_worker`), at most
  `pulumi.max_concurrent_operations` at once; the SDK's process-global state never accumulates.
- Operations on a stack (`up`, `destroy`, `refresh`, `remove`) run detached from the controller, each in its own
  session, with its request, pid and result in `<home>/ops/<stack>/`: a controller killed meanwhile does not end
  the operation, and the restarted one adopts it (waits for the same worker, whose lock is alive, not stale)
  and reads its result, instead of starting it over.
- `ConcurrentUpdateError` retried with backoff; `cancel_stale_locks()` clears locks a crash left.
- Engine output appended to `<home>/logs/stacks/<stack>.log`.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orchestrator.config import SortieConfig, load_config, sortie_home
from orchestrator.errors import StackOperationError
from orchestrator.infra._stack_worker import DriverSettings, Op, StackRequest
from orchestrator.infra.detached_ops import DETACHED_OPS, DetachedOperations
from orchestrator.infra.engine import backend_url, engine_env, require_engine
from orchestrator.infra.fork_server import ForkServer
from orchestrator.infra.pulumi_pg import check_backend, is_postgres
from orchestrator.infra.stack_driver import Preview, RefreshResult, UpResult
from stacks.spec import StackProgram


class PulumiStackDriver:
    """`StackDriver` backed by the real Pulumi engine."""

    def __init__(self, home: Path | None = None, config: SortieConfig | None = None,
                 max_concurrent: int | None = None, timeout: float | None = 3600.0, fork_server: bool = False) -> None:
        """`fork_server`: stack workers forked from one server that imported the SDK once (issue 26): for a
        long-lived caller (the controller); a one-off command is better off without one. `close()` stops it."""
        self.home = home or sortie_home()
        self.config = config or load_config(self.home)
        engine = require_engine()
        self.settings = DriverSettings(
            home=str(self.home),
            project=self.config.pulumi.project,
            backend_url=backend_url(self.config, self.home),
            secrets_provider=self.config.pulumi.secrets_provider,
            engine_root=str(engine.bin_dir.parent),
            stacks_dir=str(self.home / "stacks"),
            logs_dir=str(self.home / "logs" / "stacks"),
            concurrent_update_retries=self.config.pulumi.concurrent_update_retries,
            stack_tags=tuple(sorted(self.config.pulumi.stack_tags.items())),
            policy_packs=tuple(str(Path(p).expanduser()) for p in self.config.pulumi.policy_packs),
            engine_version=engine.version,
        )
        if self.settings.backend_url.startswith("file://"):
            Path(self.settings.backend_url.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        elif is_postgres(self.settings.backend_url):  # issue 14: one clear line, not the engine's trace
            check_backend(self.settings.backend_url)
        self._env = {**os.environ, **engine_env(self.home, self.config, engine)}
        self._slots = threading.BoundedSemaphore(max_concurrent or self.config.pulumi.operation_slots)
        self.timeout = timeout
        self.forks: ForkServer | None = None
        if fork_server:
            self.forks = ForkServer(self._env, self.home / "logs" / "stacks" / "_fork_server.log")
        self.operations = DetachedOperations(self.home / "ops", self.forks.spawn if self.forks else None)

    def close(self) -> None:
        """Stop the fork server, if any (the operations it forked go on: they are in sessions of their own)."""
        if self.forks is not None:
            self.forks.close()

    def log_path(self, stack: str) -> Path:
        return Path(self.settings.logs_dir) / f"{stack}.log"

    def _call(self, op: Op, stack: str = "", program: StackProgram | None = None, **flags: Any) -> Any:
        request = StackRequest(op=op, stack=stack, settings=self.settings, program=program, **flags)
        if stack and op in DETACHED_OPS:
            with self._slots:
                return self.operations.run(request, self._env, self.timeout, str(self.log_path(stack)))
        with self._slots, tempfile.TemporaryDirectory(prefix="sortie-op-") as tmp:
            result_path = Path(tmp) / "result.pickle"
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "orchestrator.infra._stack_worker", str(result_path)],
                    input=pickle.dumps(request), env=self._env, capture_output=True, timeout=self.timeout,
                )
            except subprocess.TimeoutExpired:
                raise StackOperationError(f"{op} of stack {stack} took longer than {self.timeout:.0f}s",
                                          stack, str(self.log_path(stack))) from None
            if not result_path.exists():
                tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise StackOperationError(
                    f"{op} of stack {stack}: worker process died with exit code {proc.returncode}: {tail[0]}",
                    stack, str(self.log_path(stack)))
            status, value = pickle.loads(result_path.read_bytes())
        if self.settings.backend_url.startswith("file://"):  # issue 17: no empty lock directories pile up
            from orchestrator.infra.backend_locks import prune_empty_lock_dirs

            prune_empty_lock_dirs(Path(self.settings.backend_url.removeprefix("file://")))
        if status == "error":
            raise value
        return value

    def up(self, stack: str, program: StackProgram, *, cleanup_on_failure: bool = True) -> UpResult:
        return self._call("up", stack, program, cleanup_on_failure=cleanup_on_failure)

    def preview(self, stack: str, program: StackProgram) -> Preview:
        return self._call("preview", stack, program)

    def refresh(self, stack: str) -> RefreshResult:
        return self._call("refresh", stack)

    def destroy(self, stack: str, *, remove: bool = True) -> None:
        self._call("destroy", stack, remove=remove)

    def remove(self, stack: str) -> None:
        self._call("remove", stack)

    def list_stacks(self) -> list[str]:
        return self._call("list")

    def cancel_stale_locks(self, live_hosts: Iterable[str] = ()) -> list[str]:
        """Cancel locks left by operations that died: on this host, those whose process is gone; on a PostgreSQL
        backend, also those of hosts where no replica holds a live lease (`live_hosts` are the others)."""
        return self._call("unlock", live_hosts=tuple(sorted(live_hosts)))

    def passphrase_problem(self) -> str | None:
        """Issue 14: on a PostgreSQL backend, whether this replica's passphrase opens the stacks already there."""
        if not is_postgres(self.settings.backend_url) or self.settings.secrets_provider != "passphrase":
            return None
        from orchestrator.config import passphrase_file
        from orchestrator.infra.pulumi_pg import passphrase_problem

        phrase = passphrase_file(self.home).read_text().strip()
        return passphrase_problem(self.settings.backend_url, phrase, self.settings.project)
