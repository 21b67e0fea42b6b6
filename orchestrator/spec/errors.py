"""SpecError, and the turning of pydantic's ValidationError into one plain line per problem, each naming the
YAML path (`resources.job_recovery.max_restarts_on_errors: must be >= 0`)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.errors import UsageError
from orchestrator.spec.fields import NULL_ENV_ERROR, SPEC_ERROR
from orchestrator.spec.values import kind, show


class SpecError(UsageError):
    """A task YAML (or a command-line override) breaks one or more rules; one line per problem."""

    def __init__(self, problems: Sequence[str] | str) -> None:
        # A plain string comes back when the error is unpickled in another process.
        if isinstance(problems, str):
            lines = problems.split("\n")
        else:  # one line each, whatever a value in a message held
            lines = [str(p).replace("\r", "\\r").replace("\n", "\\n") for p in problems]
        self.problems: list[str] = lines or ["invalid task"]
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


# SkyPilot fields that Sortie does not take, with what to say about them.
_TASK_NOT_SUPPORTED = {
    "pool": "a pool section here is not supported yet; create the pool with `sortie jobs pool apply`",
    "volumes": "volumes are not supported yet",
    "volume_mounts": "volumes are not supported yet",
    "event_callback": "event callbacks are not supported yet",
    "managed_secrets": "managed secrets are not supported yet; use secrets: {NAME: value}",
    "storage_mounts": "not a task field; buckets go under file_mounts",
}
_RESOURCES_NOT_SUPPORTED = {
    "priority": "job priorities are not supported yet",
    "priority_class": "priority classes are not supported yet",
    "volumes": "volumes are not supported yet",
    "max_hourly_cost": "max_hourly_cost is not supported yet",
    "local_disk": "local_disk is not supported yet",
    "ephemeral_storage": "ephemeral_storage is deprecated in SkyPilot; use disk_size",
}
_OPTION_NOT_SUPPORTED = {
    **_RESOURCES_NOT_SUPPORTED,
    "any_of": "any_of and ordered cannot be nested",
    "ordered": "any_of and ordered cannot be nested",
}


def _segment(part: Any) -> str:
    if isinstance(part, int) and not isinstance(part, bool):
        return f"[{part}]"
    text = str(part)
    safe = show(text)[1:-1] if any(not c.isprintable() for c in text) else text
    return "." + safe


def format_path(loc: Iterable[Any]) -> str:
    return "".join(_segment(p) for p in loc).lstrip(".")


def _known_fields(parent: list[Any]) -> tuple[list[str], dict[str, str]]:
    """The field names allowed under a path, and the SkyPilot fields to explain there."""
    from orchestrator.spec.resources import AcceleratorArgs, JobRecovery, ResourceOption, Resources
    from orchestrator.spec.task import StorageSpec, yaml_task_fields

    names = [p for p in parent if not isinstance(p, int)]
    model: type[BaseModel] | None = None
    extra: dict[str, str] = {}
    aliases: list[str] = []
    if not names:
        return yaml_task_fields(), _TASK_NOT_SUPPORTED
    if names == ["resources"]:
        model, extra, aliases = Resources, _RESOURCES_NOT_SUPPORTED, ["gpus"]
    elif len(names) == 2 and names[0] == "resources" and names[1] in ("any_of", "ordered"):
        model, extra, aliases = ResourceOption, _OPTION_NOT_SUPPORTED, ["gpus"]
    elif names[-1] == "job_recovery":
        model = JobRecovery
    elif names[-1] == "accelerator_args":
        model = AcceleratorArgs
    elif len(names) == 2 and names[0] == "file_mounts":
        model = StorageSpec
    return (sorted([*model.model_fields, *aliases]) if model else []), extra


def _unknown_field(loc: list[Any]) -> str:
    key = loc[-1]
    known, explained = _known_fields(loc[:-1])
    if isinstance(key, str) and key in explained:
        return explained[key]
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6) if known else []
    if close:
        return f"unknown field; did you mean {close[0]}?"
    return f"unknown field (fields here: {', '.join(known)})" if known else "unknown field"


def _describe(value: Any) -> str:
    return show(value) if value is None or isinstance(value, (str, int, float, bool)) else kind(value)


def _message(error: dict[str, Any], loc: list[Any]) -> str:
    kind_ = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind_ == SPEC_ERROR:
        return str(ctx.get("message", error["msg"]))
    if kind_ == NULL_ENV_ERROR:
        flag = "--secret" if loc and loc[0] == "secrets" else "--env"
        name = format_path(loc[-1:]).lstrip(".") if loc else "NAME"
        return f"no value; pass {flag} {name}=... or set it in the YAML"
    if kind_ == "extra_forbidden":
        return _unknown_field(loc)
    simple = {
        "missing": "required",
        "string_type": f"must be text, not {_describe(value)}",
        "int_type": f"must be a whole number, not {_describe(value)}",
        "int_from_float": f"must be a whole number, not {_describe(value)}",
        "bool_type": f"must be true or false, not {_describe(value)}",
        "float_type": f"must be a number, not {_describe(value)}",
        "dict_type": f"must be a mapping (key: value), not {kind(value)}",
        "model_type": f"must be a mapping of fields (key: value), not {kind(value)}",
        "model_attributes_type": f"must be a mapping of fields (key: value), not {kind(value)}",
        "list_type": f"must be a list, not {kind(value)}",
        "too_short": "must not be empty",
        "recursion_loop": "refers to itself (a YAML alias loop)",
    }
    if kind_ in simple:
        return simple[kind_]
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind_ in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"must be {bounds[kind_]} {limit}"
    return show(str(error["msg"]))[1:-1]


def problems_from(error: ValidationError, prefix: str = "") -> list[str]:
    """One line per pydantic error: `<prefix><path>: <message>`; duplicates dropped, order kept."""
    lines: list[str] = []
    for item in error.errors(include_url=False):
        loc = list(item["loc"])
        if item["type"] != "extra_forbidden":  # pydantic marks a bad key "[key]"; a field may be named so
            loc = [p for p in loc if p != "[key]"]
        if loc and loc[0] == "storage_mounts":  # users write buckets under file_mounts
            loc[0] = "file_mounts"
        message = _message(dict(item), loc)
        at = (item.get("ctx") or {}).get("at", "") if item["type"] == SPEC_ERROR else ""
        path = (format_path(loc) + str(at)).lstrip(".")
        where = f"{prefix}.{path}" if prefix and path else (prefix or path)
        lines.append(f"{where}: {message}" if where else message)
    return list(dict.fromkeys(lines))
