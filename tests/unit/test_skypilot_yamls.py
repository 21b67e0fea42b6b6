"""SkyPilot users' YAMLs unchanged (issue 16): duplicate keys, `service:` ignored, accelerator sets at several
counts, one job_recovery, `config:`, env substitution, job-group headers, the new launch overrides, and what
the optimizer keeps for ports, tiers and images."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import LocalCloudConfig, LocalRegion, SortieConfig
from orchestrator.launch_checks import launch_refusals
from orchestrator.policy.endpoints import endpoints
from orchestrator.policy.optimizer import plan_for
from orchestrator.spec import Overrides, SpecError, load_yaml_text

CLOUDS = ("local", "aws", "gcp", "azure")
CONFIG = SortieConfig(local=LocalCloudConfig(regions=[LocalRegion(name="region-a")]))


def problems(text: str, overrides: Overrides = Overrides(), base: Path | None = None) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_yaml_text(text, overrides, base)
    return info.value.problems


def plan(text: str, enabled: tuple[str, ...] = CLOUDS):
    task = load_yaml_text(text).tasks[0]
    return plan_for([c.to_json() for c in task.candidates()], task.num_nodes, CONFIG,
                    ordered=task.resources_ordered(), enabled=enabled)


# ---- section 3: small differences ---------------------------------------------------------------------------


def test_duplicate_keys_are_refused_naming_the_key_and_both_lines() -> None:
    assert problems("run: a\nresources:\n  cpus: 2\n  cpus: 4\n", base=Path("/")) == [
        '<yaml>: key "cpus" appears twice in one mapping (lines 3 and 4); keep one']
    assert problems("run: a\nname: x\nrun: b\n") == ['<yaml>: key "run" appears twice in one mapping (lines 1 and 3); '
                                                     "keep one"]
    # the same key in different mappings, and YAML merge keys, are fine
    task = load_yaml_text("resources: {cpus: 2}\nenvs: {cpus: '2'}\nrun: a\n")
    assert task.tasks[0].envs == {"cpus": "2"}


def test_any_of_entries_with_different_job_recovery_are_refused() -> None:
    text = ("resources:\n  any_of:\n    - infra: aws\n      job_recovery: FAILOVER\n    - infra: gcp\n"
            "    - infra: azure\n      job_recovery: FAILOVER\nrun: x\n")
    assert problems(text) == ["resources: any_of[0] and any_of[1] have different job_recovery; a job recovers one "
                              "way: give job_recovery once, in resources"]
    same = load_yaml_text("resources:\n  job_recovery: FAILOVER\n  any_of:\n    - infra: aws\n    - infra: gcp\n"
                          "run: x\n").tasks[0]
    assert {c.job_recovery.strategy for c in same.candidates() if c.job_recovery} == {"FAILOVER"}


def test_star_region_means_any_cloud_with_that_region() -> None:
    result = plan("resources:\n  infra: '*/us-east-1'\n  accelerators: A100:8\nrun: x\n")
    assert result.infeasible is None and result.options
    assert {o.offer.region for o in result.options} == {"us-east-1"}
    task = load_yaml_text("run: x\n", Overrides(infra="*/us-east-1")).tasks[0]
    assert task.candidates()[0].region == "us-east-1" and task.candidates()[0].cloud is None


def test_infeasible_requests_are_refused_with_the_reason() -> None:
    big = load_yaml_text("resources:\n  accelerators: H100:64\nrun: x\n")
    (line,) = launch_refusals(big, CONFIG, enabled=CLOUDS)
    assert line.startswith("No feasible resources: no instance with 64 H100")
    nowhere = load_yaml_text("resources:\n  accelerators: H100:8\nrun: x\n")
    assert launch_refusals(nowhere, CONFIG, enabled=("local",))[0].startswith("No feasible resources")
    fine = load_yaml_text("resources:\n  accelerators: H100:8\nrun: x\n")
    assert launch_refusals(fine, CONFIG, enabled=CLOUDS) == []


# ---- section 1: parse-level forms ---------------------------------------------------------------------------


def test_service_sections_are_ignored_with_one_warning() -> None:
    pipeline = load_yaml_text("envs: {PORT: '8080'}\nservice:\n  readiness_probe: /health\n  replicas: 2\n"
                              "resources: {ports: 8080}\nrun: serve --port $PORT\n")
    assert pipeline.warnings == ["service: ignored; `jobs launch` runs the task as a managed job (SkyServe "
                                 "services are not supported), as SkyPilot's `jobs launch` does"]
    assert "service" not in pipeline.tasks[0].to_json()


def test_accelerator_sets_may_name_one_gpu_at_several_counts() -> None:
    task = load_yaml_text("resources:\n  accelerators: {A100:4, A100:8, A100-80GB:2}\nrun: x\n").tasks[0]
    assert [c.accelerators for c in task.candidates()] == [{"A100": 4.0}, {"A100": 8.0}, {"A100-80GB": 2.0}]
    assert task.resources_ordered() is False  # a set: any of them, the cheapest first
    ordered = load_yaml_text("resources:\n  accelerators: [A100:8, A100:4]\nrun: x\n").tasks[0]
    assert ordered.resources_ordered() is True
    assert problems("resources:\n  any_of:\n    - accelerators: {A100:4, A100:8}\nrun: x\n") == [
        "resources.any_of[0].accelerators: only one accelerator here, like A100:1 (put alternatives in separate "
        "any_of entries)"]


def test_config_overrides_keep_known_keys_and_name_the_others() -> None:
    task = load_yaml_text("config:\n  kubernetes:\n    pod_config:\n      spec: {runtimeClassName: nvidia}\n"
                          "  docker:\n    run_options: [--shm-size=16g]\nrun: x\n").tasks[0]
    assert task.config == {"kubernetes": {"pod_config": {"spec": {"runtimeClassName": "nvidia"}}},
                           "docker": {"run_options": ["--shm-size=16g"]}}
    assert task.to_json()["config"] == task.config
    assert problems("config:\n  gcp: {managed_instance_group: {}}\n  kubernetes: {pod_config: 3}\nrun: x\n") == [
        "config.gcp: not supported yet (Sortie applies: kubernetes.pod_config, docker.run_options)",
        "config.kubernetes.pod_config: must be a mapping (a partial pod spec)"]


def test_env_substitution_reaches_every_string_of_file_mounts_and_the_workdir(tmp_path: Path) -> None:
    (tmp_path / "proj-a").mkdir()
    task = load_yaml_text("envs: {B: my-bucket, STORE: s3, MODE: MOUNT, P: proj-a}\nworkdir: ./$P\n"
                          "file_mounts:\n  /data/${B}:\n    name: ${B}\n    store: ${STORE}\n    mode: $MODE\n"
                          "run: x\n", base_dir=tmp_path).tasks[0]
    assert task.workdir == str(tmp_path / "proj-a")
    assert task.storage_mounts["/data/my-bucket"] == {"name": "my-bucket", "store": "s3", "mode": "MOUNT"}


def test_job_group_headers_are_parsed_and_checked() -> None:
    text = ("name: rl\nexecution: parallel\nprimary_tasks: [trainer]\ntermination_delay: 30s\n---\n"
            "name: trainer\nrun: train\n---\nname: rollout\nrun: serve\n")
    group = load_yaml_text(text)
    assert group.is_job_group and group.name == "rl" and [t.name for t in group.tasks] == ["trainer", "rollout"]
    assert group.to_json()["primary_tasks"] == ["trainer"] and group.termination_delay == 30.0
    assert problems("execution: parallel\nprimary_tasks: [nope]\n---\nname: a\nrun: x\n---\nrun: y\n") == [
        "task[1].name: every task of a job group needs a name (tasks find each other by it)",
        "primary_tasks: no task named nope (tasks: a)"]
    assert problems("name: p\nexecution: sometimes\n---\nrun: x\n---\nrun: y\n") == [
        'execution: must be serial or parallel, not "sometimes"']
    serial = load_yaml_text("name: p\nexecution: serial\n---\nrun: x\n---\nrun: y\n")
    assert not serial.is_job_group and serial.is_pipeline and "execution" not in serial.to_json()
    assert launch_refusals(group, CONFIG, enabled=CLOUDS) == []  # job groups launch


def test_new_launch_overrides_apply_and_name_their_flag(tmp_path: Path) -> None:
    task = load_yaml_text("resources: {disk_tier: low}\nrun: x\n", Overrides(
        disk_size="100", disk_tier="high", network_tier="best", image_id="ami-123", instance_type="p5.48xlarge",
        ports=("8080", "9000-9001,7000"), job_recovery="failover",
        config=("docker.run_options=[--shm-size=8g]",))).tasks[0]
    (c,) = task.candidates()
    assert (c.disk_size, c.disk_tier, c.network_tier, c.image_id, c.instance_type) == (
        100, "high", "best", "ami-123", "p5.48xlarge")
    assert c.ports == ("7000", "8080", "9000-9001") and c.job_recovery and c.job_recovery.strategy == "FAILOVER"
    assert task.config == {"docker": {"run_options": ["--shm-size=8g"]}}
    assert problems("run: x\n", Overrides(disk_tier="fast", ports=("x",), git_ref="main"), tmp_path) == [
        '--disk-tier: "fast" is not a disk tier; use one of low, medium, high, ultra, best',
        '--ports: "x" is not a port (1-65535) or a range like 8000-8010',
        "--git-ref: needs --git-url (the repository to clone)"]


def test_env_file_fills_declared_secrets_and_secret_file_fills_secrets(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HF_TOKEN=hf-abc\nMODEL=llama\n")
    (tmp_path / "secrets.env").write_text("WANDB_KEY=w-123\n")
    task = load_yaml_text("secrets: {HF_TOKEN: null}\nenvs: {MODEL: null}\nrun: x\n",
                          Overrides(env_file=".env", secret_file="secrets.env"), tmp_path).tasks[0]
    assert task.secrets == {"HF_TOKEN": "hf-abc", "WANDB_KEY": "w-123"}
    assert task.envs == {"MODEL": "llama"}  # a declared secret never lands in envs


# ---- what the optimizer keeps ---------------------------------------------------------------------------------


def test_disk_tier_leaves_out_clouds_without_it() -> None:
    ultra = plan("resources:\n  disk_tier: ultra\n  cpus: 8\n  memory: 32\nrun: x\n")
    assert ultra.options and {o.offer.cloud for o in ultra.options} <= {"aws", "gcp"}  # no Azure Ultra OS disk
    local = plan("resources:\n  infra: local\n  disk_tier: high\nrun: x\n")
    assert local.infeasible == "disk_tier high is not offered on local"
    best = plan("resources:\n  infra: local\n  disk_tier: best\nrun: x\n")
    assert best.chosen is not None


def test_network_tier_best_keeps_only_fast_network_instances() -> None:
    result = plan("resources:\n  accelerators: H100:8\n  network_tier: best\nrun: x\n")
    assert result.options
    assert all(o.offer.instance_type.startswith(("p5", "a3-", "Standard_ND96")) for o in result.options)


def test_image_mappings_keep_only_their_regions_and_machine_images_leave_the_local_cloud() -> None:
    result = plan("resources:\n  infra: aws\n  cpus: 2\n  image_id: {us-west-2: ami-1}\nrun: x\n")
    assert result.options and {o.offer.region for o in result.options} == {"us-west-2"}
    local = plan("resources:\n  infra: local\n  image_id: ami-1\nrun: x\n")
    assert local.infeasible == "a machine image (image_id) has no meaning on local"


def test_endpoints_are_on_loopback_locally_and_the_public_address_on_a_cloud() -> None:
    task = {"resources": [{"ports": ["8080", "9000-9001"]}]}
    assert endpoints(task, "local/region-a", [{"rank": 0, "ip": "127.0.0.1"}]) == {
        8080: "127.0.0.1:8080", 9000: "127.0.0.1:9000", 9001: "127.0.0.1:9001"}
    nodes = [{"rank": 1, "ip": "10.0.0.2"}, {"rank": 0, "ip": "10.0.0.1", "public_ip": "3.3.3.3"}]
    assert endpoints(task, "aws/us-east-1", nodes) == {8080: "3.3.3.3:8080", 9000: "3.3.3.3:9000",
                                                        9001: "3.3.3.3:9001"}
    assert endpoints(task, "aws", []) == {} and endpoints({"resources": [{}]}, "aws", nodes) == {}
    # Kubernetes: what the head pod's Service says (a node port here), never the pod's own address
    kube = [{"rank": 0, "ip": "10.244.0.5", "endpoints": {"8080": "192.168.0.3:30000", "9000": "192.168.0.3:30001",
                                                          "9001": "192.168.0.3:30002"}}]
    assert endpoints(task, "kubernetes/ctx", kube) == {8080: "192.168.0.3:30000", 9000: "192.168.0.3:30001",
                                                       9001: "192.168.0.3:30002"}


# ---- section 2: catalogs that cover what people rent ----------------------------------------------------------


@pytest.mark.parametrize(("accelerators", "where"), [
    ("H100:1", {("gcp", "a3-highgpu-1g"), ("azure", "Standard_NC40ads_H100_v5")}),
    ("H100:2", {("gcp", "a3-highgpu-2g"), ("azure", "Standard_NC80adis_H100_v5")}),
    ("H100:4", {("gcp", "a3-highgpu-4g")}),
    ("H200:8", {("aws", "p5e.48xlarge"), ("aws", "p5en.48xlarge"), ("gcp", "a3-ultragpu-8g"),
                ("azure", "Standard_ND96isr_H200_v5")}),
    ("L40S:1", {("aws", "g6e.xlarge"), ("aws", "g6e.2xlarge"), ("aws", "g6e.4xlarge"), ("aws", "g6e.8xlarge"),
                ("aws", "g6e.16xlarge")}),
    ("B200:8", {("aws", "p6-b200.48xlarge"), ("gcp", "a4-highgpu-8g")}),
    ("GB200:4", {("azure", "Standard_ND128isr_NDR_GB200_v6")}),
    ("MI300X:8", {("azure", "Standard_ND96isr_MI300X_v5")}),
    ("A100-40GB:8", {("aws", "p4d.24xlarge"), ("gcp", "a2-highgpu-8g"), ("azure", "Standard_ND96asr_v4")}),
    ("Trainium:16", {("aws", "trn1.32xlarge"), ("aws", "trn1n.32xlarge")}),
    ("Inferentia2:1", {("aws", "inf2.xlarge"), ("aws", "inf2.8xlarge")}),
    ("T4:2", {("gcp", "n1-standard-16")}),
    ("tpu-v5e-8", {("gcp", "v5litepod-8")}),
    ("tpu-v6e-8", {("gcp", "v6e-8")}),
    ("tpu-v5p-8", {("gcp", "v5p-8")}),
    ("tpu-v4-8", {("gcp", "v4-8")}),
])
def test_skypilot_accelerator_names_find_their_instances(accelerators: str, where: set[tuple[str, str]]) -> None:
    result = plan(f"resources:\n  accelerators: {accelerators}\nrun: x\n", enabled=("aws", "gcp", "azure"))
    found = {(o.offer.cloud, o.offer.instance_type) for o in result.options}
    assert where <= found, result.infeasible


def test_t4_comes_at_every_count_gcp_attaches() -> None:
    counts = {n for n in (1, 2, 4) if plan(f"resources:\n  infra: gcp\n  accelerators: T4:{n}\nrun: x\n").chosen}
    assert counts == {1, 2, 4}


def test_tpus_imply_gcp_with_their_accelerator_args() -> None:
    text = ("resources:\n  accelerators: tpu-v5e-8\n  accelerator_args: {runtime_version: v2-alpha-tpuv5-lite}\n"
            "run: x\n")
    result = plan(text)
    assert result.options and {o.offer.cloud for o in result.options} == {"gcp"}
    (candidate,) = load_yaml_text(text).tasks[0].candidates()
    assert candidate.to_json()["accelerator_args"] == {"runtime_version": "v2-alpha-tpuv5-lite"}
    assert plan("resources:\n  accelerators: A100:1\n  accelerator_args: {tpu_vm: true}\nrun: x\n").infeasible \
        == "accelerator_args are for TPUs (accelerators: tpu-...)"


# ---- workdir: {url, ref} --------------------------------------------------------------------------------------


def _git(*args: str, cwd: Path) -> None:
    import subprocess

    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.fixture
def bare_repo(tmp_path: Path) -> Path:
    """A local bare repository: main holds `two`, tag v1 holds `one`, branch dev holds `three`."""
    src = tmp_path / "src"
    src.mkdir()
    _git("init", "-q", "-b", "main", cwd=src)
    for text, extra in (("one", ("tag", "v1")), ("two", None)):
        (src / "f").write_text(text)
        _git("add", "f", cwd=src)
        _git("commit", "-qm", text, cwd=src)
        if extra:
            _git(*extra, cwd=src)
    _git("checkout", "-qb", "dev", cwd=src)
    (src / "f").write_text("three")
    _git("commit", "-qam", "three", cwd=src)
    _git("checkout", "-q", "main", cwd=src)
    _git("clone", "-q", "--bare", str(src), str(tmp_path / "repo.git"), cwd=tmp_path)
    return tmp_path / "repo.git"


@pytest.mark.parametrize(("ref", "content"), [("v1", "one"), ("dev", "three"), (None, "two")])
def test_a_git_workdir_is_cloned_on_the_node_at_its_ref(bare_repo: Path, tmp_path: Path, ref: str | None,
                                                        content: str) -> None:
    import subprocess

    ref_line = f"\n  ref: {ref}" if ref else ""
    task = load_yaml_text(f"workdir:\n  url: {bare_repo.name}{ref_line}\nsetup: cat f > seen\nrun: x\n",
                          base_dir=bare_repo.parent).tasks[0]
    assert task.workdir == {"url": str(bare_repo), **({"ref": ref} if ref else {})}
    setup = task.to_json()["setup"]
    node_workdir = tmp_path / f"node-{ref}"
    (node_workdir / "data").mkdir(parents=True)  # a file mount may be there first
    subprocess.run(["bash", "-c", setup], cwd=node_workdir, check=True, capture_output=True)
    assert (node_workdir / "f").read_text() == content and (node_workdir / "seen").read_text() == content
    subprocess.run(["bash", "-c", setup], cwd=node_workdir, check=True, capture_output=True)  # a rerun is a no-op


def test_git_workdir_problems_and_the_git_flags(bare_repo: Path, tmp_path: Path) -> None:
    assert problems("workdir: {url: 'https://me:tok@example.com/r.git'}\nrun: x\n") == [
        "workdir.url: put no credentials in the URL (they would be shown); give the token as a secret"]
    assert problems("workdir: {url: ./nope, branch: x}\nrun: x\n", base=tmp_path)[0] == (
        "workdir.branch: unknown key branch; a git workdir has url and ref")
    assert problems("workdir: {ref: v1}\nrun: x\n") == ["workdir.url: a git workdir needs url: the repository to clone"]
    task = load_yaml_text("run: x\n", Overrides(git_url=str(bare_repo), git_ref="dev"), tmp_path).tasks[0]
    assert task.workdir == {"url": str(bare_repo), "ref": "dev"} and "git clone" in task.to_json()["setup"]
    failing = load_yaml_text("run: x\n", Overrides(git_url="https://example.invalid/r.git")).tasks[0]
    assert failing.to_json()["setup"].count("git clone") == 1
