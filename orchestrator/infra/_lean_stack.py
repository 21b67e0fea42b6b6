"""Infra, the Automation API's stack with fewer engine processes per operation (issue 26).

The SDK's `Stack` starts a `pulumi` process for every question it asks on the way: `pulumi version` when a
workspace is made, `stack select` (and `stack init`) before any operation, `stack output` twice and
`stack history` after an `up`, `stack history` and `stack rm` after a `destroy`. Each costs a process start and a
backend read (0.15-0.4 CPU s on the machines measured; nine of them per `up`). `LeanStack` asks only what Sortie
needs:

- the engine's version is the one `require_engine()` checked, so no `pulumi version` (`LeanCommand`);
- every command names its stack (`--stack`), so no `stack select`: a stack that is not there fails the operation
  itself with the SDK's `StackNotFoundError`; `up` runs `stack init` first and takes "already exists" as the
  answer for a stack that is there;
- no `stack history` (Sortie reads no summary); an `up`'s outputs come from one `stack export` (secret values
  marked in place) instead of two `stack output` calls;
- `destroy` removes the stack in the same process (`pulumi destroy --remove`).

Stack tags on a file backend are written where the engine keeps them (`<stack>.pulumi-tags` beside the stack's
state, the engine's own format), not one `stack tag set` process per tag; other backends keep the CLI.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from pulumi import automation as auto
from pulumi.automation._cmd import PulumiCommand
from pulumi.automation._stack import StackInitMode
from semver import VersionInfo

SECRET_SIG = "4dabf18193072939515e22adb298388d"  # Pulumi's marker of a secret value in state
TAGS_VERSION = 1  # the engine's stack tags file format (pkg/backend/diy/stack_tags.go)


class LeanCommand(PulumiCommand):
    """The pinned engine, without asking it its version again."""

    def __init__(self, root: str, version: str) -> None:  # no super(): it runs `pulumi version`
        self.command = os.path.join(root, "bin", "pulumi")
        self.version = VersionInfo.parse(version)


class LeanStack(auto.Stack):
    """A stack of a `LocalWorkspace` that runs only the engine commands Sortie needs (see the module's doc)."""

    def __init__(self, name: str, workspace: auto.LocalWorkspace, *, remove_on_destroy: bool = False) -> None:
        # No super(): its constructor runs `stack select`; every command here names the stack anyway.
        self.name = name
        self.workspace = workspace
        self._mode = StackInitMode.SELECT
        self.remove_on_destroy = remove_on_destroy

    def _run_pulumi_cmd_sync(self, args: list[str], on_output: Any = None, on_error: Any = None) -> Any:
        if args and args[0] == "destroy" and self.remove_on_destroy:
            args = [*args, "--remove"]
        return super()._run_pulumi_cmd_sync(args, on_output, on_error)

    def info(self, show_secrets: bool = True) -> auto.UpdateSummary:
        """No `stack history`: Sortie reads no summary of an operation."""
        return _NO_SUMMARY

    def outputs(self) -> auto.OutputMap:
        """The stack's outputs from one `stack export`, secret ones marked as the SDK marks them."""
        deployment = self.workspace.export_stack(self.name).deployment or {}
        for res in deployment.get("resources") or []:
            if res.get("type") == "pulumi:pulumi:Stack":
                return {k: _output_value(v) for k, v in (res.get("outputs") or {}).items()}
        return {}


def _output_value(value: Any) -> auto.OutputValue:
    if isinstance(value, Mapping) and SECRET_SIG in value:
        plain = value.get("plaintext")
        return auto.OutputValue(value=json.loads(plain) if isinstance(plain, str) else None, secret=True)
    return auto.OutputValue(value=value, secret=False)


_NO_SUMMARY = auto.UpdateSummary(kind="", start_time=datetime.min, message="", environment={}, config={}, result="",
                                 end_time=None, version=None, deployment=None, resource_changes=None)


def create_or_find(name: str, workspace: auto.LocalWorkspace) -> tuple[LeanStack, bool]:
    """The stack, made with one `stack init` when it is new; (stack, whether it was made now)."""
    try:
        workspace.create_stack(name)
    except auto.errors.StackAlreadyExistsError:
        return LeanStack(name, workspace), False
    return LeanStack(name, workspace), True


def file_backend_tags_path(backend_url: str, project: str, stack: str) -> Path | None:
    """Where a file backend keeps a stack's tags, when the stack's state is where the engine puts it; else None."""
    if not backend_url.startswith("file://"):
        return None
    base = Path(backend_url.removeprefix("file://")).expanduser() / ".pulumi" / "stacks" / project / stack
    if not any(base.with_name(stack + ext).exists() for ext in (".json", ".json.gz")):
        return None
    return base.with_name(stack + ".pulumi-tags")


def write_file_backend_tags(path: Path, tags: Mapping[str, str]) -> None:
    """Merge `tags` into the stack's tags file, atomically (the engine reads it whole)."""
    try:
        current = json.loads(path.read_text()).get("tags") or {}
    except (OSError, ValueError):
        current = {}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": TAGS_VERSION, "tags": {**current, **tags}}))
    os.replace(tmp, path)
