"""Unit tests of orchestrator.spec, continued: documents and pipelines, overrides, entrypoints, summaries, JSON and
schema, and fuzzing (never a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.spec import (
    Overrides,
    Resources,
    SpecError,
    Task,
    load_entrypoint,
    load_yaml_text,
    task_json_schema,
)
from orchestrator.spec.resources import JobRecovery, ResourceOption
from tests.support.spec_text import accelerators, load, one, problems

# ---- documents and pipelines --------------------------------------------------------------------------------


def test_single_document_names_the_pipeline_after_its_task() -> None:
    pipeline = load("name: train\nrun: x\n")
    assert (pipeline.name, pipeline.is_pipeline, pipeline.tasks[0].name) == ("train", False, "train")


def test_name_only_header_names_a_pipeline() -> None:
    pipeline = load("name: pipe\n---\nname: a\nrun: x\n---\nrun: y\n")
    assert pipeline.is_pipeline and pipeline.name == "pipe"
    assert [t.name for t in pipeline.tasks] == ["a", None]
    assert pipeline.to_json()["name"] == "pipe" and len(pipeline.to_json()["tasks"]) == 2
    single = load("name: pipe\n---\nrun: x\n---\n")
    assert single.is_pipeline and single.name == "pipe" and len(single.tasks) == 1


def test_documents_that_are_all_tasks_make_an_unnamed_pipeline() -> None:
    pipeline = load("run: a\n---\nrun: b\n")
    assert pipeline.is_pipeline and pipeline.name is None and [t.run for t in pipeline.tasks] == ["a", "b"]


def test_only_a_name() -> None:
    pipeline = load("name: lonely\n")
    assert pipeline.name == "lonely" and pipeline.tasks[0].name == "lonely" and pipeline.tasks[0].run is None


# ---- overrides ----------------------------------------------------------------------------------------------


OVERRIDDEN = """\
    name: train
    resources:
      cpus: 2
      accelerators: {'A100:1', 'T4:1'}
      any_of:
        - cloud: aws
          region: us-east-1
          cpus: 16
        - infra: gcp
"""


def test_resource_overrides_apply_to_every_candidate(tmp_path: Path) -> None:
    task = one(OVERRIDDEN, Overrides(gpus="H100:8", infra="local/region-a", cpus="4+", memory="32",
                                     use_spot=True, num_nodes=3, workdir=".", name="renamed"), tmp_path)
    assert task.name == "renamed" and task.num_nodes == 3 and task.workdir == str(tmp_path)
    (candidate,) = task.candidates()
    assert (candidate.infra, candidate.cloud, candidate.region, candidate.cpus, candidate.memory,
            candidate.accelerators, candidate.use_spot) == (
        "local/region-a", "local", "region-a", "4+", "32", {"H100": 8.0}, True)


def test_gpus_override_keeps_the_other_alternatives() -> None:
    task = one(OVERRIDDEN, Overrides(gpus="h100"))
    assert [(c.infra, c.cpus, c.accelerators) for c in task.candidates()] == [
        ("aws/us-east-1", "16", {"H100": 1.0}), ("gcp", "2", {"H100": 1.0})]
    assert accelerators(one(OVERRIDDEN, Overrides(gpus="none"))) == [{}, {}]


def test_infra_override_replaces_cloud_region_zone() -> None:
    task = one("resources:\n  cloud: aws\n  region: us-east-1\n  zone: us-east-1a\n", Overrides(infra="gcp"))
    (candidate,) = task.candidates()
    assert (candidate.cloud, candidate.region, candidate.zone) == ("gcp", None, None)


def test_resource_overrides_on_a_pipeline_are_ignored_with_a_warning() -> None:
    """SkyPilot ignores --cpus/--gpus/... on a YAML of several tasks, with a warning; --env and --name apply."""
    pipeline = load("name: pipe\n---\nname: a\nrun: x\n---\nname: b\nresources: {cpus: 1}\nrun: y\n",
                    Overrides(cpus="8", gpus="H100:1", name="other", envs=(("K", "v"),)))
    assert pipeline.name == "other" and [t.name for t in pipeline.tasks] == ["a", "b"]
    assert [t.candidates()[0].cpus for t in pipeline.tasks] == [None, "1"]
    assert [t.envs for t in pipeline.tasks] == [{"K": "v"}, {"K": "v"}]
    assert pipeline.warnings == ["--cpus, --gpus: ignored, since the YAML has several tasks"]
    single = load("name: a\nrun: x\n", Overrides(cpus="8"))
    assert single.tasks[0].candidates()[0].cpus == "8" and single.warnings == []


def test_bad_overrides_name_the_flag(tmp_path: Path) -> None:
    assert problems("run: x\n", Overrides(cpus="four", memory="x", gpus="x:y", infra="zz/a", num_nodes=0,
                                          workdir="nope", name="a b", envs=(("1A", "v"),)), tmp_path) == [
        '--name: "a b" is not a valid name (letters and digits, joined by single or double . _ -; it must start '
        "and end with a letter or digit)",
        "--env 1A: not a variable name (letters, digits and _, not starting with a digit)",
        '--infra: unknown cloud "zz" (known: aws, azure, cudo, do, fluidstack, gcp, hyperbolic, ibm, kubernetes, '
        "lambda, local, nebius, oci, paperspace, primeintellect, runpod, scp, seeweb, shadeform, slurm, ssh, vast, "
        "vsphere)",
        '--cpus: "four" is not a number or a range like 4+',
        '--memory: "x" is not a number (GiB), a size like 32GB, or a range like 16+',
        '--gpus: "x:y" is not an accelerator like V100 or V100:2',
        "--num-nodes: must be >= 1",
        f'--workdir: "nope" is not a directory ({tmp_path / "nope"})',
    ]


def test_an_override_replaces_a_bad_yaml_value() -> None:
    assert one("resources:\n  cpus: four\n", Overrides(cpus="2")).candidates()[0].cpus == "2"


# ---- entrypoints --------------------------------------------------------------------------------------------


def test_command_entrypoint(tmp_path: Path) -> None:
    pipeline = load_entrypoint("echo hi && nvidia-smi", Overrides(gpus="H100:8", cpus="4"), cwd=tmp_path)
    assert not pipeline.is_pipeline and pipeline.name == "sky-cmd"
    (task,) = pipeline.tasks
    assert task.run == "echo hi && nvidia-smi" and task.resources_str() == "1x[H100:8]"
    assert load_entrypoint("python train.py", Overrides(name="mine"), cwd=tmp_path).name == "mine"


def test_yaml_entrypoint_relative_to_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "train.yml").write_text("name: t\nworkdir: .\nrun: x\n")
    pipeline = load_entrypoint("jobs/train.yml", cwd=tmp_path)
    assert pipeline.name == "t" and pipeline.tasks[0].workdir == str(tmp_path)


def test_missing_yaml_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_entrypoint("missing.yaml", cwd=tmp_path)
    assert info.value.problems == ["missing.yaml: no such file"]
    with pytest.raises(SpecError) as info:
        load_entrypoint("   ", cwd=tmp_path)
    assert info.value.problems == ["nothing to run: give a task YAML file or a command"]


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "task.yaml").write_text("run: ok\nresources:\n  cpus: four\n")
    with pytest.raises(SpecError) as info:
        load_entrypoint("task.yaml", cwd=tmp_path)
    assert info.value.problems == ['resources.cpus: "four" is not a number or a range like 4+']
    (tmp_path / "broken.yaml").write_text("run: ok\n  bad: indent\n")
    with pytest.raises(SpecError) as info:
        load_entrypoint("broken.yaml", cwd=tmp_path)
    assert info.value.problems == ["broken.yaml: not valid YAML at line 2: mapping values are not allowed here"]


def test_existing_file_without_yaml_suffix(tmp_path: Path) -> None:
    (tmp_path / "task.txt").write_text("run: from-file\n")
    assert load_entrypoint("task.txt", cwd=tmp_path).tasks[0].run == "from-file"
    (tmp_path / "run.sh").write_text("#!/bin/bash\necho hi\n")
    assert load_entrypoint("run.sh", cwd=tmp_path).tasks[0].run == "run.sh"


# ---- summaries, json, schema --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "summary"), [
    ("run: x\n", "1x[CPU:1+]"),
    ("resources: {cpus: 2+}\n", "1x[CPU:2+]"),
    ("num_nodes: 2\nresources: {accelerators: H100:8}\n", "2x[H100:8]"),
    ("resources: {cpus: 4, memory: 16+}\n", "1x[cpus=4, mem=16+]"),
    ("resources: {accelerators: {'A100:1', 'T4:0.5'}, use_spot: true}\n", "1x[A100:1|T4:0.5, spot]"),
])
def test_resources_str(text: str, summary: str) -> None:
    assert one(text).resources_str() == summary


def test_task_json() -> None:
    task = one("name: t\nnum_nodes: 2\nsetup: s\nrun: r\nenvs: {A: b}\nresources: {cpus: 2}\n")
    shown = task.to_json()
    assert list(shown) == ["name", "num_nodes", "envs", "secrets", "setup", "run", "workdir", "file_mounts",
                           "storage_mounts", "resources", "resources_ordered"]
    assert shown["resources"] == [c.to_json() for c in task.candidates()]
    json.dumps(shown)


def test_a_loaded_task_validates_again_unchanged() -> None:
    task = one(OVERRIDDEN)
    again = Task.model_validate(json.loads(task.model_dump_json()))
    assert again == task and again.candidates() == task.candidates()


def _walk(schema: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(schema, dict):
        if isinstance(schema.get("properties"), dict):
            found.append((path, schema))
        for key, value in schema.items():
            found += _walk(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            found += _walk(value, f"{path}/{index}")
    return found


def test_json_schema_describes_every_field_and_forbids_extra_keys() -> None:
    schema = task_json_schema()
    json.dumps(schema)
    assert schema["additionalProperties"] is False
    assert "storage_mounts" not in schema["properties"]
    assert {"name", "workdir", "num_nodes", "resources", "envs", "secrets", "file_mounts", "setup", "run"} <= set(
        schema["properties"])
    objects = _walk(schema)
    assert len(objects) >= 6
    for path, obj in objects:
        assert obj.get("additionalProperties") is False, path
        for name, prop in obj["properties"].items():
            assert prop.get("description"), f"{path}/{name}"
    resources = schema["$defs"]["Resources"]["properties"]
    assert {"infra", "cpus", "memory", "accelerators", "gpus", "any_of", "ordered", "job_recovery"} <= set(resources)


def test_models_are_strict_about_extra_keys() -> None:
    for model in (Task, Resources, ResourceOption, JobRecovery):
        assert model.model_config.get("extra") == "forbid"


def test_importing_spec_pulls_no_heavy_modules() -> None:
    code = ("import sys, orchestrator.spec; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pulumi', 'sqlalchemy', 'fastapi')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.stdout.strip() == "[]"


# ---- never a traceback --------------------------------------------------------------------------------------

_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="sortie-spec-fuzz-"))
_KNOWN_KEYS = sorted(
    set(Task.model_fields) | set(Resources.model_fields) | set(JobRecovery.model_fields)
    | {"gpus", "spot_recovery", "name", "source", "store", "mode", "persistent", "service", "priority"}
)
_keys = st.one_of(st.sampled_from(_KNOWN_KEYS), st.text(max_size=6), st.integers(-3, 3))
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70000), st.floats(), st.text(max_size=10),
    st.sampled_from(["4+", "H100:8", "aws/us-east-1", "k8s/a/b", "FAILOVER", "none", "s3://b", ".", "/", "${X}",
                     "$X", "16GB", "A100:0.5", "*", "a:b:c", "8000-8010", "local/region-a", "24GB+"]),
)
_values = st.recursive(
    _scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=15,
)
_resources = st.dictionaries(st.sampled_from([*sorted(Resources.model_fields), "gpus"]), _values, max_size=5)
_documents = st.one_of(
    st.dictionaries(_keys, _values, max_size=6),
    st.fixed_dictionaries({}, optional={
        "resources": st.one_of(_resources, st.builds(lambda r, o: {**r, "any_of": o}, _resources,
                                                     st.lists(_resources, max_size=3))),
        "envs": st.dictionaries(st.text(max_size=4), _scalars, max_size=3),
        "file_mounts": st.dictionaries(st.text(max_size=5), st.one_of(_scalars, st.dictionaries(
            st.sampled_from(["name", "source", "store", "mode", "persistent", "x"]), _scalars)), max_size=3),
        "name": _scalars, "run": _scalars, "num_nodes": _scalars, "workdir": _scalars,
    }),
)


def _loads_or_spec_error(text: str) -> None:
    try:
        load_yaml_text(text, base_dir=_FUZZ_DIR)
    except SpecError as exc:
        assert exc.problems
        for line in exc.problems:
            assert line and "\n" not in line


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_documents, min_size=1, max_size=3))
def test_random_documents_raise_nothing_but_spec_error(documents: list[Any]) -> None:
    _loads_or_spec_error(yaml.safe_dump_all(documents))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_random_text_raises_nothing_but_spec_error(text: str) -> None:
    _loads_or_spec_error(text)


@pytest.mark.parametrize("text", [
    "&a [*a]", "resources: &r {any_of: [*r]}", "resources: &r {cpus: *r}", "file_mounts: &f {/a: *f}",
    "!!python/object:os.system x", "[" * 5000, "? [a]\n: b", "\x00", "resources: {cpus: 2024-01-01}",
])
def test_hostile_yaml(text: str) -> None:
    _loads_or_spec_error(text)


def test_job_recovery_time_budget_and_backoff() -> None:
    pipeline = load_yaml_text("resources:\n  job_recovery:\n    max_duration: 2h\n"
                              "    backoff: {initial: 5s, max: 1m}\nrun: x\n")
    recovery = pipeline.tasks[0].candidates()[0].to_json()["job_recovery"]
    assert (recovery["max_duration_s"], recovery["backoff_initial_s"], recovery["backoff_max_s"]) == (7200, 5, 60)
    with pytest.raises(SpecError) as err:
        load_yaml_text("resources:\n  job_recovery:\n    max_duration: soon\n    backoff: {initial: 0}\nrun: x\n")
    assert err.value.problems == [
        'resources.job_recovery.max_duration: "soon" is not a duration like 90s, 30m or 2h',
        "resources.job_recovery.backoff.initial: 0 must be a positive duration",
    ]


def test_every_example_loads() -> None:
    from orchestrator.spec import load_entrypoint

    root = Path(__file__).resolve().parents[2] / "examples"
    for path in sorted(root.glob("*.yaml")):
        pipeline = load_entrypoint(str(path))
        assert pipeline.tasks and all(t.run for t in pipeline.tasks), path
        assert not [p for t in pipeline.tasks for p in t.unsupported_features()], path
