"""Loading a task YAML (or a shell command) into a Pipeline, the way SkyPilot's `jobs launch` does.

- Several documents make a pipeline; a first document holding only `name:` names it. Empty documents are
  skipped. Problems of a pipeline's tasks are prefixed `task[i].` (i counts from 0 over the task documents).
- Relative paths (workdir, local file_mounts sources, --env-file, --workdir) resolve against the current
  working directory (the `cwd`/`base_dir` argument), as SkyPilot does; the YAML file's own directory plays
  no part. Paths must exist at load time, as in SkyPilot.
- `${VAR}` and `$VAR` naming one of the task's envs (after overrides) are filled into file_mounts
  destinations, local sources and storage names/sources, as in SkyPilot.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.spec import documents as documents_module
from orchestrator.spec import overrides as overrides_module
from orchestrator.spec import values
from orchestrator.spec.errors import SpecError, problems_from
from orchestrator.spec.overrides import Overrides, ResolvedOverrides
from orchestrator.spec.task import Pipeline, Task
from orchestrator.spec.values import kind

COMMAND_TASK_NAME = "sky-cmd"  # SkyPilot's name for a task made from a command
_VAR = re.compile(r"\$(\{)?([A-Za-z_][A-Za-z0-9_]*)(?(1)\})")
_ALIASES = {"gpus": "accelerators", "spot_recovery": "job_recovery"}


def key_lines(text: str) -> dict[str, int]:
    """1-based lines of the fields of a task YAML, named as messages name them (`file_mounts./data`, and with
    several tasks `tasks[1].file_mounts./data`); empty when the text does not compose."""
    found: dict[str, int] = {}
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except (yaml.YAMLError, RecursionError):
        return found
    header = len(documents) > 1 and isinstance(documents[0], yaml.MappingNode) and \
        [k.value for k, _ in documents[0].value] == ["name"]
    tasks = [d for d in documents[1 if header else 0:] if d is not None]
    for index, node in enumerate(tasks):
        prefix = f"tasks[{index}]." if len(tasks) > 1 else ""
        if not isinstance(node, yaml.MappingNode):
            continue
        for key, value in node.value:
            found[f"{prefix}{key.value}"] = key.start_mark.line + 1
            if isinstance(value, yaml.MappingNode):
                for sub, _ in value.value:
                    found[f"{prefix}{key.value}.{sub.value}"] = sub.start_mark.line + 1
    return found


def _parse_yaml(text: str, source: str) -> list[Any]:
    return documents_module.parse_yaml(text, source)


def _fill_vars(text: str, envs: dict[str, str]) -> str:
    return _VAR.sub(lambda m: envs.get(m.group(2), m.group(0)), text)


def _fill_file_mounts(mounts: dict[Any, Any], envs: dict[str, str]) -> dict[Any, Any]:
    """Every string of file_mounts (destinations, sources, and a storage object's name, source, store, mode)."""
    filled: dict[Any, Any] = {}
    for destination, source in mounts.items():
        key = _fill_vars(destination, envs) if isinstance(destination, str) else destination
        if isinstance(source, str):
            source = _fill_vars(source, envs)
        elif isinstance(source, dict):
            source = dict(source)
            for part in ("name", "source", "store", "mode"):
                if isinstance(source.get(part), (str, list)):
                    source[part] = documents_module.fill_vars(source[part], envs)
        filled[key] = source
    return filled


def _rename_aliases(section: dict[str, Any], path: str, problems: list[str]) -> dict[str, Any]:
    """SkyPilot accepts `gpus` for accelerators and (deprecated) `spot_recovery` for job_recovery."""
    section = {str(k) if not isinstance(k, str) else k: v for k, v in section.items()}
    for alias, field in _ALIASES.items():
        if alias in section:
            value = section.pop(alias)
            if field in section:
                problems.append(f"{path}: {alias} and {field} are the same field; give one")
            else:
                section[field] = value
    return section


def _prepare(document: dict[Any, Any], resolved: ResolvedOverrides, prefix: str) -> tuple[dict[str, Any], list[str]]:
    """Rename aliases, apply overrides, fill envs into file_mounts: the raw document validation will see."""
    problems: list[str] = []
    doc = {str(k) if not isinstance(k, str) else k: v for k, v in document.items()}
    if "storage_mounts" in doc:
        problems.append(f"{prefix}storage_mounts: not a task field; buckets go under file_mounts")
        doc.pop("storage_mounts")
    resources = doc.get("resources")
    if isinstance(resources, dict):
        resources = _rename_aliases(resources, f"{prefix}resources", problems)
        for section in ("any_of", "ordered"):
            if isinstance(resources.get(section), list):
                resources[section] = [
                    _rename_aliases(option, f"{prefix}resources.{section}[{i}]", problems)
                    if isinstance(option, dict) else option
                    for i, option in enumerate(resources[section])
                ]
        doc["resources"] = resources
    doc = overrides_module.apply(doc, resolved)
    envs = doc.get("envs")
    known = {k: str(v) for k, v in envs.items() if isinstance(k, str) and isinstance(v, (str, int, float))} \
        if isinstance(envs, dict) else {}
    if isinstance(doc.get("file_mounts"), dict):
        doc["file_mounts"] = _fill_file_mounts(doc["file_mounts"], known)
    if isinstance(doc.get("workdir"), (str, dict)):
        doc["workdir"] = documents_module.fill_vars(doc["workdir"], known)
    config_problems = documents_module.check_config(doc.get("config"), prefix)
    if config_problems:
        doc.pop("config")
        problems += config_problems
    return doc, problems


def _task(
    document: Any, resolved: ResolvedOverrides, base_dir: Path, label: str, source: str,
    warnings: list[str] | None = None,
) -> tuple[Task | None, list[str]]:
    prefix = f"{label}." if label else ""
    if not isinstance(document, dict):
        return None, [f"{label or source}: a task is a mapping of fields like `run: echo hi`, not {kind(document)}"]
    document, dropped = documents_module.drop_service(document, prefix)
    if warnings is not None:
        warnings += dropped
    doc, problems = _prepare(document, resolved, prefix)
    try:
        task = Task.model_validate(doc, context={"base_dir": base_dir, "check_paths": True})
    except ValidationError as exc:
        return None, problems + problems_from(exc, label)
    except RecursionError:
        field = next((k for k, v in doc.items() if _loops(v)), None) if isinstance(doc, dict) else None
        where = f"{prefix}{field}" if field else (label or source)
        return None, [*problems, f"{where}: nested too deeply (a YAML alias loop?)"]
    return (None if problems else task), problems


def _loops(value: Any) -> bool:
    """Whether a loaded YAML value refers to itself (an alias loop)."""
    try:
        json.dumps(value, default=str)
    except (ValueError, RecursionError):
        return True
    return False


def _pipeline(documents: list[Any], resolved: ResolvedOverrides, base_dir: Path, source: str) -> Pipeline:
    documents = [doc for doc in documents if doc is not None]
    if not documents:
        raise SpecError([f"{source}: the file is empty; a task needs at least `run: ...`"])
    problems = list(resolved.problems)
    warnings: list[str] = []
    header = documents_module.Header()
    has_header = documents_module.is_header(documents)
    if has_header:
        header = documents_module.parse_header(documents[0])
        problems += header.problems
        documents = documents[1:]
    is_pipeline = has_header or len(documents) > 1
    several = len(documents) > 1
    if len(documents) > values.MAX_PIPELINE_TASKS:
        raise SpecError([f"{source}: a pipeline has at most {values.MAX_PIPELINE_TASKS} tasks, not {len(documents)}"])
    if several and resolved.resources_given():
        # SkyPilot's rule: overrides of resources, nodes and workdir do not apply to a multi-task YAML.
        warnings.append(f"{', '.join(resolved.resources_given())}: ignored, since the YAML has several tasks")
        resolved = resolved.without_resources()
    tasks: list[Task] = []
    for index, document in enumerate(documents):
        if resolved.name is not None and not is_pipeline and isinstance(document, dict):
            document = {**document, "name": resolved.name}
        label = f"task[{index}]" if several else ""
        task, task_problems = _task(document, resolved, base_dir, label, source, warnings)
        problems += task_problems
        if task is not None:
            tasks.append(task)
    if not problems:
        problems += documents_module.check_group(header, [t.name for t in tasks])
    if problems:
        raise SpecError(problems)
    name = tasks[0].name
    if is_pipeline:
        name = resolved.name if resolved.name is not None else header.name
    return Pipeline(name=name, tasks=tasks, is_pipeline=is_pipeline, warnings=warnings,
                    execution="parallel" if header.execution == "parallel" else "serial",
                    primary_tasks=header.primary_tasks,
                    termination_delay=header.termination_delay)


def load_yaml_text(text: str, overrides: Overrides = Overrides(), base_dir: Path | None = None, *,
                   source: str = "<yaml>") -> Pipeline:
    """Load task YAML text. `base_dir` (default: the current directory) is where relative paths start;
    `source` names the text in messages (the file name)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    resolved = overrides_module.resolve(overrides, base)
    if not isinstance(text, str):
        raise SpecError([f"{source}: expected YAML text, not {kind(text)}"])
    if len(text) > values.MAX_SPEC_BYTES or len(text.encode(errors="surrogatepass")) > values.MAX_SPEC_BYTES:
        raise SpecError([f"{source}: a task YAML is at most {values.MAX_SPEC_BYTES // (1024 * 1024)} MiB; "
                         "keep large data in files (file_mounts) instead"])
    documents = _parse_yaml(text, source)
    if documents and all(doc is None or isinstance(doc, str) for doc in documents) and any(documents):
        raise SpecError([f"{source}: expected a task (fields like `run: echo hi`), found only text"])
    pipeline = _pipeline(documents, resolved, base, source)
    pipeline.set_lines(key_lines(text), source)
    return pipeline


def _looks_like_task_yaml(text: str) -> bool:
    """SkyPilot's test: an existing file is a YAML entrypoint when it loads and its first document is no string."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except (yaml.YAMLError, RecursionError):
        return False  # a YAML error is reported by the full load, if this is taken for a task
    return bool(documents) and not isinstance(documents[0], str)


def _read(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError([f"{label}: not a text (UTF-8) file"]) from None
    except OSError as exc:
        raise SpecError([f"{label}: cannot read it ({exc.strerror or exc.__class__.__name__})"]) from None


def load_entrypoint(entrypoint: str, overrides: Overrides = Overrides(), cwd: Path | None = None) -> Pipeline:
    """A task YAML path or a shell command, like SkyPilot's `jobs launch ENTRYPOINT`.

    A path ending in .yaml/.yml is a task YAML (an error if it is missing). Another existing file is a task YAML
    when it loads as one. Anything else is a command: a one-task pipeline whose run is that command.
    Overrides apply to every task.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    text = entrypoint.strip() if isinstance(entrypoint, str) else ""
    if not text:
        raise SpecError(["nothing to run: give a task YAML file or a command"])
    path = Path(os.path.expanduser(text))
    path = path if path.is_absolute() else base / path
    if text.lower().endswith((".yaml", ".yml")):
        if path.is_dir():
            raise SpecError([f"{text}: is a directory, not a task YAML"])
        if not path.exists():
            raise SpecError([f"{text}: no such file"])
        return load_yaml_text(_read(path, text), overrides, base, source=text)
    if path.is_file():
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            content = None
        if content is not None and _looks_like_task_yaml(content):
            return load_yaml_text(content, overrides, base, source=text)
    resolved = overrides_module.resolve(overrides, base)
    return _pipeline([{"name": COMMAND_TASK_NAME, "run": text}], resolved, base, text)


def task_json_schema() -> dict[str, Any]:
    """JSON Schema of one task document, with every field's description; `sortie schema` prints it."""
    schema = json.loads(json.dumps(Task.model_json_schema()))
    schema["properties"].pop("storage_mounts", None)
    resources = schema.get("$defs", {}).get("Resources", {}).get("properties", {})
    if "accelerators" in resources:
        resources["gpus"] = {**resources["accelerators"], "description": "Alias of accelerators."}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Sortie task",
        "description": "One document of a Sortie (SkyPilot-compatible) task YAML. Several documents separated by "
        "--- make a pipeline; a first document holding only `name:` names it.",
        **{k: v for k, v in schema.items() if k not in ("title", "description")},
    }
