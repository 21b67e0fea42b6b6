"""Policy, what a node's bucket work gets from the controller's environment (issue 17, item 8).

A local-cloud node is this machine: its bucket work (Sortie's own `node_storage`, never the task's runs) gets the
controller's AWS_* settings, as the controller would use them itself. A cloud node never gets the controller's
credentials: it uses its own identity (the instance profile, workload identity or credentials its image or account
gives it); only where the bucket is (region) passes.

The S3-compatible stores (R2, OCI, Nebius) have no cloud identity a node could use: as in SkyPilot, which copies
~/.cloudflare to its nodes, a node gets their keys, but only those of the stores its job's steps name
(`orchestrator.storage.s3_compatible.named_stores`, given by `controller.node_files`)."""

from __future__ import annotations

from collections.abc import Mapping

# Settings that say where, not who: safe on any node.
NON_SECRET_AWS = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
SECRET_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def node_credentials_env(infra: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of a node's bucket work on `infra` ("local" or None: this machine)."""
    if (infra or "local").split("/")[0] == "local":
        return {k: v for k, v in environ.items() if k.startswith("AWS_")}
    return {k: environ[k] for k in NON_SECRET_AWS if k in environ}

