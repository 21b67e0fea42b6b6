"""Command-line overrides of `jobs launch` (SkyPilot's --name, --env, --env-file, --secret, --infra, --cpus,
--memory, --gpus, --num-nodes, --use-spot, --workdir), checked once and applied to each task's raw document.

Resource overrides apply to every candidate, as SkyPilot's `set_resources_override` does: the value is set on
the resources section and removed from each any_of/ordered entry. Applying them to the raw document (before
validation) means a YAML value that an override replaces is not checked.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.spec import values
from orchestrator.spec.values import Bad, show

UNSET: Any = object()  # an override not given (None means "given as none": clear the field)


@dataclass(frozen=True)
class Overrides:
    """SkyPilot's `jobs launch` command-line overrides; every field optional."""

    name: str | None = None
    envs: tuple[tuple[str, str | None], ...] = ()  # --env K=V; value None: --env K, taken from os.environ
    env_file: str | None = None  # --env-file (dotenv format: K=V lines, # comments)
    secrets: tuple[tuple[str, str | None], ...] = ()  # --secret K=V / --secret K (from os.environ)
    infra: str | None = None
    cpus: str | None = None
    memory: str | None = None
    gpus: str | None = None  # like "H100:8" or "H100"
    num_nodes: int | None = None
    use_spot: bool | None = None
    workdir: str | None = None


@dataclass
class ResolvedOverrides:
    """Overrides checked and normalized; UNSET where not given."""

    name: str | None = None
    envs: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    infra: Any = UNSET
    cpus: Any = UNSET
    memory: Any = UNSET
    gpus: Any = UNSET
    num_nodes: int | None = None
    use_spot: bool | None = None
    workdir: str | None = None
    problems: list[str] = field(default_factory=list)


_DOTENV_LINE = re.compile(r"^\s*(?:export\s+)?([^=\s]+)\s*=\s*(.*?)\s*$")


def parse_env_file(text: str, label: str) -> tuple[dict[str, str], list[str]]:
    """Dotenv format: `KEY=value` lines, blank lines and `#` comments, optional `export `, quoted values."""
    found: dict[str, str] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _DOTENV_LINE.match(line)
        if not match:
            problems.append(f"--env-file: {label} line {number}: expected KEY=VALUE")
            continue
        key, raw = match.group(1), match.group(2)
        if not values.is_valid_env_name(key):
            problems.append(f"--env-file: {label} line {number}: {show(key)} is not a variable name")
            continue
        found[key] = _dotenv_value(raw)
    return found, problems


def _dotenv_value(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        inner = raw[1:-1]
        if raw[0] == '"':
            inner = inner.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        return inner
    comment = re.search(r"\s+#", raw)  # an unquoted value ends at " #"
    return raw[: comment.start()] if comment else raw


def _pairs(pairs: tuple[tuple[str, str | None], ...], flag: str, problems: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in pairs:
        if not isinstance(key, str) or not values.is_valid_env_name(key):
            problems.append(f"{flag} {key}: not a variable name (letters, digits and _, not starting with a digit)")
            continue
        if value is None:
            value = os.environ.get(key)
            if value is None:
                problems.append(f"{flag} {key}: {key} is not set in your environment; pass {flag} {key}=VALUE")
                continue
        found[key] = value
    return found


def _optional(value: str, flag: str, parse: Any, problems: list[str]) -> Any:
    """A resource override; `none` clears the field (SkyPilot's CLI rule)."""
    if value.strip().lower() == "none":
        return None
    try:
        return parse(value)
    except Bad as exc:
        problems.append(f"{flag}: {exc.message}")
        return UNSET


def resolve(overrides: Overrides, base_dir: Path) -> ResolvedOverrides:
    """Check every override once; the problems name the flag (`--cpus: "four" is not a number ...`)."""
    out = ResolvedOverrides()
    problems = out.problems
    if overrides.name is not None:
        try:
            out.name = values.parse_name(overrides.name)
        except Bad as exc:
            problems.append(f"--name: {exc.message}")
    if overrides.env_file is not None:
        path = Path(os.path.expanduser(overrides.env_file))
        path = path if path.is_absolute() else base_dir / path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            problems.append(f"--env-file: {overrides.env_file}: no such file")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"--env-file: {overrides.env_file}: cannot read it ({exc.__class__.__name__})")
        else:
            found, file_problems = parse_env_file(text, overrides.env_file)
            out.envs.update(found)
            problems.extend(file_problems)
    out.envs.update(_pairs(overrides.envs, "--env", problems))
    out.secrets.update(_pairs(overrides.secrets, "--secret", problems))
    if overrides.infra is not None:
        out.infra = _optional(overrides.infra, "--infra", values.normalize_infra, problems)
    if overrides.cpus is not None:
        out.cpus = _optional(overrides.cpus, "--cpus", values.parse_cpus, problems)
    if overrides.memory is not None:
        out.memory = _optional(overrides.memory, "--memory", values.parse_memory, problems)
    if overrides.gpus is not None:
        def gpus(text: str) -> dict[str, float]:
            name, count = values.parse_accelerator_text(text)
            return {name: count}

        out.gpus = _optional(overrides.gpus, "--gpus", gpus, problems)
    if overrides.num_nodes is not None:
        if isinstance(overrides.num_nodes, bool) or not isinstance(overrides.num_nodes, int):
            problems.append(f"--num-nodes: must be a whole number, not {show(overrides.num_nodes)}")
        elif overrides.num_nodes < 1:
            problems.append("--num-nodes: must be >= 1")
        else:
            out.num_nodes = overrides.num_nodes
    out.use_spot = overrides.use_spot
    if overrides.workdir is not None:
        path = Path(os.path.expanduser(overrides.workdir))
        path = path if path.is_absolute() else base_dir / path
        if not path.is_dir():
            problems.append(f"--workdir: {show(overrides.workdir)} is not a directory ({path})")
        else:
            out.workdir = os.path.normpath(path)
    return out


def _strip_options(resources: dict[str, Any], keys: tuple[str, ...]) -> None:
    for section in ("any_of", "ordered"):
        options = resources.get(section)
        if isinstance(options, list):
            resources[section] = [
                {k: v for k, v in option.items() if k not in keys} if isinstance(option, dict) else option
                for option in options
            ]


def _set_resource(resources: dict[str, Any], key: str, value: Any, also: tuple[str, ...] = ()) -> None:
    for other in (key, *also):
        resources.pop(other, None)
    if value is not None:
        resources[key] = value
    _strip_options(resources, (key, *also))


def apply(document: dict[str, Any], resolved: ResolvedOverrides) -> dict[str, Any]:
    """The document with the overrides in (the document's own aliases already renamed)."""
    doc = dict(document)
    for key, extra in (("envs", resolved.envs), ("secrets", resolved.secrets)):
        if extra:
            current = doc.get(key)
            if current is None:
                current = {}
            if isinstance(current, dict):
                doc[key] = {**current, **extra}
    if resolved.num_nodes is not None:
        doc["num_nodes"] = resolved.num_nodes
    if resolved.workdir is not None:
        doc["workdir"] = resolved.workdir
    changes = [(k, getattr(resolved, k)) for k in ("infra", "cpus", "memory", "gpus")]
    changes = [(k, v) for k, v in changes if v is not UNSET]
    if resolved.use_spot is not None:
        changes.append(("use_spot", resolved.use_spot))
    resources = doc.get("resources")
    if changes and (resources is None or isinstance(resources, dict)):
        resources = dict(resources or {})
        for key, value in changes:
            if key == "infra":
                _set_resource(resources, "infra", value, also=("cloud", "region", "zone"))
            elif key == "gpus":
                _set_resource(resources, "accelerators", value)
            else:
                _set_resource(resources, key, value)
        doc["resources"] = resources
    return doc
