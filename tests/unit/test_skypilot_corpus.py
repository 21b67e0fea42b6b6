"""A corpus of task YAMLs in the forms SkyPilot users publish (`tests/support/fixtures/skypilot_yamls/`): each loads,
`--dryrun` plans it (or refuses it with one line saying "not supported yet"), and Sortie's normalization agrees
with what SkyPilot's own loader makes of it (`skypilot-normalized.jsonl`, written by
`normalize_with_skypilot.py` there with SkyPilot installed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import LocalCloudConfig, LocalRegion, SortieConfig
from orchestrator.launch_checks import launch_refusals
from orchestrator.spec import Candidate, load_entrypoint

CORPUS = Path(__file__).parents[1] / "support" / "fixtures" / "skypilot_yamls"
RECORDS = CORPUS / "skypilot-normalized.jsonl"
CONFIG = SortieConfig(local=LocalCloudConfig(regions=[LocalRegion(name="region-a")]))
CLOUDS = ("local", "aws", "gcp", "azure")
FILES = sorted(p.name for p in CORPUS.glob("*.yaml"))
# What `jobs launch` still refuses in this corpus, and why (README: SkyPilot task YAMLs).
REFUSED = {
    "config_overrides.yaml": "No feasible resources",  # Kubernetes has no offers in the optimizer yet
}


def test_the_corpus_covers_every_form() -> None:
    text = "\n".join((CORPUS / name).read_text() for name in FILES)
    for form in ("image_id: docker:", "ports:", "service:", "disk_tier:", "network_tier:", "A100:4, A100:8",
                 "pod_config:", "run_options:", "${BUCKET}", "url: https://", "tpu-v5e-8", "accelerator_args:",
                 "execution: parallel", "primary_tasks:", "termination_delay:", "us-east-1: ami-", "*/us-east-1",
                 "H200:8", "L40S", "MI300X", "Trainium", "A100-40GB", "T4:2", "H100:1", "B200"):
        assert form in text, form


@pytest.mark.parametrize("name", FILES)
def test_each_yaml_loads_and_dryrun_plans_or_refuses_in_one_line(name: str) -> None:
    pipeline = load_entrypoint(str(CORPUS / name))
    refusals = launch_refusals(pipeline, CONFIG, enabled=CLOUDS)
    if name in REFUSED:
        assert refusals and any(REFUSED[name] in line for line in refusals), refusals
        assert all("\n" not in line for line in refusals)
    else:
        assert refusals == []
    json.dumps(pipeline.to_json())


def _records() -> list[dict[str, Any]]:
    if not RECORDS.is_file():
        return []
    return [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]


def _theirs(c: dict[str, Any]) -> tuple[Any, ...]:
    given = any(c[k] is not None for k in ("strategy", "max_restarts_on_errors", "recover_on_exit_codes"))
    restarts = 0 if given and c["max_restarts_on_errors"] is None else c["max_restarts_on_errors"]
    return (c["cloud"], c["region"], c["zone"], c["cpus"], c["memory"],
            tuple(sorted((k, float(v)) for k, v in c["accelerators"].items())), c["use_spot"], c["disk_size"],
            c["instance_type"], c["strategy"], restarts, tuple(sorted(c["ports"] or ())), c["image_id"],
            c["disk_tier"], c["network_tier"], c["labels"] or {}, c["accelerator_args"] or {})


def _from_catalog(c: Candidate) -> tuple[Any, Any, dict[str, float]]:
    """(cpus, memory, accelerators) as SkyPilot's loader fills them in for a candidate that names only an instance
    type: from its catalog's row of that type. The records were made with SkyPilot's catalog seeded from Sortie's
    own catalogs (seed_skypilot_catalogs.py), so these values depend only on that seed: read them from Sortie's."""
    if not c.instance_type or c.cpus or c.memory or c.accelerators:
        return c.cpus, c.memory, dict(c.accelerators)
    from orchestrator.policy.optimizer import catalog_offers

    offer = next(o for o in catalog_offers([c.cloud or "aws"]) if o.instance_type == c.instance_type)
    return str(float(offer.vcpus)), str(float(offer.memory_gib)), {k: float(v) for k, v in offer.accelerators.items()}


def _ours(c: Candidate) -> tuple[Any, ...]:
    r = c.job_recovery
    data = c.to_json()
    cpus, memory, accelerators = _from_catalog(c)
    return (c.cloud, c.region, c.zone, cpus, memory, tuple(sorted(accelerators.items())), c.use_spot,
            c.disk_size, c.instance_type, r.strategy if r else None, r.max_restarts_on_errors if r else None,
            tuple(sorted(c.ports)), data["image_id"], c.disk_tier, c.network_tier, dict(c.labels),
            data["accelerator_args"])


def test_every_yaml_has_a_skypilot_record() -> None:
    if not RECORDS.is_file():
        pytest.skip(f"no {RECORDS.name}: run normalize_with_skypilot.py there with SkyPilot installed")
    assert {r["file"] for r in _records()} == set(FILES)


@pytest.mark.parametrize("record", [r for r in _records() if r["ok"]], ids=lambda r: r["file"])
def test_agrees_with_skypilot(record: dict[str, Any]) -> None:
    pipeline = load_entrypoint(str(CORPUS / record["file"]))
    assert len(pipeline.tasks) == len(record["tasks"])
    for task, theirs in zip(pipeline.tasks, record["tasks"], strict=True):
        assert (task.name, task.num_nodes, dict(task.envs), task.run) == (
            theirs["name"], theirs["num_nodes"], {k: str(v) for k, v in theirs["envs"].items()}, theirs["run"])
        assert sorted(map(repr, map(_ours, task.candidates()))) == sorted(
            map(repr, map(_theirs, theirs["candidates"])))
