"""Pydantic annotations that run the parsers of `values` and give each field the JSON Schema of what a user
may write (the parsed, stored form can differ: `cpus: 2` is stored as "2")."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationInfo, WithJsonSchema, WrapValidator
from pydantic_core import PydanticCustomError

from orchestrator.spec import values
from orchestrator.spec.values import Bad, kind, show

SPEC_ERROR = "sortie_spec"  # pydantic error type of our own messages; ctx["at"] extends the path
NULL_ENV_ERROR = "sortie_null_env"  # a null env/secret value; the message names the variable


def fail(message: str, at: str = "") -> PydanticCustomError:
    """A pydantic error carrying one of our plain-words messages."""
    return PydanticCustomError(SPEC_ERROR, "{message}", {"message": message, "at": at})


def parsed(parse: Callable[[Any], Any], *, nullable: bool = True) -> WrapValidator:
    """Validate with one of our parsers instead of pydantic's own type checks."""

    def validate(value: Any, _handler: Any) -> Any:
        if value is None and nullable:
            return None
        try:
            return parse(value)
        except Bad as exc:
            raise fail(exc.message, exc.at) from None

    return WrapValidator(validate)


def schema(definition: dict[str, Any], *, nullable: bool = True) -> WithJsonSchema:
    """The JSON Schema of what a user may write; null is allowed where the field is optional."""
    if not nullable:
        return WithJsonSchema(definition)
    options = definition["anyOf"] if set(definition) == {"anyOf"} else [definition]
    return WithJsonSchema({"anyOf": [*options, {"type": "null"}]})


NUMBER_OR_TEXT = {"anyOf": [{"type": "number"}, {"type": "string"}]}
INT_OR_TEXT = {"anyOf": [{"type": "integer"}, {"type": "string"}]}

Cpus = Annotated[str | None, parsed(values.parse_cpus), schema(NUMBER_OR_TEXT)]
Memory = Annotated[str | None, parsed(values.parse_memory), schema(NUMBER_OR_TEXT)]
DiskSize = Annotated[int | None, parsed(values.parse_disk_size), schema(INT_OR_TEXT)]
CloudName = Annotated[
    str | None, parsed(values.parse_cloud), schema({"type": "string", "examples": list(values.KNOWN_CLOUDS)})
]


Infra = Annotated[
    str | None,
    parsed(values.normalize_infra),
    schema({"type": "string", "examples": ["local/region-a", "aws", "aws/us-east-1", "gcp/us-central1/us-central1-a",
                                           "k8s/my-context", "*/us-east-1"]}),
]

_ONE_ACCELERATOR_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "examples": ["H100:8", "V100", "T4:0.5"]},
        {"type": "object", "maxProperties": 1, "minProperties": 1, "additionalProperties": {"type": "number"}},
    ]
}
_SEVERAL_ACCELERATORS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "examples": ["H100:8", "V100", "T4:0.5"]},
        {"type": "object", "minProperties": 1,
         "additionalProperties": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
        {"type": "array", "minItems": 1, "items": _ONE_ACCELERATOR_SCHEMA},
    ]
}
OneAccelerator = Annotated[
    dict[str, float] | None,
    parsed(lambda v: values.parse_accelerators(v, several=False)),
    schema(_ONE_ACCELERATOR_SCHEMA),
]
Accelerators = Annotated[
    dict[str, float] | list[dict[str, float]] | None,
    parsed(lambda v: values.parse_accelerators(v, several=True)),
    schema(_SEVERAL_ACCELERATORS_SCHEMA),
]
Ports = Annotated[
    list[str] | None,
    parsed(values.parse_ports),
    schema({"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "array", "items": INT_OR_TEXT}]}),
]
DiskTier = Annotated[
    str | None,
    parsed(lambda v: values.parse_choice(v, values.DISK_TIERS, "disk tier")),
    schema({"type": "string", "enum": list(values.DISK_TIERS)}),
]
NetworkTier = Annotated[
    str | None,
    parsed(lambda v: values.parse_choice(v, values.NETWORK_TIERS, "network tier")),
    schema({"type": "string", "enum": list(values.NETWORK_TIERS)}),
]
Strategy = Annotated[
    str | None,
    parsed(values.parse_strategy),
    schema({"type": "string", "examples": list(values.RECOVERY_STRATEGIES)}),
]
_EXIT_CODE = {"type": "integer", "minimum": 0, "maximum": 255}
ExitCodes = Annotated[
    list[int],
    parsed(values.parse_exit_codes, nullable=False),
    schema({"anyOf": [_EXIT_CODE, {"type": "array", "uniqueItems": True, "items": _EXIT_CODE}]}, nullable=False),
]
Name = Annotated[str | None, parsed(values.parse_name), schema({"type": "string", "pattern": values.NAME_PATTERN})]
Duration = Annotated[
    float | None,
    parsed(values.parse_duration),
    schema({"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                      {"type": "string", "examples": ["90s", "30m", "2h"]}]}),
]


def _autostop(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise Bad(f"must be true/false, a number of minutes (0 or more), or a mapping, not {value}")
    if isinstance(value, (bool, int, str, dict)):
        return value
    raise Bad(f"must be true/false, minutes, or a mapping, not {kind(value)}")


Autostop = Annotated[
    bool | int | str | dict[str, Any] | None,
    parsed(_autostop),
    schema({"anyOf": [{"type": "boolean"}, {"type": "integer"}, {"type": "string"}, {"type": "object"}]}),
]


def _image_id(value: Any) -> str | dict[str, str]:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return {k.strip(): v.strip() for k, v in value.items()}
    raise Bad(f"must be an image ID, or a mapping region: image ID, not {show(value)}")


ImageId = Annotated[
    str | dict[str, str] | None,
    parsed(_image_id),
    schema({"anyOf": [{"type": "string"}, {"type": "object", "additionalProperties": {"type": "string"}}]}),
]


# ---- environment variables --------------------------------------------------------------------------------


def _env_key(value: Any) -> str:
    if not isinstance(value, str) or not values.is_valid_env_name(value):
        raise Bad("not a variable name (letters, digits and _, not starting with a digit)")
    return value


def _env_value(value: Any, _handler: Any) -> str:
    if value is None:
        raise PydanticCustomError(NULL_ENV_ERROR, "no value")
    if isinstance(value, (bool, int, float)):  # SkyPilot turns YAML scalars into text the same way (str())
        return str(value)
    if isinstance(value, (datetime.date, datetime.datetime)):  # YAML reads 2024-01-01 as a date
        return str(value)
    if not isinstance(value, str):
        raise fail(f"must be text (or a number, or true/false), not {kind(value)}")
    check_text(value, values.MAX_ENV_VALUE_BYTES, "a value")
    return value


def check_text(value: str, limit: int, what: str) -> None:
    """Refuse text with a NUL byte (no process can be given it) or longer than `limit` UTF-8 bytes."""
    if "\0" in value:
        raise fail(f"{what} cannot hold a NUL byte (\\0)")
    if len(value) > limit or len(value.encode(errors="surrogatepass")) > limit:
        raise fail(f"{what} is at most {limit:,} bytes, not {len(value.encode(errors='surrogatepass')):,}")


def _env_map(value: Any) -> Any:
    value = _stringify_keys(value)
    if isinstance(value, dict) and len(value) > values.MAX_ENV_COUNT:
        raise fail(f"at most {values.MAX_ENV_COUNT} variables, not {len(value)}")
    return value


def _command(value: Any, _handler: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise fail(f"must be text, not {show(value)}")
    check_text(value, values.MAX_COMMAND_BYTES, "a command")
    return value


Command = Annotated[str | None, WrapValidator(_command), schema({"type": "string"})]


def _stringify_keys(value: Any) -> Any:
    """YAML may give number keys (`1: x`); SkyPilot compares their text form with the name rule."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): v for k, v in value.items()}
    return value


EnvName = Annotated[str, parsed(_env_key, nullable=False)]
EnvValue = Annotated[str, WrapValidator(_env_value)]
EnvMap = Annotated[
    dict[EnvName, EnvValue],
    BeforeValidator(_env_map),
    WithJsonSchema({"type": "object", "propertyNames": {"pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
            "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"},
                                               {"type": "null"}]}}),
]


# ---- local paths ------------------------------------------------------------------------------------------


def resolve_local(text: str, info: ValidationInfo) -> str:
    """Expand `~` and make a relative path absolute against the load's base directory (SkyPilot: the current
    working directory). Without a load context (re-validating a stored task) the path is kept as is."""
    context = info.context if isinstance(info.context, dict) else {}
    base = context.get("base_dir")
    if base is None:
        return text
    expanded = os.path.expanduser(text)
    return os.path.normpath(os.path.join(os.fspath(base), expanded))


def _resolved_note(given: str, path: str) -> str:
    return "" if given == path else f" ({path})"


def checks_paths(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and bool(info.context.get("check_paths"))


def _git_workdir(value: dict[Any, Any], info: ValidationInfo) -> dict[str, str]:
    """SkyPilot's `workdir: {url, ref}`: a git repository the node clones at `ref` (a branch, tag or commit).
    A local repository path is made absolute; credentials never go in the URL (they would show in the job)."""
    unknown = [str(k) for k in value if k not in ("url", "ref")]
    if unknown:
        raise fail(f"unknown key {unknown[0]}; a git workdir has url and ref", f".{unknown[0]}")
    url, ref = value.get("url"), value.get("ref")
    if not isinstance(url, str) or not url.strip():
        raise fail("a git workdir needs url: the repository to clone", ".url")
    if ref is not None and (not isinstance(ref, str) or not ref.strip() or ref.startswith("-")
                            or any(c.isspace() for c in ref)):
        raise fail(f"must be a branch, tag or commit, not {show(ref)}", ".ref")
    url = url.strip()
    if "://" in url:
        if "@" in url.split("://", 1)[1].split("/", 1)[0]:
            raise fail("put no credentials in the URL (they would be shown); give the token as a secret", ".url")
    elif not url.startswith("git@") and not url.startswith("-"):
        url = resolve_local(url, info)
        if checks_paths(info) and not Path(url).exists():
            raise fail(f"{show(value.get('url'))} is neither a URL nor an existing repository path", ".url")
    else:
        if url.startswith("-"):
            raise fail(f"{show(url)} is not a repository URL", ".url")
    return {"url": url, **({"ref": ref.strip()} if ref else {})}


def workdir_value(value: Any, _handler: Any, info: ValidationInfo) -> str | dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return _git_workdir(value, info)
    if not isinstance(value, str) or not value.strip():
        raise fail(f"must be a local directory, not {kind(value) if not isinstance(value, str) else show(value)}")
    path = resolve_local(value, info)
    if checks_paths(info) and not Path(path).is_dir():
        raise fail(f"{show(value)} is not a directory{_resolved_note(value, path)}")
    return path


def mount_destination(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Bad(f"a mount destination is a path on the node, not {show(value)}")
    if "://" in value:
        raise Bad("a mount destination is a path on the node, not a bucket URL")
    if value.endswith("/") and value != "/":
        raise Bad("remove the trailing slash from the destination")
    if "\0" in value:
        raise Bad("a mount destination cannot hold a NUL byte")
    if ".." in value.split("/"):
        raise Bad(f"a mount destination cannot go up with '..' ({show(value)}); name a path inside the node's "
                  "workdir, home (~/...) or an absolute path")
    if value.startswith("~") and value != "~" and not value.startswith("~/"):
        raise Bad(f"~user paths are not supported ({show(value)}); use ~/... or an absolute path")
    if len(value) > values.MAX_PATH_LENGTH:
        raise Bad(f"a mount destination is at most {values.MAX_PATH_LENGTH} characters")
    return value


def storage_destination(value: Any) -> str:
    """A bucket mount's destination: an absolute path, or one under the node's home (`~/...`)."""
    value = mount_destination(value)
    if not (value.startswith("/") or value == "~" or value.startswith("~/")):
        raise Bad(f"a bucket mount path must be absolute (/{value.lstrip('./')}) or under ~/, not {show(value)}")
    return value


def storage_local_source(value: str, info: ValidationInfo) -> str:
    """A storage object's local `source`, resolved like other local paths and checked when paths are."""
    if value.endswith("/") and value != "/":
        raise fail(f"remove the trailing slash from {show(value)}")
    path = resolve_local(value, info)
    if checks_paths(info) and not Path(path).exists():
        raise fail(f"local path {show(value)} does not exist{_resolved_note(value, path)}", ".source")
    return path


def local_source(value: Any, _handler: Any, info: ValidationInfo) -> str:
    if not isinstance(value, str) or not value.strip():
        raise fail(f"must be a local path, a bucket URL or a storage mapping, not {show(value)}")
    check_text(value, values.MAX_PATH_LENGTH, "a local path")
    if value.endswith("/") and value != "/":
        raise fail(f"remove the trailing slash from {show(value)}")
    path = resolve_local(value, info)
    if checks_paths(info) and not Path(path).exists():
        raise fail(f"local path {show(value)} does not exist{_resolved_note(value, path)}")
    return path


MountDestination = Annotated[str, parsed(mount_destination, nullable=False)]
StorageDestination = Annotated[str, parsed(storage_destination, nullable=False)]
LocalSource = Annotated[str, WrapValidator(local_source)]
Workdir = Annotated[
    str | dict[str, str] | None,
    WrapValidator(workdir_value),
    schema({"anyOf": [{"type": "string"}, {"type": "object", "properties": {
        "url": {"type": "string", "description": "The git repository every node clones (URL or local path)."},
        "ref": {"type": "string", "description": "Branch, tag or commit (default: the default branch)."}},
        "required": ["url"], "additionalProperties": False}]}),
]
