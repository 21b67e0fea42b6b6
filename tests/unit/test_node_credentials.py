"""Cloud nodes never get the controller's own AWS credentials (issue 17, item 8)."""

from __future__ import annotations

from orchestrator.policy.node_credentials import node_credentials_env

ENV = {"AWS_ACCESS_KEY_ID": "AKIACONTROLLER", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "tok",
       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": "http://minio:9000", "AWS_PROFILE": "admin", "HOME": "/x"}


def test_cloud_nodes_get_where_not_who() -> None:
    for infra in ("aws", "aws/us-east-1", "gcp", "kubernetes"):
        env = node_credentials_env(infra, ENV)
        assert env == {"AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": "http://minio:9000"}
        assert "s3cr3t" not in str(env) and "AKIACONTROLLER" not in str(env)


def test_local_nodes_are_this_machine() -> None:
    env = node_credentials_env("local", ENV)
    assert env["AWS_ACCESS_KEY_ID"] == "AKIACONTROLLER" and "HOME" not in env
    assert node_credentials_env(None, ENV) == env
