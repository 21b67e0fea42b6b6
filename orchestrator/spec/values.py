"""Parsers for the scalar forms SkyPilot accepts in a task YAML: infra strings, cpus and memory, sizes,
accelerators, ports, recovery strategies, names.

Every parser takes what YAML produced and returns the normalized value, or raises `Bad` with one
plain-words line (no path: the caller knows where the value sits). `Bad.at` names a position inside
the value (like `[1]` for the second item of a list) that the caller appends to the path.
"""

from __future__ import annotations

import datetime
import difflib
import math
import re
import reprlib
from dataclasses import dataclass
from typing import Any

# Clouds SkyPilot knows (its `infra`/`cloud` values); Sortie adds its embedded `local` cloud.
SKYPILOT_CLOUDS: tuple[str, ...] = (
    "aws", "azure", "gcp", "ibm", "lambda", "scp", "oci", "kubernetes", "runpod", "vast", "vsphere", "cudo",
    "fluidstack", "paperspace", "do", "nebius", "ssh", "hyperbolic", "seeweb", "shadeform", "primeintellect",
    "slurm",
)
# Clouds Sortie can launch on. Others parse (so SkyPilot YAMLs load) but show up in `unsupported_features()`.
SORTIE_CLOUDS: tuple[str, ...] = ("local", "aws", "gcp", "azure", "kubernetes")
KNOWN_CLOUDS: tuple[str, ...] = tuple(sorted(set(SKYPILOT_CLOUDS) | set(SORTIE_CLOUDS)))
_CLOUD_ALIASES = {"k8s": "kubernetes"}

RECOVERY_STRATEGIES: tuple[str, ...] = ("FAILOVER", "EAGER_NEXT_REGION")
DISK_TIERS: tuple[str, ...] = ("low", "medium", "high", "ultra", "best")
NETWORK_TIERS: tuple[str, ...] = ("standard", "best")
STORE_TYPES: tuple[str, ...] = ("local", "s3", "gcs", "azure", "r2", "ibm", "oci", "nebius", "coreweave", "hf")
STORAGE_MODES: tuple[str, ...] = ("MOUNT", "COPY", "MOUNT_CACHED")
SORTIE_STORES: tuple[str, ...] = ("local", "s3")  # the STORE_TYPES Sortie can use today

# Accelerator names whose spelling is canonicalized case-insensitively (SkyPilot does this from its catalog;
# Sortie has no catalog, so it knows the common ones and keeps any other name as written).
_CANONICAL_ACCELERATORS = (
    "A10", "A10G", "A100", "A100-80GB", "A100-40GB", "A40", "A6000", "B100", "B200", "GB200", "H100", "H100-MEGA",
    "H100-SXM", "H200", "K80", "L4", "L40", "L40S", "M60", "P100", "P4", "P40", "RTX4090", "RTX6000", "T4", "T4g",
    "V100", "V100-32GB", "MI100", "MI210", "MI250", "MI300X", "MI325X", "Gaudi", "Gaudi2", "Inferentia", "Inferentia2",
    "Trainium", "Trainium2",
)
_ACCELERATOR_BY_LOWER = {name.lower(): name for name in _CANONICAL_ACCELERATORS}

# Sizes: GiB per unit (SkyPilot's units, all powers of 1024).
_GIB_PER_UNIT = {
    "b": 2.0**-30, "k": 2.0**-20, "kb": 2.0**-20, "m": 2.0**-10, "mb": 2.0**-10, "g": 1.0, "gb": 1.0,
    "t": 2.0**10, "tb": 2.0**10, "p": 2.0**20, "pb": 2.0**20,
}
_MEMORY_SPEC = re.compile(r"^[0-9]+[GgMmTt][Bb]\+?$")  # SkyPilot's "24GB+" accelerator-by-memory form
# Bounds on what a task YAML may hold (each refused with the field named; see README "Limits").
MAX_SPEC_BYTES = 2 * 1024 * 1024  # a whole task YAML (every document)
MAX_NAME_LENGTH = 255  # task and pipeline names (the state's column)
MAX_COMMAND_BYTES = 100_000  # setup and run: each is one argument of `bash -c` (Linux: under 128 KiB)
MAX_ENV_VALUE_BYTES = 100_000  # one env or secret value (an environment string is under 128 KiB on Linux)
MAX_ENV_COUNT = 1000  # envs, and secrets, each
MAX_PATH_LENGTH = 4096  # a mount destination or local source (PATH_MAX)
MAX_FILE_MOUNTS = 1000  # file_mounts entries of one task
MAX_PIPELINE_TASKS = 100  # tasks of one pipeline
MAX_NUM_NODES = 10_000  # num_nodes, before the configured maximum and the infra's capacity are checked
MAX_ALTERNATIVES = 100  # any_of / ordered entries
MAX_LABELS = 64  # resources.labels (issue 28: 50,000 were accepted; GCP takes 64 labels, AWS and Azure 50 tags)
MAX_LABEL_KEY = 128  # characters of a label key (AWS's bound for a tag key)
MAX_LABEL_VALUE = 256  # characters of a label value (AWS's bound for a tag value)
NAME_PATTERN = r"^[a-zA-Z0-9]+(?:[._-]{1,2}[a-zA-Z0-9]+)*$"
_NAME = re.compile(NAME_PATTERN)
_ENV_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlist = _repr.maxdict = _repr.maxset = _repr.maxtuple = 4
_repr.maxlevel = 2


class Bad(ValueError):
    """A value that breaks a rule: `message` says which, in plain words; `at` is a sub-path like `[1]`."""

    def __init__(self, message: str, at: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.at = at


def show(value: Any) -> str:
    """A short, single-line rendering of a YAML value for messages: strings in double quotes."""
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + "".join(_escape_char(c) for c in escaped) + '"'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    try:
        text = _repr.repr(value)
    except Exception:  # a hostile __repr__ is impossible from YAML, but never let a message crash
        text = f"<{type(value).__name__}>"
    return "".join(_escape_char(c) for c in text)


def _escape_char(char: str) -> str:
    if char == "\n":
        return "\\n"
    if char == "\r":
        return "\\r"
    if char == "\t":
        return "\\t"
    if not char.isprintable():
        return f"\\x{ord(char):02x}" if ord(char) < 256 else f"\\u{ord(char):04x}"
    return char


def kind(value: Any) -> str:
    """What a YAML value is, in YAML words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return "a date"
    return type(value).__name__


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_number(value: float) -> str:
    """`16.0` -> `16`, `0.5` -> `0.5`."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# ---- names ------------------------------------------------------------------------------------------------


def is_valid_env_name(name: str) -> bool:
    return bool(_ENV_NAME.fullmatch(name))


def parse_name(value: Any) -> str:
    """A task or pipeline name: SkyPilot's rule (letters, digits, and up to two of . _ - between them)."""
    if not isinstance(value, str):
        raise Bad(f"must be text, not {kind(value)}")
    if len(value) > MAX_NAME_LENGTH:
        raise Bad(f"a name is at most {MAX_NAME_LENGTH} characters, not {len(value)}")
    if not _NAME.fullmatch(value):
        raise Bad(
            f"{show(value)} is not a valid name (letters and digits, joined by single or double . _ -; "
            "it must start and end with a letter or digit)"
        )
    return value


# ---- clouds and infra -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InfraParts:
    """An infra string taken apart; None means any."""

    cloud: str | None = None
    region: str | None = None
    zone: str | None = None


def _suggest(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f" (known: {', '.join(choices)})"


def parse_cloud(value: Any) -> str | None:
    """A cloud name, case-insensitive; `*` (any cloud) gives None."""
    if not isinstance(value, str):
        raise Bad(f"must be a cloud name like aws, not {kind(value)}")
    name = value.strip().lower()
    if name == "*":
        return None
    name = _CLOUD_ALIASES.get(name, name)
    if name not in KNOWN_CLOUDS:
        raise Bad(f"unknown cloud {show(value)}{_suggest(name, KNOWN_CLOUDS)}")
    return name


def parse_infra(value: Any) -> InfraParts:
    """`local`, `local/region-a`, `aws/us-east-1/us-east-1a`, `k8s/my-context` (a context may hold slashes),
    `*/us-east-1`; `*` in any part means any."""
    if not isinstance(value, str):
        raise Bad(f"must be text like aws/us-east-1, not {kind(value)}")
    text = value.strip().strip("/")
    if not text:
        return InfraParts()
    parts = [p.strip() for p in text.split("/")]
    if "" in parts:
        raise Bad(f"{show(value)} has an empty part; write cloud, cloud/region or cloud/region/zone")
    cloud = parse_cloud(parts[0])
    rest = parts[1:]
    if cloud in ("kubernetes", "ssh"):
        region = "/".join(rest) if rest else None
        return InfraParts(cloud, None if region == "*" else region, None)
    if len(rest) > 2:
        raise Bad(f"{show(value)} has too many parts; write cloud, cloud/region or cloud/region/zone")
    region = rest[0] if rest else None
    zone = rest[1] if len(rest) > 1 else None
    return InfraParts(cloud, None if region == "*" else region, None if zone == "*" else zone)


def normalize_infra(value: Any) -> str | None:
    """An infra string in its normal form (`AWS/us-east-1` -> `aws/us-east-1`, `k8s` -> `kubernetes`, `*` -> None)."""
    parts = parse_infra(value)
    return format_infra(parts.cloud, parts.region, parts.zone)


def format_infra(cloud: str | None, region: str | None, zone: str | None) -> str | None:
    """The infra string of a cloud/region/zone: `aws/us-east-1`, `*/us-east-1`, or None for anywhere."""
    parts = [cloud or "*", region or "*", zone or "*"]
    while parts and parts[-1] == "*":
        parts.pop()
    return "/".join(parts) if parts else None


# ---- cpus, memory, sizes ----------------------------------------------------------------------------------


def _finite(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_cpus(value: Any) -> str:
    """`4`, `4.5`, `"4"`, `"4+"` (at least 4) -> the string form SkyPilot keeps (`2` -> `"2"`)."""
    bad = Bad(f"{show(value)} is not a number or a range like 4+")
    if not (is_number(value) or isinstance(value, str)):
        raise bad
    text = value.strip() if isinstance(value, str) else str(value)
    number = _finite(text[:-1] if text.endswith("+") else text)
    if number is None:
        raise bad
    if number <= 0:
        raise Bad(f"must be more than 0, not {show(value)}")
    return text


def _size_gib(text: str) -> float | None:
    """`16` (GiB), `512MB`, `1TB` -> GiB; None when it is not a size."""
    number = _finite(text)
    if number is not None:
        return number
    lower = text.lower()
    for unit in sorted(_GIB_PER_UNIT, key=len, reverse=True):
        if lower.endswith(unit):
            number = _finite(lower[: -len(unit)])
            if number is not None:
                return number * _GIB_PER_UNIT[unit]
            return None
    return None


def parse_memory(value: Any) -> str:
    """GiB per node: `16`, `"16+"`, or with a unit `"32GB"`, `"512MB+"` (converted to GiB)."""
    bad = Bad(f"{show(value)} is not a number (GiB), a size like 32GB, or a range like 16+")
    if not (is_number(value) or isinstance(value, str)):
        raise bad
    text = value.strip() if isinstance(value, str) else str(value)
    plus = "+" if text.endswith("+") else ""
    body = text[:-1] if plus else text
    if _finite(body) is not None:
        gib = float(body)
        normalized = text
    else:
        size = _size_gib(body)
        if size is None:
            raise bad
        gib = size
        normalized = format_number(size) + plus
    if not math.isfinite(gib):
        raise bad
    if gib <= 0:
        raise Bad(f"must be more than 0, not {show(value)}")
    return normalized


def parse_disk_size(value: Any) -> int:
    """OS disk size in whole GiB: `256`, `"512GB"`, `"1TB"`."""
    bad = Bad(f"{show(value)} is not a disk size in GiB like 256 or 1TB")
    if is_number(value):
        gib: float | None = float(value) if math.isfinite(value) else None
    elif isinstance(value, str):
        gib = _size_gib(value.strip())
    else:
        raise bad
    if gib is None:
        raise bad
    if gib <= 0:
        raise Bad(f"must be more than 0, not {show(value)}")
    if not gib.is_integer():
        raise Bad(f"must be a whole number of GiB, not {show(value)}")
    return int(gib)


# ---- accelerators -----------------------------------------------------------------------------------------


def canonical_accelerator(name: str) -> str:
    return _ACCELERATOR_BY_LOWER.get(name.lower(), name)


def _count(value: Any, where: Any) -> float:
    if not is_number(value) or not math.isfinite(value):
        raise Bad(f"the count of {show(where)} must be a number, not {show(value)}")
    if value <= 0:
        raise Bad(f"the count of {show(where)} must be more than 0, not {show(value)}")
    return float(value)


def parse_accelerator_text(text: str) -> tuple[str, float]:
    """`V100` -> (V100, 1.0); `V100:0.5` -> (V100, 0.5)."""
    bad = Bad(f"{show(text)} is not an accelerator like V100 or V100:2")
    parts = [p.strip() for p in text.strip().split(":")]
    if any(_MEMORY_SPEC.match(p) for p in parts):
        raise Bad(f"{show(text)} selects GPUs by memory, which Sortie does not support yet; name them, like L4:1")
    if len(parts) > 2 or not parts[0]:
        raise bad
    if len(parts) == 1:
        return canonical_accelerator(parts[0]), 1.0
    number = _finite(parts[1])
    if number is None:
        raise bad
    return canonical_accelerator(parts[0]), _count(number, text)


def _one_accelerator(item: Any) -> tuple[str, float]:
    """One accelerator as a string (`H100:8`) or a one-entry mapping (`{H100: 8}`)."""
    if isinstance(item, str):
        return parse_accelerator_text(item)
    if isinstance(item, dict):
        if len(item) != 1:
            raise Bad(f"{show(item)} must name exactly one accelerator, like {{H100: 8}}")
        ((name, count),) = item.items()
        return _keyed_accelerator(name, count)
    raise Bad(f"an accelerator is text like V100:2 or a mapping like {{V100: 2}}, not {kind(item)}")


def _keyed_accelerator(name: Any, count: Any) -> tuple[str, float]:
    """A mapping entry: `{H100: 8}`, or a set entry `{'H100:8'}` (YAML gives it a null value)."""
    if not isinstance(name, str):
        raise Bad(f"accelerator names are text, not {kind(name)}")
    if count is None:
        return parse_accelerator_text(name)
    if ":" in name:
        raise Bad(f"{show(name)} already has a count; write {{{name}}} or {{{name.split(':')[0]}: {show(count)}}}")
    accel, _ = parse_accelerator_text(name)
    return accel, _count(count, name)


class AcceleratorSet(list):  # type: ignore[type-arg]
    """Unordered alternatives naming one accelerator at several counts (`{'A100:4', 'A100:8', 'A100-80GB:2'}`):
    a mapping cannot hold them, so they are a list that is not a preference order."""


def parse_accelerators(value: Any, *, several: bool) -> dict[str, float] | list[dict[str, float]]:
    """Normalize SkyPilot's accelerator forms.

    Returns a mapping for one accelerator or an unordered set of alternatives (YAML `{'A100:1', 'T4:1'}` or
    `{A100: 1, T4: 1}`), and a list of one-entry mappings for ordered alternatives (`[A100:1, T4:1]`).
    With `several=False` (inside any_of/ordered) only one accelerator is allowed.
    """
    if isinstance(value, str):
        name, count = parse_accelerator_text(value)
        return {name: count}
    if isinstance(value, dict):
        if not value:
            raise Bad("names no accelerator; write one like V100:1, or remove the field")
        found: dict[str, float] = {}
        entries: list[dict[str, float]] = []
        for key, count in value.items():
            name, number = _keyed_accelerator(key, count)
            if {name: number} not in entries:
                entries.append({name: number})
            found[name] = number
        if len(entries) > len(found):  # one accelerator at several counts: one alternative per entry
            if not several:
                raise Bad("only one accelerator here, like A100:1 (put alternatives in separate any_of entries)")
            return AcceleratorSet(entries)
        if len(found) > 1 and not several:
            raise Bad("only one accelerator here, like A100:1 (put alternatives in separate any_of entries)")
        return found
    if isinstance(value, list):
        if not value:
            raise Bad("names no accelerator; write one like V100:1, or remove the field")
        if len(value) > 1 and not several:
            raise Bad("only one accelerator here, like A100:1 (put alternatives in separate any_of entries)")
        ordered: list[dict[str, float]] = []
        for index, item in enumerate(value):
            try:
                name, number = _one_accelerator(item)
            except Bad as exc:
                raise Bad(exc.message, at=f"[{index}]") from None
            if {name: number} not in ordered:
                ordered.append({name: number})
        return ordered if several else ordered[0]
    raise Bad(f"must be an accelerator like V100:2, a list or a set of them, not {kind(value)}")


def accelerator_alternatives(value: dict[str, float] | list[dict[str, float]] | None) -> list[dict[str, float]]:
    """The normalized accelerators field as a list of choices, each {} or one entry."""
    if value is None:
        return [{}]
    if isinstance(value, list):  # ordered, or an AcceleratorSet
        return [dict(item) for item in value]
    return [{name: count} for name, count in value.items()]


def format_accelerator(name: str, count: float) -> str:
    return f"{name}:{format_number(count)}"


# ---- ports, recovery, tiers -------------------------------------------------------------------------------


def _port_range(item: Any) -> tuple[int, int]:
    bad = Bad(f"{show(item)} is not a port (1-65535) or a range like 8000-8010")
    if is_number(item):
        if not float(item).is_integer():
            raise bad
        low = high = int(item)
    elif isinstance(item, str):
        pieces = item.strip().split("-")
        if len(pieces) > 2 or not all(p.strip().isdigit() for p in pieces):
            raise bad
        low, high = int(pieces[0]), int(pieces[-1])
    else:
        raise bad
    if not 1 <= low <= high <= 65535:
        raise bad
    return low, high


def parse_ports(value: Any) -> list[str]:
    """`8080`, `"8000-8010"` or a list of them -> merged sorted ranges like ["8000-8010", "8080"]."""
    items = value if isinstance(value, list) else [value]
    ranges: list[tuple[int, int]] = []
    for index, item in enumerate(items):
        try:
            ranges.append(_port_range(item))
        except Bad as exc:
            raise Bad(exc.message, at=f"[{index}]" if isinstance(value, list) else "") from None
    merged: list[list[int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return [str(low) if low == high else f"{low}-{high}" for low, high in merged]


def parse_strategy(value: Any) -> str | None:
    """A recovery strategy name, case-insensitive; null keeps SkyPilot's default."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise Bad(f"must be a strategy name ({' or '.join(RECOVERY_STRATEGIES)}), not {kind(value)}")
    name = value.strip().upper()
    if name not in RECOVERY_STRATEGIES:
        raise Bad(f"{show(value)} is not a recovery strategy; use {' or '.join(RECOVERY_STRATEGIES)}")
    return name


def parse_exit_codes(value: Any) -> list[int]:
    """One exit code or a list of distinct ones, each 0-255."""
    items = value if isinstance(value, list) else [value]
    codes: list[int] = []
    for index, item in enumerate(items):
        at = f"[{index}]" if isinstance(value, list) else ""
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item <= 255:
            raise Bad(f"{show(item)} is not an exit code (a whole number 0-255)", at=at)
        if item in codes:
            raise Bad(f"exit code {item} is listed twice", at=at)
        codes.append(item)
    return codes


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|secs|m|min|mins|h|hr|hrs|d|days?)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"s": 1, "sec": 1, "secs": 1, "m": 60, "min": 60, "mins": 60, "h": 3600, "hr": 3600,
                   "hrs": 3600, "d": 86400, "day": 86400, "days": 86400}


def parse_duration(value: Any) -> float:
    """Seconds from `90`, `90s`, `30m`, `2h` or `1d`; positive."""
    if isinstance(value, bool):
        raise Bad(f"{show(value)} is not a duration like 90s, 30m or 2h")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise Bad(f"{show(value)} is not a duration like 90s, 30m or 2h")
        seconds = float(match[1]) * _DURATION_UNITS[(match[2] or "s").lower()]
    if seconds <= 0:
        raise Bad(f"{show(value)} must be a positive duration")
    return seconds


def parse_choice(value: Any, choices: tuple[str, ...], what: str, *, upper: bool = False) -> str:
    if not isinstance(value, str) or (value.upper() if upper else value.lower()) not in choices:
        raise Bad(f"{show(value)} is not a {what}; use one of {', '.join(choices)}")
    return value.upper() if upper else value.lower()
