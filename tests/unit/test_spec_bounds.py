"""Bounds and path rules of task YAMLs (issue 17, items 1 and 2), and a hypothesis fuzz of them."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.errors import SortieError
from orchestrator.node.agent import destination_parts
from orchestrator.spec import Overrides, SpecError, load_yaml_text, values

FUZZ_EXAMPLES = int(os.environ.get("SORTIE_FUZZ_EXAMPLES", "300"))


def problems(text: str, base: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_yaml_text(textwrap.dedent(text), Overrides(), base, source="task.yaml")
    return info.value.problems


@pytest.mark.parametrize("dest", ["../../../../../../../tmp/victim", "a/../../b", "~/../x", "/data/../../etc", ".."])
def test_file_mount_destinations_cannot_go_up(tmp_path: Path, dest: str) -> None:
    (tmp_path / "src").mkdir()
    found = problems(f"run: echo\nfile_mounts:\n  {dest!r}: ./src\n", tmp_path)
    assert len(found) == 1 and "file_mounts" in found[0] and "'..'" in found[0], found
    found = problems(f"run: echo\nfile_mounts:\n  {dest!r}: s3://some-bucket\n", tmp_path)
    assert len(found) == 1 and "'..'" in found[0], found


@pytest.mark.parametrize(("yaml_text", "field", "words"), [
    ("num_nodes: 1000000000\nrun: x\n", "num_nodes", "must be <= 10000"),
    ("num_nodes: 100000000000000000000000\nrun: x\n", "num_nodes", "must be <= 10000"),
    (f"name: {'a' * 300}\nrun: x\n", "name", "at most 255"),
    ("envs: {A: \"a\\0b\"}\nrun: x\n", "envs.A", "NUL"),
    ("secrets: {A: \"a\\0b\"}\nrun: x\n", "secrets.A", "NUL"),
    ("run: \"echo a\\0b\"\n", "run", "NUL"),
    ("setup: \"echo a\\0b\"\nrun: x\n", "setup", "NUL"),
    (f"run: {'x' * 200_000}\n", "run", "at most 100,000 bytes"),
    (f"envs: {{A: {'x' * 200_000}}}\nrun: x\n", "envs.A", "at most 100,000 bytes"),
    ("resources: {autostop: -5}\nrun: x\n", "resources.autostop", "0 or more"),
    ("resources: {any_of: []}\nrun: x\n", "resources.any_of", "must not be empty"),
    ("resources: {ordered: []}\nrun: x\n", "resources.ordered", "must not be empty"),
    ("resources: {job_recovery: {backoff: {initial: 10m, max: 1m}}}\nrun: x\n",
     "resources.job_recovery.backoff", "longer than max"),
])
def test_out_of_bounds_values_are_refused_naming_the_field(tmp_path: Path, yaml_text: str, field: str,
                                                           words: str) -> None:
    found = problems(yaml_text, tmp_path)
    assert len(found) == 1, found
    assert found[0].startswith(field) and words in found[0], found
    assert len(found[0]) < 300 and "\n" not in found[0]


def test_too_many_envs_and_tasks_and_a_huge_yaml_are_refused_fast(tmp_path: Path) -> None:
    envs = "\n".join(f"  V{i}: x" for i in range(values.MAX_ENV_COUNT + 1))
    found = problems(f"run: x\nenvs:\n{envs}\n", tmp_path)
    assert found[0].startswith("envs") and f"at most {values.MAX_ENV_COUNT}" in found[0]
    started = time.monotonic()
    found = problems("\n---\n".join("run: echo hi" for _ in range(2000)), tmp_path)
    assert found == [f"task.yaml: a pipeline has at most {values.MAX_PIPELINE_TASKS} tasks, not 2000"]
    found = problems(f"run: echo\nenvs: {{A: {'x' * 20_000_000}}}\n", tmp_path)
    assert "at most 2 MiB" in found[0]
    assert time.monotonic() - started < 10  # 2,000 tasks once took 23 s, a 20 MB value 22-30 s


def test_autostop_and_bounds_that_hold_are_accepted(tmp_path: Path) -> None:
    pipeline = load_yaml_text(f"name: {'a' * 255}\nnum_nodes: 8\nresources: {{autostop: 10}}\nrun: x\n",
                              Overrides(), tmp_path)
    assert pipeline.tasks[0].num_nodes == 8


# ---- fuzz ----------------------------------------------------------------------------------------------------

_SEGMENT = st.sampled_from(["..", ".", "", "a", "b", "~", "x y", "\0", "tmp", "etc"])
_DEST = st.builds(lambda head, parts: head + "/".join(parts), st.sampled_from(["", "/", "~/", "~", "./"]),
                  st.lists(_SEGMENT, max_size=6))
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**25), max_value=10**25),
                    st.text(max_size=20), st.floats(allow_nan=True))
_TASK = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.text(max_size=300), _SCALAR),
    "num_nodes": _SCALAR,
    "run": st.one_of(st.text(max_size=50), _SCALAR),
    "setup": st.one_of(st.text(max_size=50), _SCALAR),
    "envs": st.dictionaries(st.text(max_size=5), _SCALAR, max_size=3),
    "secrets": st.dictionaries(st.text(max_size=5), _SCALAR, max_size=3),
    "file_mounts": st.dictionaries(_DEST, st.sampled_from(["./src", "s3://b", "local://b",
                                                            "{source: ./src, mode: COPY}"]), max_size=3),
    "resources": st.fixed_dictionaries({}, optional={
        "autostop": _SCALAR, "any_of": st.lists(st.just({}), max_size=2),
        "job_recovery": st.fixed_dictionaries({}, optional={"backoff": st.fixed_dictionaries(
            {}, optional={"initial": _SCALAR, "max": _SCALAR})})}),
})


_SERVICES: dict[str, object] = {}


def _fuzz_service(tmp_path_factory):  # one home for every example: a refusal must leave its DB empty
    from orchestrator.service import JobService

    if "service" not in _SERVICES:
        home = tmp_path_factory.getbasetemp() / "fuzz-home"
        home.mkdir(exist_ok=True)
        _SERVICES["service"] = JobService(home)
    return _SERVICES["service"]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(task=_TASK)
def test_fuzz_accepted_specs_stay_in_bounds_and_refusals_are_one_liners(task: dict, tmp_path_factory) -> None:
    base = tmp_path_factory.getbasetemp() / "fuzz-base"
    (base / "src").mkdir(parents=True, exist_ok=True)
    mounts = task.get("file_mounts") or {}
    if mounts:
        task = {**task, "file_mounts": {k: (yaml.safe_load(v) if v.startswith("{") else v) for k, v in mounts.items()}}
    text = yaml.safe_dump(task, allow_unicode=True)
    try:
        pipeline = load_yaml_text(text, Overrides(), base, source="fuzz.yaml")
    except SpecError as exc:
        assert exc.problems and all(isinstance(p, str) and p and "Traceback" not in p for p in exc.problems)
        return
    service = _fuzz_service(tmp_path_factory)
    try:  # what `jobs launch` checks next, before it writes anything
        service.plan_storage(pipeline)
    except SortieError as exc:
        assert "\n" not in str(exc) and "Traceback" not in str(exc)
        assert service.store.count_by_status() == {}  # no refusal writes a row
    for spec_task in pipeline.tasks:
        assert 1 <= spec_task.num_nodes <= values.MAX_NUM_NODES
        assert spec_task.name is None or len(spec_task.name) <= values.MAX_NAME_LENGTH
        for command in (spec_task.run, spec_task.setup):
            assert command is None or ("\0" not in command and len(command) <= values.MAX_COMMAND_BYTES)
        for value in [*spec_task.envs.values(), *spec_task.secrets.values()]:
            assert "\0" not in value
        for dest in [*spec_task.file_mounts, *spec_task.storage_mounts]:
            destination_parts(dest)  # no `..`, no NUL: what the agent also demands


def test_num_nodes_against_the_configured_maximum_and_local_capacity(tmp_path: Path) -> None:
    from orchestrator.config import SortieConfig
    from orchestrator.policy.limits import num_nodes_problems

    def tasks(text: str) -> list:
        return list(load_yaml_text(text, Overrides(), tmp_path).tasks)

    config = SortieConfig()
    assert num_nodes_problems(tasks("num_nodes: 16\nrun: x\n"), config, lambda: ["local"]) == []
    (line,) = num_nodes_problems(tasks("num_nodes: 1000\nrun: x\n"), config, lambda: ["local"])
    assert line.startswith("num_nodes: 1000 is over jobs.max_num_nodes (512)")
    (line,) = num_nodes_problems(tasks("num_nodes: 17\nrun: x\n"), config, lambda: ["local"])
    assert "never fit" in line and "at most 16" in line and "local.regions[].capacity" in line
    # A task that may also go to an enabled cloud is that cloud's to refuse; an explicit local one is not.
    assert num_nodes_problems(tasks("num_nodes: 17\nrun: x\n"), config, lambda: ["local", "aws"]) == []
    (line,) = num_nodes_problems(tasks("num_nodes: 17\nresources: {infra: local}\nrun: x\n"), config,
                                 lambda: ["local", "aws"])
    assert "never fit" in line
    big = SortieConfig.model_validate({"local": {"regions": [{"name": "a", "capacity": 4}, {"name": "b"}]}})
    assert big.local.regions[1].capacity == 16
    unlimited = SortieConfig.model_validate({"local": {"regions": [{"name": "a", "capacity": None}]}})
    assert num_nodes_problems(tasks("num_nodes: 500\nrun: x\n"), unlimited, lambda: ["local"]) == []


def test_nesting_and_special_files_name_the_field_and_line(tmp_path: Path) -> None:
    from orchestrator.config import SortieConfig
    from orchestrator.errors import SortieError
    from orchestrator.storage.staging import prepare

    deep = "[" * 3000 + "]" * 3000
    found = problems(f"name: n\nrun: x\nenvs:\n  A: {deep}\n", tmp_path)
    assert found == ["task.yaml: envs: nested too deeply at line 4; flatten it"], found
    loop = "run: x\nenvs: &e\n  A: *e\n"
    found = problems(loop, tmp_path)
    assert len(found) == 1 and found[0].startswith("envs"), found
    pipeline = load_yaml_text("run: x\nfile_mounts:\n  /data/zero: /dev/zero\n", Overrides(), tmp_path,
                              source="task.yaml")
    with pytest.raises(SortieError) as err:
        prepare(pipeline, SortieConfig(), tmp_path)
    assert str(err.value).startswith("file_mounts./data/zero (task.yaml line 3): /dev/zero is neither a file")


def test_huge_dotenv_files_and_too_many_labels_are_refused_fast(tmp_path: Path) -> None:
    """Issue 28: an --env-file of 5 million lines took 194 s and 1.3 GB to refuse, a 100 MB value 39 s, and 50,000
    `resources.labels` were accepted. Sizes are checked before parsing (bytes, then lines), and labels bounded."""
    from orchestrator.spec import load_entrypoint
    from orchestrator.spec.overrides import MAX_DOTENV_BYTES, MAX_DOTENV_LINES

    def refused(**flags: str) -> list[str]:
        with pytest.raises(SpecError) as info:
            load_entrypoint("echo hi", Overrides(**flags))
        return info.value.problems

    lines = tmp_path / "lines.env"
    lines.write_text("A=1\n" * (MAX_DOTENV_LINES + 1))
    big = tmp_path / "big.env"
    big.write_bytes(b"A=" + b"x" * (MAX_DOTENV_BYTES + 10) + b"\n")
    many = tmp_path / "many.env"
    many.write_text("".join(f"V{i}=x\n" for i in range(values.MAX_ENV_COUNT + 5)))
    wrong = tmp_path / "wrong.env"
    wrong.write_text("not a pair\n" * 50_000)
    started = time.monotonic()
    assert "lines" in refused(env_file=str(lines))[0]
    assert "MiB" in refused(env_file=str(big))[0]
    assert "MiB" in refused(secret_file="/dev/zero")[0]  # read no further than the bound
    assert f"at most {values.MAX_ENV_COUNT} variables" in refused(env_file=str(many))[-1]
    assert len(refused(env_file=str(wrong))) <= 21  # the first 20 wrong lines, then one line saying there are more
    assert time.monotonic() - started < 10
    labels = "\n".join(f"    k{i}: v" for i in range(values.MAX_LABELS + 1))
    found = problems(f"run: x\nresources:\n  labels:\n{labels}\n", tmp_path)
    assert len(found) == 1 and found[0].startswith("resources.labels") and str(values.MAX_LABELS) in found[0], found
    found = problems(f"run: x\nresources:\n  labels:\n    k: {'v' * 300}\n", tmp_path)
    assert len(found) == 1 and "resources.labels" in found[0], found
