"""Helpers of the spec tests: load a task YAML from text (dedented), its one task, or the problems it
raises."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from orchestrator.spec import (
    Overrides,
    Pipeline,
    SpecError,
    Task,
    load_yaml_text,
)


def load(text: str, overrides: Overrides = Overrides(), base_dir: Path | None = None) -> Pipeline:
    return load_yaml_text(textwrap.dedent(text), overrides, base_dir, source="task.yaml")


def one(text: str, overrides: Overrides = Overrides(), base_dir: Path | None = None) -> Task:
    (task,) = load(text, overrides, base_dir).tasks
    return task


def problems(text: str, overrides: Overrides = Overrides(), base_dir: Path | None = None) -> list[str]:
    with pytest.raises(SpecError) as info:
        load(text, overrides, base_dir)
    return info.value.problems


def accelerators(task: Task) -> list[dict[str, float]]:
    return [c.accelerators for c in task.candidates()]
