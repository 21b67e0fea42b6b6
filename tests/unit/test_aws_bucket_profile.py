"""Issue 17: on AWS a cluster whose nodes touch S3 gets its own role and instance profile, scoped to exactly the
job's buckets, when no `cloud.node_instance_profile` is configured (an explicit one wins: nothing is made).
Under `pulumi.runtime.set_mocks`: no engine, no credentials."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.controller.node_files import node_buckets_for
from orchestrator.errors import UsageError
from orchestrator.storage.staging import NodeStep
from stacks.cluster_program import cluster_program
from tests.support.cloud_mocks import AWS_INSTANCE, Harness, spec

pytest.importorskip("pulumi_aws")

ROLE = "aws:iam/role:Role"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
PROFILE = "aws:iam/instanceProfile:InstanceProfile"
BUCKETS = ("s3://ckpt-bucket", "s3://team-bucket/sortie/job-7/workdir", "s3://team-bucket/sortie/job-7/tmp-files/0")


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(monkeypatch)


def _policy(harness: Harness) -> dict[str, Any]:
    (grant,) = harness.mocks.of_type(ROLE_POLICY)
    return json.loads(grant["policy"])


def test_the_policy_names_exactly_the_jobs_buckets_and_no_wildcard(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws", node_buckets=BUCKETS)))
    policy = _policy(harness)
    statements = {s["Sid"]: s for s in policy["Statement"]}
    assert all(s["Effect"] == "Allow" for s in statements.values())
    listing, objects = statements["ListTheJobsBuckets"], statements["ReadWriteTheJobsObjects"]
    assert listing["Action"] == ["s3:ListBucket"]
    assert listing["Resource"] == ["arn:aws:s3:::ckpt-bucket", "arn:aws:s3:::team-bucket"]
    assert objects["Action"] == ["s3:GetObject", "s3:PutObject"]
    assert objects["Resource"] == [
        "arn:aws:s3:::ckpt-bucket/*",  # a bucket the job mounts whole: its objects
        "arn:aws:s3:::team-bucket/sortie/job-7/tmp-files/0", "arn:aws:s3:::team-bucket/sortie/job-7/tmp-files/0/*",
        "arn:aws:s3:::team-bucket/sortie/job-7/workdir", "arn:aws:s3:::team-bucket/sortie/job-7/workdir/*"]
    # No wildcard: no "*" resource or action, no s3:*, no bucket pattern; the only `*` ends an object ARN.
    for statement in policy["Statement"]:
        assert all(not a.endswith("*") for a in statement["Action"])
        for resource in statement["Resource"]:
            assert resource.startswith("arn:aws:s3:::") and "*" not in resource.removesuffix("/*")
            bucket = resource.removeprefix("arn:aws:s3:::").split("/")[0]
            assert bucket in {"ckpt-bucket", "team-bucket"}
    assert "Deny" not in json.dumps(policy) and "s3:*" not in json.dumps(policy)


def test_the_role_trusts_ec2_only_and_its_profile_goes_on_every_instance(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws", node_buckets=BUCKETS)))
    (role,) = harness.mocks.of_type(ROLE)
    trust = json.loads(role["assumeRolePolicy"])
    assert trust["Statement"] == [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                   "Action": "sts:AssumeRole"}]
    assert role["tags"]["sortie-job"] == "7"
    (grant,) = harness.mocks.of_type(ROLE_POLICY)
    assert grant["role"] == "sortie-job-7-1-nodes-id"
    (profile,) = harness.mocks.of_type(PROFILE)
    assert profile["role"] == "sortie-job-7-1-nodes-id"  # the role's id (its name)
    instances = harness.mocks.of_type(AWS_INSTANCE)
    assert len(instances) == 2
    # the mock gives a resource the id `<name>-id`: every node gets this cluster's profile
    assert [i["iamInstanceProfile"] for i in instances] == ["sortie-job-7-1-nodes-id"] * 2
    types = [t for t, _n, _i in harness.mocks.resources]
    # all of it is in the cluster's stack (destroyed with it), made before the instances that use it
    assert types.index(PROFILE) < types.index(AWS_INSTANCE)


def test_an_explicit_instance_profile_wins_and_nothing_is_made(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws", node_buckets=BUCKETS, instance_profile="team-nodes")))
    assert not harness.mocks.of_type(ROLE) and not harness.mocks.of_type(PROFILE)
    assert not harness.mocks.of_type(ROLE_POLICY)
    assert {i["iamInstanceProfile"] for i in harness.mocks.of_type(AWS_INSTANCE)} == {"team-nodes"}


def test_nodes_without_bucket_work_get_no_profile(harness: Harness) -> None:
    harness.run(lambda: cluster_program(spec("aws")))
    assert not harness.mocks.of_type(ROLE) and not harness.mocks.of_type(PROFILE)
    assert all("iamInstanceProfile" not in i for i in harness.mocks.of_type(AWS_INSTANCE))


def test_a_bucket_url_with_a_wildcard_is_refused() -> None:
    from stacks.builders.aws import bucket_policy

    with pytest.raises(UsageError, match="without wildcards"):
        bucket_policy(["s3://team-bucket/job-*"])
    with pytest.raises(UsageError):
        bucket_policy(["gs://elsewhere"])


def test_the_node_buckets_of_a_task_are_its_s3_steps_on_a_cloud() -> None:
    steps = [NodeStep(dest="/ckpt", kind="mount", url="s3://ckpt-bucket"),
             NodeStep(dest="~/sky_workdir", kind="copy", url="s3://team-bucket/sortie/job-7/workdir"),
             NodeStep(dest="/data", kind="mount", url="local://scratch"),
             NodeStep(dest="/two-hop", kind="push", path="/x")]
    assert node_buckets_for(steps, "aws") == ("s3://ckpt-bucket", "s3://team-bucket/sortie/job-7/workdir")
    assert node_buckets_for(steps, "local") == ()


POOL_BUCKETS = ("s3://pool-data", "s3://team-bucket/sortie/pool-p-1a2b3c4d/workdir")


def test_a_pool_worker_gets_a_profile_scoped_to_the_pools_buckets(harness: Harness) -> None:
    """Issue 17: a pool worker's stack makes its own role and instance profile, like a job's cluster, scoped to the
    pool's own buckets (its file mounts and staged files); its jobs bring no other bucket (refused at submit)."""
    from stacks.pool_program import pool_worker_program

    worker = spec("aws", name="sortie-pool-p-w1", num_nodes=1, node_buckets=POOL_BUCKETS)
    harness.run(lambda: pool_worker_program(worker, "p", 1))
    policy = _policy(harness)
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::pool-data", "arn:aws:s3:::pool-data/*", "arn:aws:s3:::team-bucket",
                         "arn:aws:s3:::team-bucket/sortie/pool-p-1a2b3c4d/workdir",
                         "arn:aws:s3:::team-bucket/sortie/pool-p-1a2b3c4d/workdir/*"}
    (instance,) = harness.mocks.of_type(AWS_INSTANCE)
    assert instance["iamInstanceProfile"] == "sortie-pool-p-w1-nodes-id"
    (role,) = harness.mocks.of_type(ROLE)
    assert role["tags"]["sortie-pool"] == "p"


def test_a_pool_worker_program_carries_the_pools_buckets(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from orchestrator.policy.pools import worker_program

    task = {"resources": [{}], "num_nodes": 1}
    program = worker_program("p", task, "sortie-pool-p-w1", 1, "aws", "us-east-1", False, "t" * 43, tmp_path,
                             node_buckets=POOL_BUCKETS)
    assert program.spec.node_buckets == POOL_BUCKETS and program.kind == "pool-worker"
    bare = worker_program("p", task, "sortie-pool-p-w1", 1, "aws", "us-east-1", False, "t" * 43, tmp_path)
    assert bare.spec.node_buckets == ()  # no bucket work: no role, as for a job's cluster


def test_a_pool_job_naming_a_bucket_the_pool_does_not_mount_is_refused() -> None:
    from types import SimpleNamespace

    from orchestrator.pool_service import _outside_buckets

    pool = SimpleNamespace(name="p", spec={"storage_mounts": {
        "/data": {"source": "s3://pool-data", "mode": "MOUNT"},
        "/ckpt": {"source": "s3://team-bucket/ckpt", "mode": "MOUNT_CACHED"},
        "/named": {"name": "named-bucket", "store": "s3"}}})
    fine = {"/d": {"source": "s3://pool-data/sub"}, "/c": {"source": "s3://team-bucket/ckpt/run-1"},
            "/n": {"name": "named-bucket"}}
    assert _outside_buckets(fine, pool) is None  # type: ignore[arg-type]
    for mounts, named in (({"/x": {"source": "s3://elsewhere"}}, "elsewhere"),
                          ({"/x": {"source": "s3://team-bucket/other"}}, "team-bucket/other"),
                          ({"/x": {"source": "s3://team-bucket/ckpt-2"}}, "team-bucket/ckpt-2"),
                          ({"/x": {"name": "mine"}}, "mine")):
        why = _outside_buckets(mounts, pool)  # type: ignore[arg-type]
        assert why == (f"file_mounts: /x uses bucket {named}, which pool p does not mount; a pool's workers reach "
                       "only the pool's own buckets: add it to the pool's file_mounts and apply the pool again, or "
                       "launch without -p"), why


def test_the_pool_reconciler_gives_a_worker_the_pools_s3_steps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The wiring: the controller makes a worker's program with the node buckets of the pool's staged steps."""
    from types import SimpleNamespace

    from orchestrator.config import SortieConfig
    from orchestrator.controller.pools import PoolReconciler

    reconciler = PoolReconciler.__new__(PoolReconciler)
    reconciler.ctx = SimpleNamespace(config=SortieConfig(), home=tmp_path)  # type: ignore[assignment]
    reconciler.store = SimpleNamespace(box=SimpleNamespace(open=lambda sealed: "t" * 43))  # type: ignore[assignment]
    steps = [{"dest": "/data", "kind": "mount", "url": "s3://pool-data"},
             {"dest": "~/sky_workdir", "kind": "copy", "url": "s3://team-bucket/sortie/pool-p-1a2b3c4d/workdir"},
             {"dest": "/local", "kind": "mount", "url": "local://scratch"}]
    pool = SimpleNamespace(name="p", spec={"resources": [{}]}, storage={"tasks": [steps]})
    worker = SimpleNamespace(stack_name="sortie-pool-p-w1", number=1, infra="aws", region="us-east-1",
                             use_spot=False, token_enc=b"sealed")
    program = reconciler._program(pool, worker)  # type: ignore[arg-type]
    assert program.spec.node_buckets == POOL_BUCKETS
    worker.infra = "local"
    assert reconciler._program(pool, worker).spec.node_buckets == ()  # type: ignore[arg-type]
