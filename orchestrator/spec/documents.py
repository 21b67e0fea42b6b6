"""The documents of a task YAML before validation: YAML with duplicate keys refused, the header document of a
pipeline or job group, `service:` sections dropped with a warning, and `config:` per-task overrides checked.

Job groups (SkyPilot's `execution: parallel` header) are parsed, checked and planned here; the controller runs
their tasks at once (`orchestrator.controller.jobs`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from orchestrator.spec.errors import SpecError
from orchestrator.spec.values import Bad, kind, parse_duration, parse_name, show

HEADER_KEYS = frozenset({"name", "execution", "primary_tasks", "termination_delay"})
EXECUTIONS = ("serial", "parallel")
SERVICE_IGNORED = "service: ignored; `jobs launch` runs the task as a managed job (SkyServe services are not " \
    "supported), as SkyPilot's `jobs launch` does"
MAX_YAML_BYTES = 4 * 1024 * 1024

# The `config:` keys a task may set (SkyPilot's per-task config overrides), as dotted paths; a prefix ending
# in "." admits every key below it.
CONFIG_KEYS = (
    "kubernetes.pod_config",  # merged into the pod spec by the Kubernetes builder
    "docker.run_options",     # extra `docker run` options of a task's container (image_id: docker:...)
)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base loader says a list cannot be a key
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {show(key)} appears twice in one mapping (lines {seen[key]} and {line}); "
                    "keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> list[Any]:
    """Every document of `text`; a YAML error (or a duplicate key) is one line naming the line."""
    if len(text) > MAX_YAML_BYTES:
        raise SpecError([f"{source}: over {MAX_YAML_BYTES // (1024 * 1024)} MiB; a task YAML is smaller"])
    loader: _UniqueKeyLoader | None = None
    try:
        loader = _UniqueKeyLoader(text)  # a SafeLoader subclass
        documents = []
        while loader.check_data():
            documents.append(loader.get_data())
        return documents
    except yaml.MarkedYAMLError as exc:
        problem = exc.problem or exc.context or exc.__class__.__name__
        if "appears twice" in str(problem):
            raise SpecError([f"{source}: {problem}"]) from None
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecError([f"{source}: not valid YAML{where}: {show(str(problem))[1:-1]}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"{source}: not valid YAML: {show(str(exc))[1:-1]}"]) from None
    except RecursionError:
        line = loader.get_mark().line + 1 if loader is not None else 1
        raise SpecError([f"{source}: {_field_at(text, line)}: nested too deeply at line {line}; flatten it"]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _field_at(text: str, line: int) -> str:
    """The top-level field a 1-based `line` of a YAML text lies in (the nearest `key:` at column 0 above it)."""
    for row in reversed(text.splitlines()[:line]):
        match = re.match(r"([A-Za-z_][\w.-]*)\s*:", row)
        if match:
            return match.group(1)
    return "the document"


@dataclass
class Header:
    """The first document of a multi-document YAML when it holds only header keys."""

    name: str | None = None
    execution: str = "serial"
    primary_tasks: list[str] | None = None
    termination_delay: float | dict[str, float] | None = None
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        if self.execution != "parallel":
            return {}
        return {"execution": self.execution, "primary_tasks": self.primary_tasks,
                "termination_delay": self.termination_delay}


def is_header(documents: list[Any]) -> bool:
    first = documents[0] if documents else None
    return (len(documents) > 1 and isinstance(first, dict) and bool(first) and set(first) <= HEADER_KEYS
            and ("name" in first or "execution" in first))


def _delay(value: Any, at: str, problems: list[str]) -> float | None:
    try:
        return parse_duration(value)
    except Bad as exc:
        problems.append(f"{at}: {exc.message}")
        return None


def parse_header(document: dict[str, Any]) -> Header:
    header = Header()
    problems = header.problems
    if document.get("name") is not None:
        try:
            header.name = parse_name(document["name"])
        except Bad as exc:
            problems.append(f"name: {exc.message}")
    execution = document.get("execution", "serial")
    if not isinstance(execution, str) or execution.strip().lower() not in EXECUTIONS:
        problems.append(f"execution: must be serial or parallel, not {show(execution)}")
    else:
        header.execution = execution.strip().lower()
    primary = document.get("primary_tasks")
    if primary is not None:
        if isinstance(primary, str):
            primary = [primary]
        if not isinstance(primary, list) or not primary or not all(isinstance(p, str) for p in primary):
            problems.append(f"primary_tasks: must be a list of task names, not {kind(primary)}")
        else:
            header.primary_tasks = list(dict.fromkeys(primary))
    delay = document.get("termination_delay")
    if isinstance(delay, dict):
        delays = {str(k): _delay(v, f"termination_delay.{k}", problems) for k, v in delay.items()}
        header.termination_delay = {k: v for k, v in delays.items() if v is not None}
    elif delay is not None:
        header.termination_delay = _delay(delay, "termination_delay", problems)
    if header.execution != "parallel":
        for key in ("primary_tasks", "termination_delay"):
            if document.get(key) is not None:
                problems.append(f"{key}: only for a job group (execution: parallel)")
    return header


def check_group(header: Header, task_names: list[str | None]) -> list[str]:
    """A job group's tasks: each named, the names distinct, primary_tasks and termination_delay naming them."""
    if header.execution != "parallel":
        return []
    problems = []
    for index, name in enumerate(task_names):
        if name is None:
            problems.append(f"task[{index}].name: every task of a job group needs a name (tasks find each other "
                            "by it)")
    named = [n for n in task_names if n is not None]
    for name in dict.fromkeys(n for n in named if named.count(n) > 1):
        problems.append(f"name: two tasks of the job group are named {name}; names must differ")
    for name in header.primary_tasks or []:
        if name not in named:
            problems.append(f"primary_tasks: no task named {name} (tasks: {', '.join(named) or 'none'})")
    if isinstance(header.termination_delay, dict):
        for name in header.termination_delay:
            if name != "default" and name not in named:
                problems.append(f"termination_delay.{name}: no task named {name}")
    return problems


def drop_service(document: dict[str, Any], prefix: str) -> tuple[dict[str, Any], list[str]]:
    """A `service:` section is dropped with one warning, as SkyPilot's `jobs launch` does."""
    if "service" not in document:
        return document, []
    rest = {k: v for k, v in document.items() if k != "service"}
    return rest, [f"{prefix}{SERVICE_IGNORED}"]


def _dotted(config: dict[str, Any], path: str = "") -> list[str]:
    """The leaf paths of a config mapping, stopping at a known key (its value is free-form)."""
    found = []
    for key, value in config.items():
        at = f"{path}.{key}" if path else str(key)
        inside = any(k.startswith(at + ".") for k in CONFIG_KEYS)
        if at in CONFIG_KEYS or not inside or not isinstance(value, dict) or not value:
            found.append(at)
        else:
            found.extend(_dotted(value, at))
    return found


def _text_keys(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _text_keys(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_text_keys(v) for v in value)
    return True


def check_config(config: Any, prefix: str) -> list[str]:
    """Problems of a task's `config:`: only keys with a meaning in Sortie, each checked."""
    if config is None:
        return []
    if not isinstance(config, dict):
        return [f"{prefix}config: must be a mapping like {{docker: {{run_options: [...]}}}}, not {kind(config)}"]
    problems = []
    if not _text_keys(config):
        return [f"{prefix}config: keys are text, like docker or kubernetes"]
    for path in _dotted(config):
        if path not in CONFIG_KEYS:
            problems.append(f"{prefix}config.{path}: not supported yet (Sortie applies: {', '.join(CONFIG_KEYS)})")
    pod = (config.get("kubernetes") or {}).get("pod_config") if isinstance(config.get("kubernetes"), dict) else None
    if pod is not None and not isinstance(pod, dict):
        problems.append(f"{prefix}config.kubernetes.pod_config: must be a mapping (a partial pod spec)")
    docker = config.get("docker")
    options = docker.get("run_options") if isinstance(docker, dict) else None
    if options is not None and not (isinstance(options, str) or (
            isinstance(options, list) and all(isinstance(o, str) for o in options))):
        problems.append(f"{prefix}config.docker.run_options: must be text or a list of texts like --shm-size=16g")
    return problems


_VAR = re.compile(r"\$(\{)?([A-Za-z_][A-Za-z0-9_]*)(?(1)\})")


def fill_vars(value: Any, envs: dict[str, str]) -> Any:
    """`${VAR}`/`$VAR` naming a known env filled into every string of `value` (keys too); others kept."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: envs.get(m.group(2), m.group(0)), value)
    if isinstance(value, dict):
        return {fill_vars(k, envs): fill_vars(v, envs) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_vars(v, envs) for v in value]
    return value
