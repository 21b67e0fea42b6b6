"""Task YAML specs, SkyPilot-compatible: the same field names and meanings, every field described.

`load_entrypoint` / `load_yaml_text` turn a task YAML (or a shell command) plus `jobs launch` overrides into a
`Pipeline` of `Task`s; `Task.candidates()` lists the resource alternatives; problems raise one `SpecError`
with a line per problem, each naming its YAML path.
"""

from orchestrator.spec.errors import SpecError
from orchestrator.spec.loader import load_entrypoint, load_yaml_text, task_json_schema
from orchestrator.spec.overrides import Overrides
from orchestrator.spec.resources import Candidate, JobRecoverySpec, Resources
from orchestrator.spec.task import Pipeline, Task

__all__ = [
    "Candidate",
    "JobRecoverySpec",
    "Overrides",
    "Pipeline",
    "Resources",
    "SpecError",
    "Task",
    "load_entrypoint",
    "load_yaml_text",
    "task_json_schema",
]
