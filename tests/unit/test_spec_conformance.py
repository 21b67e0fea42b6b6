"""Conformance: every task YAML of SkyPilot's own test suite loads in Sortie, and agrees with what SkyPilot
0.14.1's loader makes of it (`shared/conformance/`, next to the repository)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.spec import Candidate, load_entrypoint

CONFORMANCE = Path(__file__).resolve().parents[3] / "shared" / "conformance"
YAMLS = CONFORMANCE / "skypilot-test-yamls"
NORMALIZED = CONFORMANCE / "skypilot-0.14.1-normalized.jsonl"

pytestmark = pytest.mark.skipif(
    not YAMLS.is_dir() or not NORMALIZED.is_file(),
    reason=f"conformance data not found at {CONFORMANCE} (it lives in shared/, next to the repository)",
)


def _records() -> list[dict[str, Any]]:
    if not NORMALIZED.is_file():
        return []
    return [json.loads(line) for line in NORMALIZED.read_text().splitlines() if line.strip()]


def _yaml_files() -> list[str]:
    return sorted(p.name for p in YAMLS.iterdir() if p.suffix in (".yaml", ".yml")) if YAMLS.is_dir() else []


def _theirs(candidate: dict[str, Any]) -> tuple[Any, ...]:
    """SkyPilot's candidate as a comparable tuple. SkyPilot leaves max_restarts_on_errors unset (null) when
    job_recovery is given without it; Sortie resolves that to its meaning, 0."""
    recovery_given = any(candidate[k] is not None for k in ("strategy", "max_restarts_on_errors",
                                                            "recover_on_exit_codes"))
    restarts = candidate["max_restarts_on_errors"]
    if recovery_given and restarts is None:
        restarts = 0
    codes = candidate["recover_on_exit_codes"]
    if isinstance(codes, int):
        codes = [codes]
    return (
        candidate["cloud"], candidate["region"], candidate["zone"], candidate["cpus"], candidate["memory"],
        tuple(sorted((k, float(v)) for k, v in candidate["accelerators"].items())),
        candidate["use_spot"], candidate["disk_size"], candidate["instance_type"],
        candidate["strategy"], restarts, tuple(codes) if recovery_given and codes else None,
    )


def _ours(candidate: Candidate) -> tuple[Any, ...]:
    recovery = candidate.job_recovery
    return (
        candidate.cloud, candidate.region, candidate.zone, candidate.cpus, candidate.memory,
        tuple(sorted(candidate.accelerators.items())),
        candidate.use_spot, candidate.disk_size, candidate.instance_type,
        recovery.strategy if recovery else None,
        recovery.max_restarts_on_errors if recovery else None,
        (recovery.recover_on_exit_codes or None) if recovery else None,
    )


def test_every_yaml_has_a_record() -> None:
    recorded = {record["file"] for record in _records()}
    assert set(_yaml_files()) == recorded


@pytest.mark.parametrize("file_name", _yaml_files())
def test_every_yaml_loads(file_name: str) -> None:
    pipeline = load_entrypoint(str(YAMLS / file_name))
    assert pipeline.tasks
    for task in pipeline.tasks:
        assert task.candidates()
        json.dumps(task.to_json())


@pytest.mark.parametrize("record", [r for r in _records() if r["ok"]], ids=lambda r: r["file"])
def test_agrees_with_skypilot(record: dict[str, Any]) -> None:
    pipeline = load_entrypoint(str(YAMLS / record["file"]))
    assert pipeline.name == record["name"]
    assert len(pipeline.tasks) == len(record["tasks"])
    for ours, theirs in zip(pipeline.tasks, record["tasks"], strict=True):
        assert ours.name == theirs["name"]
        assert ours.num_nodes == theirs["num_nodes"]
        assert ours.envs == theirs["envs"]
        assert ours.setup == theirs["setup"]
        assert ours.run == theirs["run"]
        our_candidates = [_ours(c) for c in ours.candidates()]
        assert len(our_candidates) == len(set(our_candidates))
        assert set(our_candidates) == {_theirs(c) for c in theirs["candidates"]}


def _accelerator_choices(file_name: str) -> list[dict[str, float]]:
    (task,) = load_entrypoint(str(YAMLS / file_name)).tasks
    return [c.accelerators for c in task.candidates()]


def test_rejected_by_skypilot_0_14_1_but_accepted_by_newer_skypilot_and_sortie() -> None:
    rejected = sorted(r["file"] for r in _records() if not r["ok"])
    assert rejected == ["test_list_of_dicts_accelerators.yaml", "test_mixed_list_accelerators.yaml"]
    # A list is ordered alternatives, whatever the form of each item.
    assert _accelerator_choices("test_list_of_dicts_accelerators.yaml") == [{"T4": 1.0}, {"L4": 1.0}]
    assert _accelerator_choices("test_mixed_list_accelerators.yaml") == [{"T4": 1.0}, {"V100": 2.0}, {"A100": 1.0}]
    for file_name in rejected:
        (task,) = load_entrypoint(str(YAMLS / file_name)).tasks
        assert task.resources_ordered()
        assert task.run is not None and task.setup is not None


def test_notes_of_the_conformance_readme() -> None:
    # A pipeline of unnamed tasks when the first document is a task.
    retry = load_entrypoint(str(YAMLS / "test_managed_jobs_retry.yaml"))
    assert retry.is_pipeline and retry.name is None and [t.name for t in retry.tasks] == [None, None]
    (first,) = retry.tasks[0].candidates()
    assert first.job_recovery is not None and first.job_recovery.max_restarts_on_errors == 1
    # ${VAR} from envs is filled into file_mounts (here: an empty bucket name), and the bucket parses.
    (writer,) = load_entrypoint(str(YAMLS / "test_managed_jobs_mount_cached_writer.yaml")).tasks
    assert writer.envs == {"TEST_BUCKET": "", "MARKER": ""}
    assert writer.storage_mounts == {"/mnt/cached": {"name": "", "mode": "MOUNT_CACHED"}}
    assert writer.unsupported_features() == []  # buckets are supported; the empty name is refused at launch:
    from orchestrator.config import SortieConfig
    from orchestrator.storage import StorageError
    from orchestrator.storage.staging import prepare

    with pytest.raises(StorageError, match="the bucket name is empty"):
        prepare(load_entrypoint(str(YAMLS / "test_managed_jobs_mount_cached_writer.yaml")), SortieConfig(),
                Path("/nonexistent-sortie-home"))
    # A set of accelerators is unordered; a list is ordered.
    (unordered,) = load_entrypoint(str(YAMLS / "test_multiple_accelerators_unordered_with_default.yaml")).tasks
    assert not unordered.resources_ordered()
    (ordered,) = load_entrypoint(str(YAMLS / "test_multiple_resources_ordered.yaml")).tasks
    assert ordered.resources_ordered()
    assert [c.accelerators for c in ordered.candidates()] == [
        {"A100-40GB": 1.0}, {"T4": 1.0}, {"V100": 1.0}, {"K80": 1.0}
    ]
