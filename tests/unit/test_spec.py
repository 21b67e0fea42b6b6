"""Unit tests of orchestrator.spec: SkyPilot-compatible task YAMLs, overrides, candidates, errors, schema."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from orchestrator.errors import UsageError
from orchestrator.spec import (
    Candidate,
    JobRecoverySpec,
    Overrides,
    SpecError,
)
from tests.support.spec_text import accelerators, load, one, problems

# ---- SpecError ----------------------------------------------------------------------------------------------


def test_spec_error_is_a_usage_error_with_one_line_per_problem() -> None:
    err = SpecError(["a: one", "b: two"])
    assert isinstance(err, UsageError)
    assert err.exit_code == 2
    assert str(err) == "a: one\nb: two"
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == ["a: one", "b: two"]
    assert SpecError(["x: a\nb"]).problems == ["x: a\\nb"]


# ---- plain fields -------------------------------------------------------------------------------------------


def test_minimal_task_and_defaults() -> None:
    pipeline = load("run: echo hi\n")
    assert not pipeline.is_pipeline and pipeline.name is None
    (task,) = pipeline.tasks
    assert task.run == "echo hi" and task.setup is None and task.num_nodes == 1
    assert task.envs == {} and task.secrets == {} and task.file_mounts == {} and task.storage_mounts == {}
    (candidate,) = task.candidates()
    assert candidate == Candidate(infra=None, cloud=None, region=None, zone=None, cpus=None, memory=None)
    assert candidate.disk_size == 256 and not candidate.use_spot and candidate.num_gpus() == 0


BAD_INPUTS = [
    ("resources:\n  cpus: four\n", ['resources.cpus: "four" is not a number or a range like 4+']),
    ("resources:\n  cpus: 0\n", ["resources.cpus: must be more than 0, not 0"]),
    ("resources:\n  cpus: [4]\n", ["resources.cpus: [4] is not a number or a range like 4+"]),
    ("resources:\n  memory: lots\n",
     ['resources.memory: "lots" is not a number (GiB), a size like 32GB, or a range like 16+']),
    ("resources:\n  cpu: 4\n", ["resources.cpu: unknown field; did you mean cpus?"]),
    ("resources:\n  accelerator: V100\n", ["resources.accelerator: unknown field; did you mean accelerators?"]),
    ("resourcs:\n  cpus: 4\n", ["resourcs: unknown field; did you mean resources?"]),
    ("resources:\n  job_recovery:\n    max_restarts_on_errors: -1\n",
     ["resources.job_recovery.max_restarts_on_errors: must be >= 0"]),
    ("resources:\n  job_recovery:\n    strategy: bogus\n",
     ['resources.job_recovery.strategy: "bogus" is not a recovery strategy; use FAILOVER or EAGER_NEXT_REGION']),
    ("resources:\n  job_recovery:\n    recover_on_exit_codes: [1, 1]\n",
     ["resources.job_recovery.recover_on_exit_codes[1]: exit code 1 is listed twice"]),
    ("resources:\n  job_recovery:\n    recover_on_exit_codes: 256\n",
     ["resources.job_recovery.recover_on_exit_codes: 256 is not an exit code (a whole number 0-255)"]),
    ("resources:\n  job_recovery:\n    retries: 1\n",
     ["resources.job_recovery.retries: unknown field (fields here: backoff, max_duration, max_restarts_on_errors, "
      "recover_on_exit_codes, "
      "strategy)"]),
    ("resources:\n  job_recovery: 5\n",
     ["resources.job_recovery: must be a strategy name (FAILOVER or EAGER_NEXT_REGION) or a mapping with strategy, "
      "max_restarts_on_errors and recover_on_exit_codes, not a number"]),
    ("resources:\n  infra: aws\n  cloud: gcp\n",
     ["resources: infra and cloud cannot both be given; use infra, like aws/us-east-1"]),
    ("resources:\n  infra: awz/us-east-1\n", ['resources.infra: unknown cloud "awz"; did you mean aws?']),
    ("resources:\n  infra: aws/a/b/c\n",
     ['resources.infra: "aws/a/b/c" has too many parts; write cloud, cloud/region or cloud/region/zone']),
    ("resources:\n  infra: aws//b\n",
     ['resources.infra: "aws//b" has an empty part; write cloud, cloud/region or cloud/region/zone']),
    ("resources:\n  any_of: [{infra: aws}]\n  ordered: [{infra: gcp}]\n",
     ["resources: any_of and ordered cannot both be given; use one"]),
    ("resources:\n  cloud: aws\n  any_of: [{infra: aws}]\n",
     ["resources.any_of[0]: infra here and cloud in resources cannot be combined; use infra in both"]),
    ("resources:\n  accelerators: [A100, T4]\n  any_of: [{infra: aws}]\n",
     ["resources.accelerators: an ordered list of accelerators cannot be combined with any_of; use a set "
      "{'A100:1', 'T4:1'} or put each in an any_of entry"]),
    ("resources:\n  accelerators: [A100, T4]\n  ordered: [{infra: aws}]\n",
     ["resources.accelerators: several accelerators cannot be combined with ordered; put each in an ordered entry"]),
    ("resources:\n  accelerators: [A100, {T4: x}]\n",
     ['resources.accelerators[1]: the count of "T4" must be a number, not "x"']),
    ("resources:\n  accelerators: V100:x\n",
     ['resources.accelerators: "V100:x" is not an accelerator like V100 or V100:2']),
    ("resources:\n  accelerators: {}\n",
     ["resources.accelerators: names no accelerator; write one like V100:1, or remove the field"]),
    ("resources:\n  accelerators: '24GB+:1'\n",
     ['resources.accelerators: "24GB+:1" selects GPUs by memory, which Sortie does not support yet; name them, '
      "like L4:1"]),
    ("resources:\n  gpus: H100\n  accelerators: A100\n",
     ["resources: gpus and accelerators are the same field; give one"]),
    ("resources:\n  any_of: [{accelerators: [A100, T4]}, {any_of: []}, {gpu: 1}]\n",
     ["resources.any_of[0].accelerators: only one accelerator here, like A100:1 (put alternatives in separate any_of "
      "entries)",
      "resources.any_of[1].any_of: any_of and ordered cannot be nested",
      "resources.any_of[2].gpu: unknown field; did you mean gpus?"]),
    ("resources: 4\n", ["resources: must be a mapping of fields (key: value), not a number"]),
    ("resources:\n  any_of: {infra: aws}\n", ["resources.any_of: must be a list, not a mapping"]),
    ("resources:\n  labels: {a: 1}\n", ["resources.labels.a: must be text, not 1"]),
    ("resources:\n  use_spot: maybe\n", ['resources.use_spot: must be true or false, not "maybe"']),
    ("resources:\n  disk_size: 1.5\n", ["resources.disk_size: must be a whole number of GiB, not 1.5"]),
    ("resources:\n  ports: [80, 70000]\n",
     ["resources.ports[1]: 70000 is not a port (1-65535) or a range like 8000-8010"]),
    ("resources:\n  disk_tier: fast\n",
     ['resources.disk_tier: "fast" is not a disk tier; use one of low, medium, high, ultra, best']),
    ("resources:\n  priority: 1\n", ["resources.priority: job priorities are not supported yet"]),
    ("name: my job\nnum_nodes: 0\nrun: 5\n",
     ['name: "my job" is not a valid name (letters and digits, joined by single or double . _ -; it must start and '
      "end with a letter or digit)",
      "num_nodes: must be >= 1",
      "run: must be text, not 5"]),
    ("num_nodes: '2'\n", ['num_nodes: must be a whole number, not "2"']),
    ("envs:\n  1X: a\n  C: [1]\n",
     ["envs.1X: not a variable name (letters, digits and _, not starting with a digit)",
      "envs.C: must be text (or a number, or true/false), not a list"]),
    ("secrets: [MY_SECRET]\n",
     ["secrets: must be a mapping NAME: value (references to managed secrets are not supported yet)"]),
    ("workdir: {url: 'https://u:p@github.com/x/y'}\n",
     ["workdir.url: put no credentials in the URL (they would be shown); give the token as a secret"]),
    ("run: x\nconfig: {aws: {labels: {a: b}}, docker: {run_options: 3}}\n",
     ["config.aws: not supported yet (Sortie applies: kubernetes.pod_config, docker.run_options)",
      "config.docker.run_options: must be text or a list of texts like --shm-size=16g"]),
    ("storage_mounts: {}\n", ["storage_mounts: not a task field; buckets go under file_mounts"]),
    ("file_mounts:\n  /b/: .\n  s3://x: .\n", [
        "file_mounts./b/: remove the trailing slash from the destination",
        "file_mounts.s3://x: a mount destination is a path on the node, not a bucket URL"]),
    ("file_mounts:\n  /c: {name: x, mode: foo, extra: 1}\n  /d: {}\n", [
        'file_mounts./c.mode: "foo" is not a mount mode; use one of MOUNT, COPY, MOUNT_CACHED',
        "file_mounts./c.extra: unknown field (fields here: config, mode, mount_options, name, persistent, source, "
        "store, type)",
        "file_mounts./d: a storage mount needs a name or a source"]),
    ("a: b: c\n", ["task.yaml: not valid YAML at line 1: mapping values are not allowed here"]),
    ("run: |\n  ok\nresources:\n  cpus: [4\n",
     ["task.yaml: not valid YAML at line 5: expected ',' or ']', but got '<stream end>'"]),
    ("", ["task.yaml: the file is empty; a task needs at least `run: ...`"]),
    ("# only a comment\n", ["task.yaml: the file is empty; a task needs at least `run: ...`"]),
    ("- run: a\n- run: b\n", ["task.yaml: a task is a mapping of fields like `run: echo hi`, not a list"]),
    ("echo hi\n", ["task.yaml: expected a task (fields like `run: echo hi`), found only text"]),
]


@pytest.mark.parametrize(("text", "expected"), BAD_INPUTS, ids=[case[0][:40] for case in BAD_INPUTS])
def test_bad_input_messages(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_all_problems_of_a_document_are_reported_together() -> None:
    found = problems("""\
        name: ok
        num_nodes: -1
        resources:
          cpus: four
          memory: 0
          job_recovery: {max_restarts_on_errors: -2}
        envs: {A: null}
    """)
    assert found == [
        "num_nodes: must be >= 1",
        'resources.cpus: "four" is not a number or a range like 4+',
        "resources.memory: must be more than 0, not 0",
        "resources.job_recovery.max_restarts_on_errors: must be >= 0",
        "envs.A: no value; pass --env A=... or set it in the YAML",
    ]


def test_pipeline_problems_name_the_task() -> None:
    found = problems("name: p\n---\nrun: x\n---\nresources: {cpus: x}\n---\n- 1\n")
    assert found == [
        'task[1].resources.cpus: "x" is not a number or a range like 4+',
        "task[2]: a task is a mapping of fields like `run: echo hi`, not a list",
    ]


# ---- resources ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("written", "stored"), [
    ("2", "2"), ("4.5", "4.5"), ("'4'", "4"), ("4+", "4+"), ("'0.5+'", "0.5+"),
])
def test_cpus_keep_skypilots_string_form(written: str, stored: str) -> None:
    (candidate,) = one(f"resources:\n  cpus: {written}\n").candidates()
    assert candidate.cpus == stored


@pytest.mark.parametrize(("written", "stored"), [
    ("16", "16"), ("16+", "16+"), ("32GB", "32"), ("512MB+", "0.5+"), ("1TB", "1024"), ("7.5", "7.5"),
])
def test_memory_in_gib(written: str, stored: str) -> None:
    (candidate,) = one(f"resources:\n  memory: {written}\n").candidates()
    assert candidate.memory == stored


@pytest.mark.parametrize(("written", "size"), [("100", 100), ("512GB", 512), ("1TB", 1024)])
def test_disk_size(written: str, size: int) -> None:
    (candidate,) = one(f"resources:\n  disk_size: {written}\n").candidates()
    assert candidate.disk_size == size


@pytest.mark.parametrize(("written", "expected"), [
    ("V100", [{"V100": 1.0}]),
    ("V100:1", [{"V100": 1.0}]),
    ("V100:0.5", [{"V100": 0.5}]),
    ("h100:8", [{"H100": 8.0}]),
    ("tpu-v4-8", [{"tpu-v4-8": 1.0}]),
    ("{H100: 1}", [{"H100": 1.0}]),
    ("[A100:1, T4:1]", [{"A100": 1.0}, {"T4": 1.0}]),
    ("{'A100:1', 'T4:1'}", [{"A100": 1.0}, {"T4": 1.0}]),
    ("{A100: 2, T4: null}", [{"A100": 2.0}, {"T4": 1.0}]),
    ("[{T4: 1}, {L4: 1}]", [{"T4": 1.0}, {"L4": 1.0}]),
    ("[{T4: 1}, 'V100:2', {A100: 1}]", [{"T4": 1.0}, {"V100": 2.0}, {"A100": 1.0}]),
    ("[A100, A100:1]", [{"A100": 1.0}]),
])
def test_accelerator_forms(written: str, expected: list[dict[str, float]]) -> None:
    assert accelerators(one(f"resources:\n  accelerators: {written}\n")) == expected


def test_list_is_ordered_and_set_is_not() -> None:
    assert one("resources:\n  accelerators: [A100, T4]\n").resources_ordered()
    assert not one("resources:\n  accelerators: {'A100', 'T4'}\n").resources_ordered()
    assert not one("resources:\n  any_of: [{infra: aws}, {infra: gcp}]\n").resources_ordered()
    assert one("resources:\n  ordered: [{infra: aws}, {infra: gcp}]\n").resources_ordered()


def test_gpus_is_an_alias_of_accelerators() -> None:
    assert accelerators(one("resources:\n  gpus: H100:8\n")) == [{"H100": 8.0}]


@pytest.mark.parametrize(("infra", "cloud", "region", "zone", "normalized"), [
    ("local", "local", None, None, "local"),
    ("local/region-a", "local", "region-a", None, "local/region-a"),
    ("aws", "aws", None, None, "aws"),
    ("AWS/us-east-1", "aws", "us-east-1", None, "aws/us-east-1"),
    ("aws/us-east-1/us-east-1a", "aws", "us-east-1", "us-east-1a", "aws/us-east-1/us-east-1a"),
    ("gcp/us-central1", "gcp", "us-central1", None, "gcp/us-central1"),
    ("azure/eastus", "azure", "eastus", None, "azure/eastus"),
    ("k8s", "kubernetes", None, None, "kubernetes"),
    ("kubernetes/my-ctx", "kubernetes", "my-ctx", None, "kubernetes/my-ctx"),
    ("k8s/arn:aws:eks:us-east-1:1:cluster/c", "kubernetes", "arn:aws:eks:us-east-1:1:cluster/c", None,
     "kubernetes/arn:aws:eks:us-east-1:1:cluster/c"),
    ("*/us-east-1", None, "us-east-1", None, "*/us-east-1"),
    ("*", None, None, None, None),
])
def test_infra(infra: str, cloud: str | None, region: str | None, zone: str | None, normalized: str | None) -> None:
    task = one(f"resources:\n  infra: '{infra}'\n")
    (candidate,) = task.candidates()
    assert (candidate.cloud, candidate.region, candidate.zone, candidate.infra) == (cloud, region, zone, normalized)
    assert task.resources.infra == normalized


def test_older_cloud_region_zone() -> None:
    (candidate,) = one("resources:\n  cloud: AWS\n  region: us-west-2\n  zone: us-west-2b\n").candidates()
    assert (candidate.infra, candidate.cloud, candidate.region, candidate.zone) == (
        "aws/us-west-2/us-west-2b", "aws", "us-west-2", "us-west-2b")


@pytest.mark.parametrize(("written", "expected"), [
    ("failover", JobRecoverySpec("FAILOVER", 0, ())),
    ("EAGER_NEXT_REGION", JobRecoverySpec("EAGER_NEXT_REGION", 0, ())),
    ("{strategy: FAILOVER, max_restarts_on_errors: 3, recover_on_exit_codes: 33}",
     JobRecoverySpec("FAILOVER", 3, (33,))),
    ("{strategy: null, recover_on_exit_codes: [33, 34]}", JobRecoverySpec(None, 0, (33, 34))),
    ("{max_restarts_on_errors: 1}", JobRecoverySpec(None, 1, ())),
    ("none", None),
    ("{strategy: none, max_restarts_on_errors: 2}", None),
])
def test_job_recovery_forms(written: str, expected: JobRecoverySpec | None) -> None:
    (candidate,) = one(f"resources:\n  job_recovery: {written}\n").candidates()
    assert candidate.job_recovery == expected


def test_spot_recovery_is_the_old_name_of_job_recovery() -> None:
    (candidate,) = one("resources:\n  spot_recovery: FAILOVER\n").candidates()
    assert candidate.job_recovery == JobRecoverySpec("FAILOVER", 0, ())


def test_any_of_overrides_the_base_and_merges_labels() -> None:
    task = one("""\
        resources:
          cpus: 4+
          use_spot: true
          labels: {team: ml}
          job_recovery: FAILOVER
          any_of:
            - infra: aws/us-east-1
              labels: {tier: a}
            - infra: gcp
              cpus: 8
              use_spot: false
            - infra: gcp
              cpus: 8
              use_spot: false
    """)
    first, second = task.candidates()
    assert (first.infra, first.cpus, first.use_spot, first.labels) == ("aws/us-east-1", "4+", True,
                                                                       {"team": "ml", "tier": "a"})
    assert (second.infra, second.cpus, second.use_spot, second.labels) == ("gcp", "8", False, {"team": "ml"})
    assert first.job_recovery == second.job_recovery == JobRecoverySpec("FAILOVER", 0, ())


def test_a_set_of_accelerators_times_any_of() -> None:
    task = one("resources:\n  accelerators: {'A100:1', 'T4:1'}\n  any_of: [{cloud: aws}, {cloud: gcp}]\n")
    pairs = {(c.cloud, next(iter(c.accelerators))) for c in task.candidates()}
    assert pairs == {("aws", "A100"), ("aws", "T4"), ("gcp", "A100"), ("gcp", "T4")}


def test_ordered_keeps_the_order() -> None:
    task = one("resources:\n  ordered:\n    - infra: gcp\n    - infra: aws\n      accelerators: T4\n")
    assert [(c.infra, c.accelerators) for c in task.candidates()] == [("gcp", {}), ("aws", {"T4": 1.0})]


def test_candidate_json_and_hash() -> None:
    (candidate,) = one("resources:\n  infra: aws/us-east-1\n  accelerators: H100:8\n"
                       "  job_recovery: {max_restarts_on_errors: 2}\n").candidates()
    assert candidate.to_json() == {
        "infra": "aws/us-east-1", "cloud": "aws", "region": "us-east-1", "zone": None, "cpus": None, "memory": None,
        "accelerators": {"H100": 8.0}, "instance_type": None, "use_spot": False, "disk_size": 256,
        "job_recovery": {"strategy": None, "max_restarts_on_errors": 2, "recover_on_exit_codes": [],
                         "max_duration_s": None, "backoff_initial_s": None, "backoff_max_s": None},
        "disk_tier": None, "network_tier": None, "ports": [], "image_id": None, "labels": {}, "accelerator_args": {},
    }
    assert candidate.num_gpus() == 8.0
    assert len({candidate, candidate}) == 1


# ---- envs, secrets, file mounts -----------------------------------------------------------------------------


def test_envs_become_text_and_empty_values_are_fine() -> None:
    task = one("envs:\n  A: ''\n  B: 3\n  C: 1.5\n  D: true\n  E: text\n")
    assert task.envs == {"A": "", "B": "3", "C": "1.5", "D": "True", "E": "text"}


def test_null_env_names_the_variable_and_is_fixed_by_env() -> None:
    text = "envs:\n  TEST_BUCKET: null\nrun: echo $TEST_BUCKET\n"
    assert problems(text) == ["envs.TEST_BUCKET: no value; pass --env TEST_BUCKET=... or set it in the YAML"]
    assert one(text, Overrides(envs=(("TEST_BUCKET", "b"),))).envs == {"TEST_BUCKET": "b"}


def test_null_secret_is_fixed_by_secret() -> None:
    text = "secrets:\n  TOKEN: null\n"
    assert problems(text) == ["secrets.TOKEN: no value; pass --secret TOKEN=... or set it in the YAML"]
    assert one(text, Overrides(secrets=(("TOKEN", "s3cr3t"),))).secrets == {"TOKEN": "s3cr3t"}


def test_env_and_secret_without_value_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_SHELL", "shell-value")
    monkeypatch.delenv("NOT_IN_SHELL", raising=False)
    task = one("envs:\n  FROM_SHELL: null\n", Overrides(envs=(("FROM_SHELL", None),),
                                                          secrets=(("FROM_SHELL", None),)))
    assert task.envs == {"FROM_SHELL": "shell-value"} and task.secrets == {"FROM_SHELL": "shell-value"}
    assert problems("run: x\n", Overrides(envs=(("NOT_IN_SHELL", None),))) == [
        "--env NOT_IN_SHELL: NOT_IN_SHELL is not set in your environment; pass --env NOT_IN_SHELL=VALUE"
    ]


def test_env_file_then_env(tmp_path: Path) -> None:
    (tmp_path / "vars.env").write_text(
        "# settings\nA=from-file\nexport B = 'quoted # kept'\nC=\"two\\nlines\"\nD=plain # comment\n\nE=\n"
    )
    task = one("envs:\n  A: yaml\n  Z: yaml\n", Overrides(env_file="vars.env", envs=(("B", "from-flag"),)), tmp_path)
    assert task.envs == {"A": "from-file", "Z": "yaml", "B": "from-flag", "C": "two\nlines", "D": "plain", "E": ""}


def test_env_file_problems(tmp_path: Path) -> None:
    (tmp_path / "bad.env").write_text("OK=1\nno equals sign\n1BAD=2\n")
    assert problems("run: x\n", Overrides(env_file="bad.env"), tmp_path) == [
        "--env-file: bad.env line 2: expected KEY=VALUE",
        '--env-file: bad.env line 3: "1BAD" is not a variable name',
    ]
    assert problems("run: x\n", Overrides(env_file="missing.env"), tmp_path) == [
        "--env-file: missing.env: no such file"
    ]


def test_secrets_are_redacted_in_json() -> None:
    task = one("envs: {A: visible}\nsecrets:\n  TOKEN: s3cr3t\n")
    assert task.secrets == {"TOKEN": "s3cr3t"}
    shown = task.to_json()
    assert shown["secrets"] == {"TOKEN": "<redacted>"} and shown["envs"] == {"A": "visible"}
    assert "s3cr3t" not in json.dumps(load("secrets:\n  TOKEN: s3cr3t\n").to_json())


def test_relative_paths_resolve_against_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "data.txt").write_text("x")
    task = one("workdir: code\nfile_mounts:\n  /remote/data.txt: ./data.txt\n  ~/dot: .\n", base_dir=tmp_path)
    assert task.workdir == str(tmp_path / "code")
    assert task.file_mounts == {"/remote/data.txt": str(tmp_path / "data.txt"), "~/dot": str(tmp_path)}


def test_missing_local_paths(tmp_path: Path) -> None:
    assert problems("workdir: nowhere\nfile_mounts:\n  /a: missing.txt\n", base_dir=tmp_path) == [
        f'workdir: "nowhere" is not a directory ({tmp_path / "nowhere"})',
        f'file_mounts./a: local path "missing.txt" does not exist ({tmp_path / "missing.txt"})',
    ]


def test_buckets_parse_and_unsupported_stores_are_named() -> None:
    task = one("""\
        envs: {BUCKET: my-bucket, SIZE: "7"}
        file_mounts:
          /data: s3://my-bucket/data
          /models/llama-${SIZE}b: gs://weights/llama-$SIZE
          /mnt/cached:
            name: ${BUCKET}
            mode: MOUNT_CACHED
    """)
    assert task.file_mounts == {}
    assert task.storage_mounts == {
        "/data": {"source": "s3://my-bucket/data", "mode": "COPY"},  # a bare bucket URL is copied
        "/models/llama-7b": {"source": "gs://weights/llama-7", "mode": "COPY"},
        "/mnt/cached": {"name": "my-bucket", "mode": "MOUNT_CACHED"},
    }
    assert task.unsupported_features() == [
        "file_mounts./models/llama-7b: gs:// buckets are not supported yet (stores: local, s3, r2, oci, nebius)",
    ]


def test_storage_mount_paths_sources_and_stores(tmp_path: Path) -> None:
    (tmp_path / "ckpts").mkdir()
    task = one("file_mounts:\n  /ckpt: {name: my-ckpts, source: ckpts, store: S3}\n  ~/c: {name: other-b}\n",
               base_dir=tmp_path)
    assert task.storage_mounts["/ckpt"] == {"name": "my-ckpts", "source": str(tmp_path / "ckpts"), "store": "S3"}
    assert problems("file_mounts:\n  ckpt: {name: b1}\n  /a: {source: ./x}\n  /b: {name: b2, source: nope}\n"
                    "  /c: {name: b3, store: azure}\n", base_dir=tmp_path) == [
        "file_mounts.ckpt: a bucket mount path must be absolute (/ckpt) or under ~/, not \"ckpt\"",
        "file_mounts./a: a storage mount with a local source needs a name: the bucket to upload it to",
        f'file_mounts./b.source: local path "nope" does not exist ({tmp_path / "nope"})',
    ]
    azure = one("file_mounts:\n  /c: {name: b3, store: azure}\n")
    assert azure.unsupported_features() == [
        "file_mounts./c: store azure is not supported yet (stores: local, s3, r2, oci, nebius)"]


def test_unsupported_features_of_resources() -> None:
    task = one("""\
        resources:
          ports: [8080, 8081, "9000-9001"]
          image_id: docker:ubuntu
          autostop: 10
          any_of:
            - infra: lambda
            - infra: aws
              disk_tier: best
    """)
    assert task.resources.ports == ["8080-8081", "9000-9001"]
    assert task.unsupported_features() == [
        "resources: cloud lambda is not supported (Sortie runs on local, aws, gcp, azure, kubernetes)",
    ]
    aws = task.candidates()[1].to_json()
    assert (aws["ports"], aws["disk_tier"], aws["image_id"]) == (["8080-8081", "9000-9001"], "best", "docker:ubuntu")
    assert one("resources: {infra: local/region-a, autostop: true}\n").unsupported_features() == []
