"""Infra, one stack operation in its own process (see `PulumiStackDriver`).

The Pulumi Python SDK keeps process-global state (dynamic-provider serialization, the runtime
settings of inline programs), so every operation gets a fresh process. The request arrives pickled
on stdin; the outcome (`("ok", value)` or `("error", exception)`) is pickled into the file named by
argv[1]. Engine output goes to the stack's log.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from orchestrator.errors import (
    InfraUnfitError,
    NoCapacityError,
    PolicyViolationError,
    SortieError,
    StackLockedError,
    StackNotFoundError,
    StackOperationError,
)
from orchestrator.infra.local_cloud import NO_CAPACITY_MARKER
from orchestrator.infra.stack_driver import (
    ChangeOp,
    Preview,
    RefreshResult,
    ResourceChange,
    ResourceState,
    UpResult,
)
from stacks.spec import StackProgram

Op = Literal["up", "preview", "refresh", "destroy", "remove", "list", "unlock"]

# Capacity errors as each infra words them; any of these makes a NoCapacityError.
CAPACITY_PATTERNS = (
    NO_CAPACITY_MARKER,
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "does not have enough resources available",
    "SkuNotAvailable",
    "AllocationFailed",
    "OverconstrainedAllocationRequest",
    # Kubernetes: a pod the scheduler could not place (the provider reports its PodScheduled message on timeout).
    "nodes are available: ",
    "Insufficient nvidia.com/gpu",
)
SECRET_SIG = "4dabf18193072939515e22adb298388d"  # Pulumi's marker of a secret value in state (_lean_stack too)
# The provider's words when a Service (stacks/builders/kubernetes.py, `<cluster>-ports`) outlives its wait.
_LB_NO_ADDRESS = re.compile(r"kubernetes:core/v1:Service::(\S+-ports)\" was successfully created, but [^\n]*"
                            r"failed to fully initialize or become live: timed out")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_OP_MAP: dict[str, ChangeOp] = {
    "create": "create", "update": "update", "delete": "delete", "same": "same", "replace": "replace",
    "create-replacement": "replace", "delete-replaced": "replace",
}


@dataclass(frozen=True)
class DriverSettings:
    """Everything a worker needs to reach the backend; picklable."""

    home: str
    project: str
    backend_url: str
    secrets_provider: str
    engine_root: str
    stacks_dir: str
    logs_dir: str
    concurrent_update_retries: int = 5
    stack_tags: tuple[tuple[str, str], ...] = ()  # set on every stack Sortie creates
    policy_packs: tuple[str, ...] = ()  # local policy pack directories run on every up and preview
    engine_version: str = ""  # the version require_engine() checked (no `pulumi version` per operation)


@dataclass(frozen=True)
class StackRequest:
    op: Op
    stack: str
    settings: DriverSettings
    program: StackProgram | None = None
    cleanup_on_failure: bool = True
    remove: bool = True
    # unlock on a PostgreSQL backend (issue 14): hosts where a replica holds a live lease; their locks are alive
    live_hosts: tuple[str, ...] = ()


def _summary(text: str) -> str:
    """The one line of an engine failure worth showing a user."""
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    for pattern in CAPACITY_PATTERNS:
        for line in lines:
            if pattern in line:  # the message, not the engine's progress line around it
                return re.split(r"\b(?:error|warning): ", line, maxsplit=1)[-1]
    noise = ("update failed", "an error occurred", "preview failed", "refresh failed", "destroy failed")
    errors = [line.split("error: ", 1)[1] for line in lines if "error: " in line]
    useful = [e for e in errors if not any(n in e.lower() for n in noise)]
    if useful:
        return useful[0]
    if errors:
        return errors[-1]
    tail = [line for line in lines if line]
    return tail[-1] if tail else "the engine failed without a message"


class _Run:
    """State of one operation: its settings, log and stack."""

    def __init__(self, request: StackRequest, log: IO[str]) -> None:
        self.request = request
        self.settings = request.settings
        self.log = log
        self.work_dir = Path(self.settings.stacks_dir) / (request.stack or "_workspace")
        self.recent: deque[str] = deque(maxlen=400)  # the engine's last lines (policy reports go to stdout)

    def on_output(self, line: str) -> None:
        self.log.write(line if line.endswith("\n") else line + "\n")
        self.log.flush()
        self.recent.append(line)

    def options(self, program: Callable[[], None] | None, work_dir: Path | None = None) -> Any:
        """Workspace options: Sortie's project, backend, secrets provider and engine; one work dir per stack."""
        from pulumi import automation as auto

        from orchestrator.infra._lean_stack import LeanCommand

        work_dir = work_dir or self.work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        return auto.LocalWorkspaceOptions(
            work_dir=str(work_dir),
            program=program,
            secrets_provider=self.settings.secrets_provider,
            project_settings=auto.ProjectSettings(
                name=self.settings.project, runtime="python",
                backend=auto.ProjectBackend(url=self.settings.backend_url),
            ),
            pulumi_command=(LeanCommand(self.settings.engine_root, self.settings.engine_version)
                            if self.settings.engine_version else auto.PulumiCommand(root=self.settings.engine_root)),
        )

    def stack(self, create: bool) -> tuple[Any, bool]:
        """The request's stack and whether this call made it. Without `create`, nothing asks the engine whether it
        exists: the operation itself says so (see `missing`)."""
        from pulumi import automation as auto

        from orchestrator.infra._lean_stack import LeanStack, create_or_find

        program = self.request.program.build() if self.request.program else (lambda: None)
        workspace = auto.LocalWorkspace(**vars(self.options(program)))
        if create:
            return create_or_find(self.request.stack, workspace)
        return LeanStack(self.request.stack, workspace, remove_on_destroy=self.request.remove), False

    def missing(self) -> StackNotFoundError:
        """The stack is not there: nor is the work dir this operation made for it."""
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return StackNotFoundError(f"stack {self.request.stack} does not exist", self.request.stack, self.log.name)

    def workspace(self) -> Any:
        from pulumi import automation as auto

        return auto.LocalWorkspace(**vars(self.options(None)))

    def retrying(self, fn: Callable[[], Any]) -> Any:
        """Run an engine call, retrying while another operation holds the stack's lock."""
        from pulumi import automation as auto

        retries = self.settings.concurrent_update_retries
        for attempt in range(retries + 1):
            try:
                return fn()
            except auto.errors.ConcurrentUpdateError as exc:
                if attempt == retries:
                    raise StackLockedError(f"stack {self.request.stack} stayed locked by another operation "
                                           f"after {retries} retries: {_summary(str(exc))}",
                                           self.request.stack, self.log.name) from None
                delay = min(0.5 * 2**attempt, 8.0)
                self.on_output(f"[sortie] stack is locked; retry {attempt + 1}/{retries} in {delay:.1f}s")
                time.sleep(delay)
        raise AssertionError("unreachable")

    def fail(self, exc: Exception) -> StackOperationError:
        from pulumi import automation as auto

        if isinstance(exc, SortieError) and not isinstance(exc, StackOperationError):
            return StackOperationError(str(exc), self.request.stack, self.log.name)
        if isinstance(exc, StackOperationError):
            return exc
        text = str(exc)
        summary = _summary(text) if isinstance(exc, auto.errors.CommandError) else f"{type(exc).__name__}: {exc}"
        violation = policy_violation("\n".join(self.recent) + "\n" + text)
        if violation:
            return PolicyViolationError(f"policy violation: {violation}", self.request.stack, self.log.name)
        unbalanced = _LB_NO_ADDRESS.search(text)
        if unbalanced:  # a Kubernetes `ports` Service whose load balancer never got an address
            return InfraUnfitError(
                f"{self.request.op} of stack {self.request.stack} failed: Service {unbalanced.group(1)} (the task's "
                "ports) got no load balancer address in time: this cluster may provision no LoadBalancer Services; "
                "set kubernetes.ports: nodeport in the config", self.request.stack, self.log.name)
        cls = NoCapacityError if any(p in text for p in CAPACITY_PATTERNS) else StackOperationError
        return cls(f"{self.request.op} of stack {self.request.stack} failed: {summary}", self.request.stack,
                   self.log.name)


_POLICY_END = ("- [", "error:", "Diagnostics:", "Policies:", "Resources:", "\u274c", "\u26a0")


def policy_violation(text: str) -> str | None:
    """The first mandatory policy violation in the engine's output, as one line: the pack (`name@version`, from
    the line that heads its violations), the policy and resource, and the policy's message."""
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    pack = None
    for index, line in enumerate(lines):
        if line.startswith(("\u274c", "\u26a0")):  # "❌ team-policies@v0.0.1 (local: /path)"
            pack = line.lstrip("\u274c\u26a0\ufe0f ").split(" (")[0]
        body = line.removeprefix("- ").strip()
        if not body.startswith("[mandatory]"):
            continue
        detail = " ".join(body.removeprefix("[mandatory]").split())
        following = []
        for later in lines[index + 1:]:
            if not later or later.startswith(_POLICY_END):
                break
            following.append(later)
        head = f"{pack} {detail}" if pack else detail
        return f"{head}: {following[-1]}" if following else head
    return None


def _changed_inputs(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> set[str]:
    """Input keys whose values differ (dynamic providers report no per-key diff of their own)."""
    if not old or not new:
        return set()
    return {k for k in old.keys() | new.keys() if k != "__provider" and old.get(k) != new.get(k)}


def _plain_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in outputs.items()
            if k != "__provider" and not (isinstance(v, dict) and SECRET_SIG in v)}


def _resources(stack: Any) -> list[ResourceState]:
    deployment = stack.export_stack().deployment or {}
    found = []
    for res in deployment.get("resources") or []:
        rtype = res.get("type", "")
        if not res.get("custom") or rtype.startswith("pulumi:providers:"):
            continue
        found.append(ResourceState(urn=res["urn"], type=rtype, name=res["urn"].rsplit("::", 1)[-1],
                                   id=res.get("id", ""), outputs=_plain_outputs(res.get("outputs") or {})))
    return found


def _tag(run: _Run, stack: Any) -> None:
    """The team's stack tags plus Sortie's own, so its stacks are easy to find and to fence off."""
    tags = {"sortie:owner": "sortie", "sortie:kind": (run.request.program.kind if run.request.program else ""),
            **dict(run.settings.stack_tags)}
    from orchestrator.infra._lean_stack import file_backend_tags_path, write_file_backend_tags

    path = file_backend_tags_path(run.settings.backend_url, run.settings.project, run.request.stack)
    if path is not None:  # one file write, not one engine process per tag (issue 26)
        try:
            write_file_backend_tags(path, tags)
        except OSError as exc:
            run.on_output(f"[sortie] could not set stack tags: {exc}")
        return
    for key, value in tags.items():
        try:
            stack.workspace.set_tag(run.request.stack, key, value)
        except Exception as exc:  # a backend without tags: the stack still works
            run.on_output(f"[sortie] could not set stack tag {key}: {exc}")
            return


def _destroy_twice(run: _Run, stack: Any) -> None:
    """A failed `up`'s cleanup: a destroy whose wait for a deletion timed out (a slow Kubernetes control plane
    finalizing a Service or a Pod) is tried once more before the stack is left for `sortie stack destroy`."""
    try:
        run.retrying(lambda: stack.destroy(on_output=run.on_output, color="never"))
    except Exception as exc:
        run.on_output(f"[sortie] destroying what the failed up created failed ({exc}); trying once more")
        run.retrying(lambda: stack.destroy(on_output=run.on_output, color="never"))


def _do_up(run: _Run) -> UpResult:
    stack, _made = run.stack(create=True)
    _tag(run, stack)
    packs = list(run.settings.policy_packs)
    try:
        result = run.retrying(lambda: stack.up(on_output=run.on_output, color="never",
                                               **({"policy_packs": packs} if packs else {})))
    except Exception as exc:
        error = run.fail(exc)
        if run.request.cleanup_on_failure:
            run.on_output(f"[sortie] up failed ({error.message}); destroying what it created")
            try:
                _destroy_twice(run, stack)
                stack.workspace.remove_stack(run.request.stack)
                shutil.rmtree(run.work_dir, ignore_errors=True)
            except Exception as cleanup_exc:
                error.message += f"; cleanup failed too, run `sortie stack destroy {run.request.stack}`: " \
                                 f"{run.fail(cleanup_exc).message}"
                error.cleanup_failed = True
        raise error from None
    outputs = {k: v.value for k, v in result.outputs.items()}
    secret = frozenset(k for k, v in result.outputs.items() if v.secret)
    return UpResult(stack=run.request.stack, outputs=outputs, secret_keys=secret)


def _do_preview(run: _Run) -> Preview:
    from pulumi import automation as auto

    stack, made = run.stack(create=True)
    changes: dict[str, ResourceChange] = {}

    def on_event(event: auto.EngineEvent) -> None:
        pre = event.resource_pre_event
        if pre is None:
            return
        md = pre.metadata
        op = _OP_MAP.get(str(md.op.value if hasattr(md.op, "value") else md.op))
        if op is None or md.type == "pulumi:pulumi:Stack" or md.type.startswith("pulumi:providers:"):
            return
        keys = set(md.keys or ()) | set(md.diffs or ())
        if op in ("update", "replace"):
            keys |= _changed_inputs(md.old.inputs if md.old else {}, md.new.inputs if md.new else {})
        prior = changes.get(md.urn)
        if prior is not None:
            keys |= set(prior.keys)
            op = "replace" if "replace" in (op, prior.op) else op
        changes[md.urn] = ResourceChange(urn=md.urn, type=md.type, name=md.urn.rsplit("::", 1)[-1], op=op,
                                         keys=tuple(sorted(keys - {"__provider"})))

    try:
        packs = list(run.settings.policy_packs)
        stack.preview(on_output=run.on_output, on_event=on_event, color="never", diff=True,
                      **({"policy_packs": packs} if packs else {}))
    finally:
        if made:
            stack.workspace.remove_stack(run.request.stack)
            shutil.rmtree(run.work_dir, ignore_errors=True)
    return Preview(stack=run.request.stack, changes=tuple(changes.values()))


def _do_refresh(run: _Run) -> RefreshResult:
    """What the infra still has, from the refresh's own engine events (a resource it no longer has comes back as a
    delete): no export of the state before and after, which took a third of the time (issue 15)."""
    from pulumi import automation as auto

    stack, _made = run.stack(create=False)
    seen: dict[str, tuple[bool, Any]] = {}  # urn -> (gone, the step's state metadata)

    def on_event(event: auto.EngineEvent) -> None:
        step = event.res_outputs_event.metadata if event.res_outputs_event is not None else None
        if step is not None:
            gone = step.op == auto.OpType.DELETE
            seen[step.urn] = (gone, step.old if gone else (step.new or step.old))

    try:
        run.retrying(lambda: stack.refresh(on_output=run.on_output, on_event=on_event, color="never"))
    except auto.errors.StackNotFoundError:
        raise run.missing() from None
    alive: list[ResourceState] = []
    gone: list[ResourceState] = []
    for urn, (is_gone, state) in seen.items():
        if state is None or not state.custom or state.type.startswith("pulumi:providers:"):
            continue
        outputs = {k: v for k, v in _plain_outputs(state.outputs or {}).items() if v != "[secret]"}
        found = ResourceState(urn=urn, type=state.type, name=urn.rsplit("::", 1)[-1], id=state.id or "",
                              outputs=outputs)
        (gone if is_gone else alive).append(found)
    return RefreshResult(stack=run.request.stack, alive=tuple(alive), gone=tuple(gone))


def _do_destroy(run: _Run) -> None:
    """One engine process: `destroy --remove` (when asked to remove); a stack not there is already destroyed."""
    from pulumi import automation as auto

    stack, _made = run.stack(create=False)
    try:
        run.retrying(lambda: stack.destroy(on_output=run.on_output, color="never"))
    except auto.errors.StackNotFoundError:
        run.on_output(f"[sortie] stack {run.request.stack} does not exist; nothing to destroy")
        shutil.rmtree(run.work_dir, ignore_errors=True)
        return
    if run.request.remove:
        shutil.rmtree(run.work_dir, ignore_errors=True)


def _do_remove(run: _Run) -> None:
    from pulumi import automation as auto

    with contextlib.suppress(auto.errors.StackNotFoundError):
        run.workspace().remove_stack(run.request.stack)
    shutil.rmtree(run.work_dir, ignore_errors=True)


def _do_list(run: _Run) -> list[str]:
    return sorted(s.name for s in run.workspace().list_stacks())


def _lock_is_stale(path: Path) -> bool:
    """A lock is stale when the process that took it is gone (it ran on this host and is not alive)."""
    import json
    import socket

    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return True
    if content.get("hostname") not in (socket.gethostname(), None):
        return False  # another machine's lock: not ours to judge
    from orchestrator.infra.local_cloud import pid_alive

    return not pid_alive(int(content.get("pid") or 0))


def _locked_stacks(settings: DriverSettings, live_hosts: tuple[str, ...] = ()) -> list[str] | None:
    """Stacks with stale locks in a file backend or a PostgreSQL one (where another host's lock is stale only when
    no replica there holds a live lease); None for other backends."""
    from orchestrator.infra.local_cloud import pid_alive
    from orchestrator.infra.pulumi_pg import backend_locks, is_postgres, stale_locks

    if is_postgres(settings.backend_url):
        return stale_locks(backend_locks(settings.backend_url), set(live_hosts), pid_alive)
    if not settings.backend_url.startswith("file://"):
        return None
    lock_root = Path(settings.backend_url.removeprefix("file://")).expanduser() / ".pulumi" / "locks"
    if not lock_root.exists():
        return []
    stale: dict[str, bool] = {}
    for path in lock_root.rglob("*.json"):  # `cancel` removes every lock of a stack: all must be stale
        stale[path.parent.name] = stale.get(path.parent.name, True) and _lock_is_stale(path)
    return sorted(name for name, all_stale in stale.items() if all_stale)


def _do_unlock(run: _Run) -> list[str]:
    """Cancel locks left by operations that died. On a file backend only locks whose process is gone
    are touched, so an operation still running (say, one a killed controller left) keeps its lock."""
    from pulumi import automation as auto

    locked = _locked_stacks(run.settings, run.request.live_hosts)
    if locked is None:  # a service backend: its locks are not ours to judge from here
        run.on_output("[sortie] not a file or PostgreSQL backend: stale locks are left to `pulumi cancel`")
        return []
    candidates = sorted({s.name for s in run.workspace().list_stacks()} & set(locked))
    cancelled = []
    for name in candidates:
        stack = auto.select_stack(stack_name=name, project_name=run.settings.project, program=lambda: None,
                                  opts=run.options(None, Path(run.settings.stacks_dir) / name))
        try:
            stack.cancel()
            cancelled.append(name)
        except auto.errors.CommandError as exc:
            run.on_output(f"[sortie] cancel of {name}: {_summary(str(exc))}")
    return cancelled


_OPS: dict[str, Callable[[_Run], Any]] = {
    "up": _do_up, "preview": _do_preview, "refresh": _do_refresh, "destroy": _do_destroy,
    "remove": _do_remove, "list": _do_list, "unlock": _do_unlock,
}


@contextlib.contextmanager
def _stack_log(request: StackRequest) -> Iterator[IO[str]]:
    logs = Path(request.settings.logs_dir)
    logs.mkdir(parents=True, exist_ok=True)
    name = request.stack if request.stack else "_backend"
    with (logs / f"{name}.log").open("a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {request.op} {request.stack} ===\n")
        log.flush()
        yield log


def execute(request: StackRequest) -> Any:
    with _stack_log(request) as log:
        run = _Run(request, log)
        started = time.monotonic()
        try:
            return _OPS[request.op](run)
        except Exception as exc:
            error = run.fail(exc)
            log.write(f"[sortie] {request.op} failed: {error.message}\n")
            raise error from None
        finally:
            log.write(f"[sortie] {request.op} took {time.monotonic() - started:.2f}s\n")


def main() -> None:
    result_path = Path(sys.argv[1])
    request: StackRequest = pickle.load(sys.stdin.buffer)
    try:
        outcome: tuple[str, Any] = ("ok", execute(request))
    except StackOperationError as exc:
        outcome = ("error", exc)
    except Exception as exc:  # anything else still reaches the caller as one line
        outcome = ("error", StackOperationError(f"{request.op} of stack {request.stack} failed: "
                                                f"{type(exc).__name__}: {exc}", request.stack))
    result_path.write_bytes(pickle.dumps(outcome))


if __name__ == "__main__":
    main()
