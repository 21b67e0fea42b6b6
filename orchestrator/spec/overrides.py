"""Command-line overrides of `jobs launch` (SkyPilot's --name, --env, --env-file, --secret, --secret-file,
--infra, --cpus, --memory, --gpus, --num-nodes, --use-spot, --workdir, --git-url/--git-ref, --disk-size,
--disk-tier, --network-tier, --image-id, --instance-type, --ports, --job-recovery, --config), checked once and
applied to each task's raw document.

`--env-file` values fill the task's envs, and also a secret the task declares under that name (SkyPilot's
rule: a secret is never filled from the plain environment, but a dotenv file may hold it).
On a YAML of several tasks, the overrides of resources, nodes, workdir and config are ignored with a warning,
as SkyPilot does; --env, --secret and --name still apply.

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
    secret_file: str | None = None  # --secret-file (dotenv format), like --env-file for secrets
    git_url: str | None = None
    git_ref: str | None = None
    disk_size: str | None = None
    disk_tier: str | None = None
    network_tier: str | None = None
    image_id: str | None = None
    instance_type: str | None = None
    ports: tuple[str, ...] = ()
    job_recovery: str | None = None
    config: tuple[str, ...] = ()  # --config KEY=VALUE (dotted key, YAML value) or a YAML file


# Resource overrides: (ResolvedOverrides attribute, resources key, the flag), in the order they apply.
_RESOURCE_OVERRIDES = (
    ("infra", "infra", "--infra"), ("cpus", "cpus", "--cpus"), ("memory", "memory", "--memory"),
    ("gpus", "accelerators", "--gpus"), ("disk_size", "disk_size", "--disk-size"),
    ("disk_tier", "disk_tier", "--disk-tier"), ("network_tier", "network_tier", "--network-tier"),
    ("image_id", "image_id", "--image-id"), ("instance_type", "instance_type", "--instance-type"),
    ("ports", "ports", "--ports"), ("job_recovery", "job_recovery", "--job-recovery"),
)


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
    workdir: str | dict[str, str] | None = None
    disk_size: Any = UNSET
    disk_tier: Any = UNSET
    network_tier: Any = UNSET
    image_id: Any = UNSET
    instance_type: Any = UNSET
    ports: Any = UNSET
    job_recovery: Any = UNSET
    config: dict[str, Any] | None = None
    file_values: dict[str, str] = field(default_factory=dict)  # --env-file: fill envs, and declared secrets
    problems: list[str] = field(default_factory=list)

    def resources_given(self) -> list[str]:
        """The flags of the resource, node, workdir and config overrides given (ignored on several tasks)."""
        given = [flag for attr, _, flag in _RESOURCE_OVERRIDES if getattr(self, attr) is not UNSET]
        given += [flag for flag, value in (("--use-spot", self.use_spot), ("--num-nodes", self.num_nodes),
                                           ("--workdir", self.workdir), ("--config", self.config))
                  if value is not None]
        return given

    def without_resources(self) -> ResolvedOverrides:
        return ResolvedOverrides(name=self.name, envs=self.envs, secrets=self.secrets, file_values=self.file_values,
                                 problems=self.problems)


MAX_DOTENV_BYTES = 4 * 1024 * 1024  # an --env-file or --secret-file (issue 28: its size is checked before parsing)
MAX_DOTENV_LINES = 100_000  # comments and blank lines included
MAX_DOTENV_PROBLEMS = 20  # wrong lines said, at most (then one line saying there are more)
_DOTENV_LINE = re.compile(r"^\s*(?:export\s+)?([^=\s]+)\s*=\s*(.*?)\s*$")


def parse_env_file(text: str, label: str) -> tuple[dict[str, str], list[str]]:
    """Dotenv format: `KEY=value` lines, blank lines and `#` comments, optional `export `, quoted values."""
    found: dict[str, str] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if len(problems) >= MAX_DOTENV_PROBLEMS:
            problems.append(f"--env-file: {label}: more lines are wrong; fix these first")
            break
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if len(line) > values.MAX_ENV_VALUE_BYTES + 1024:  # before any regex: a 100 MB line took 39 s
            problems.append(f"--env-file: {label} line {number}: a value is at most {values.MAX_ENV_VALUE_BYTES:,} "
                            "bytes")
            continue
        if len(found) >= values.MAX_ENV_COUNT:
            problems.append(f"--env-file: {label} line {number}: at most {values.MAX_ENV_COUNT} variables")
            break
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
        out.file_values.update(_read_dotenv(overrides.env_file, "--env-file", base_dir, problems))
    if overrides.secret_file is not None:
        out.secrets.update(_read_dotenv(overrides.secret_file, "--secret-file", base_dir, problems))
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
    _resolve_resources(overrides, out, problems)
    if overrides.git_ref is not None and overrides.git_url is None:
        problems.append("--git-ref: needs --git-url (the repository to clone)")
    if overrides.git_url is not None:
        if overrides.workdir is not None:
            problems.append("--git-url: cannot be combined with --workdir; give one")
        out.workdir = {"url": overrides.git_url, **({"ref": overrides.git_ref} if overrides.git_ref else {})}
    if overrides.config:
        out.config = _config_overrides(overrides.config, base_dir, problems)
    if overrides.workdir is not None:
        path = Path(os.path.expanduser(overrides.workdir))
        path = path if path.is_absolute() else base_dir / path
        if not path.is_dir():
            problems.append(f"--workdir: {show(overrides.workdir)} is not a directory ({path})")
        else:
            out.workdir = os.path.normpath(path)
    return out


def _read_dotenv(given: str, flag: str, base_dir: Path, problems: list[str]) -> dict[str, str]:
    """A dotenv file, its size checked before it is parsed (issue 28: 5 million lines took 194 s and 1.3 GB to
    refuse): bytes first (read no further than the bound: /dev/zero is refused too), then lines."""
    path = Path(os.path.expanduser(given))
    path = path if path.is_absolute() else base_dir / path
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_DOTENV_BYTES + 1)
    except FileNotFoundError:
        problems.append(f"{flag}: {given}: no such file")
        return {}
    except OSError as exc:
        problems.append(f"{flag}: {given}: cannot read it ({exc.__class__.__name__})")
        return {}
    if len(data) > MAX_DOTENV_BYTES:
        problems.append(f"{flag}: {given}: over {MAX_DOTENV_BYTES // (1024 * 1024)} MiB; a dotenv file holds at most "
                        f"{values.MAX_ENV_COUNT} variables")
        return {}
    if data.count(b"\n") > MAX_DOTENV_LINES:
        problems.append(f"{flag}: {given}: over {MAX_DOTENV_LINES:,} lines; a dotenv file holds at most "
                        f"{values.MAX_ENV_COUNT} variables")
        return {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"{flag}: {given}: cannot read it (not UTF-8 text)")
        return {}
    found, file_problems = parse_env_file(text, given)
    problems.extend(p.replace("--env-file:", f"{flag}:", 1) for p in file_problems)
    return found


def _resolve_resources(overrides: Overrides, out: ResolvedOverrides, problems: list[str]) -> None:
    """--disk-size, --disk-tier, --network-tier, --image-id, --instance-type, --ports, --job-recovery."""
    def tier(choices: tuple[str, ...], what: str) -> Any:
        return lambda text: values.parse_choice(text, choices, what)

    def recovery(text: str) -> Any:
        return {"strategy": values.parse_strategy(text)}

    parsers = {"disk_size": values.parse_disk_size, "disk_tier": tier(values.DISK_TIERS, "disk tier"),
               "network_tier": tier(values.NETWORK_TIERS, "network tier"), "image_id": str.strip,
               "instance_type": str.strip, "job_recovery": recovery}
    for attr, parse in parsers.items():
        given = getattr(overrides, attr)
        if given is not None:
            flag = next(f for a, _, f in _RESOURCE_OVERRIDES if a == attr)
            setattr(out, attr, _optional(str(given), flag, parse, problems))
    if overrides.ports:
        try:
            out.ports = values.parse_ports([p.strip() for item in overrides.ports for p in item.split(",")])
        except Bad as exc:
            problems.append(f"--ports: {exc.message}")


_MAX_CONFIG_BYTES = 1024 * 1024


def _config_overrides(items: tuple[str, ...], base_dir: Path, problems: list[str]) -> dict[str, Any]:
    """`--config KEY.PATH=VALUE` (the value read as YAML) or `--config FILE.yaml`, merged in order."""
    import yaml

    merged: dict[str, Any] = {}
    for item in items:
        if "=" in item:
            key, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
            parts = [p for p in key.strip().split(".") if p]
            if not parts:
                problems.append(f"--config {item}: expected KEY=VALUE, like docker.run_options=[--shm-size=8g]")
                continue
            target = merged
            for part in parts[:-1]:
                target = target.setdefault(part, {}) if isinstance(target.get(part, {}), dict) else {}
            target[parts[-1]] = value
            continue
        path = Path(os.path.expanduser(item))
        path = path if path.is_absolute() else base_dir / path
        try:
            if path.stat().st_size > _MAX_CONFIG_BYTES:
                problems.append(f"--config {item}: over 1 MiB")
                continue
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            problems.append(f"--config {item}: no such file (or give KEY=VALUE)")
            continue
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            problems.append(f"--config {item}: cannot read it as YAML ({exc.__class__.__name__})")
            continue
        if not isinstance(loaded, dict):
            problems.append(f"--config {item}: must hold a mapping of config keys")
            continue
        _merge(merged, loaded)
    return merged


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


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
    if resolved.file_values:
        declared: dict[str, Any] = doc["secrets"] if isinstance(doc.get("secrets"), dict) else {}
        from_file = {k: v for k, v in resolved.file_values.items() if k not in declared}
        secret_values = {k: v for k, v in resolved.file_values.items() if k in declared}
        resolved = ResolvedOverrides(**{**resolved.__dict__, "envs": {**from_file, **resolved.envs},
                                        "secrets": {**secret_values, **resolved.secrets}})
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
    if resolved.config:
        config = dict(doc["config"]) if isinstance(doc.get("config"), dict) else {}
        _merge(config, resolved.config)
        doc["config"] = config
    changes = [(key, getattr(resolved, attr)) for attr, key, _ in _RESOURCE_OVERRIDES]
    changes = [(k, v) for k, v in changes if v is not UNSET]
    if resolved.use_spot is not None:
        changes.append(("use_spot", resolved.use_spot))
    resources = doc.get("resources")
    if changes and (resources is None or isinstance(resources, dict)):
        resources = dict(resources or {})
        for key, value in changes:
            if key == "infra":
                _set_resource(resources, "infra", value, also=("cloud", "region", "zone"))
            else:
                _set_resource(resources, key, value)
        doc["resources"] = resources
    return doc
