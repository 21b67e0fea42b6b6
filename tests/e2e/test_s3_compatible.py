"""The S3-compatible stores (Cloudflare R2, OCI Object Storage, Nebius Object Storage) against moto's real server on
loopback: their keys from their own credentials files (never the AWS ones), their endpoints, the store's behaviour,
and, end to end on the local cloud, upload, COPY, MOUNT_CACHED, a MOUNT through rclone, and deletion."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path

import pytest

from orchestrator.config import S3Config, StorageConfig
from orchestrator.controller.node_files import NodeFiles
from orchestrator.storage import StorageError, open_store
from orchestrator.storage.s3_compatible import S3CompatibleStore, named_stores, resolve
from orchestrator.storage.staging import NodeStep
from tests.support.e2e import Sortie, path_view_works, write

KINDS = ("r2", "oci", "nebius")


def put(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write(folder, name, text)


def credentials(tmp_path: Path, kind: str, key: str = "testing", secret: str = "testing") -> Path:
    """An AWS-style credentials file with the store's profile (moto takes any keys)."""
    return write(tmp_path, f"{kind}.credentials",
                 f"[{kind}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")


def storage_for(kind: str, endpoint: str, tmp_path: Path) -> StorageConfig:
    return StorageConfig.model_validate(
        {kind: {"endpoint_url": endpoint, "credentials_file": str(credentials(tmp_path, kind))}})


@pytest.fixture
def no_aws_keys(s3_env: S3Config, monkeypatch: pytest.MonkeyPatch) -> S3Config:
    """moto, with the AWS keys out of the environment: the S3-compatible stores must use their own."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    return s3_env


@pytest.mark.parametrize("kind", KINDS)
def test_a_compatible_store_works_with_its_own_keys_only(kind: str, no_aws_keys: S3Config, tmp_path: Path) -> None:
    store = open_store(kind, storage_for(kind, no_aws_keys.endpoint_url or "", tmp_path), tmp_path)
    assert isinstance(store, S3CompatibleStore) and store.kind == kind
    bucket = f"{kind}-{secrets.token_hex(4)}"
    store.create_bucket(bucket)
    store.put_file(bucket, "a/b.txt", write(tmp_path, "b.txt", "hello"))
    assert store.list_objects(bucket, "a") == {"a/b.txt": 5}
    store.get_file(bucket, "a/b.txt", tmp_path / "out" / "b.txt")
    assert (tmp_path / "out" / "b.txt").read_text() == "hello"
    with pytest.raises(StorageError) as info:
        store.get_file(bucket, "nope", tmp_path / "nope")
    assert str(info.value) == f"{kind}://{bucket}/nope does not exist; check the path"
    store.delete_bucket(bucket)
    assert not store.bucket_exists(bucket)


def test_without_its_credentials_file_a_store_is_refused_in_one_line(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("SORTIE_R2_ACCESS_KEY_ID", "SORTIE_R2_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StorageError) as info:
        open_store("r2", StorageConfig(), tmp_path)
    assert str(info.value) == (f"Cloudflare R2 keys (storage.r2.credentials_file, profile r2): "
                               f"{tmp_path}/.cloudflare/r2.credentials does not exist")
    put(tmp_path / ".cloudflare", "r2.credentials", "[default]\naws_access_key_id = k\n")
    with pytest.raises(StorageError, match=r"has no \[r2\] section"):
        open_store("r2", StorageConfig(), tmp_path)
    with pytest.raises(StorageError, match=r"needs storage\.oci\.namespace and storage\.oci\.region"):
        resolve("oci", StorageConfig.model_validate({"oci": {"credentials_file": str(credentials(tmp_path, "oci"))}}))


def test_endpoints_follow_skypilots_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    put(tmp_path / ".cloudflare", "r2.credentials", "[r2]\naws_access_key_id = K\naws_secret_access_key = S\n")
    put(tmp_path / ".cloudflare", "accountid", "0123abcd\n")
    r2 = resolve("r2", StorageConfig())
    assert (r2.endpoint_url, r2.region, r2.access_key_id, r2.secret_access_key) == (
        "https://0123abcd.r2.cloudflarestorage.com", "auto", "K", "S")
    oci = resolve("oci", StorageConfig.model_validate({"oci": {
        "namespace": "ns1", "region": "us-ashburn-1", "credentials_file": str(credentials(tmp_path, "oci"))}}))
    assert oci.endpoint_url == "https://ns1.compat.objectstorage.us-ashburn-1.oraclecloud.com"
    nebius = resolve("nebius", StorageConfig.model_validate({"nebius": {
        "credentials_file": str(credentials(tmp_path, "nebius"))}}))
    assert nebius.endpoint_url == "https://storage.eu-north1.nebius.cloud:443"
    put(tmp_path / ".cloudflare", "accountid", "not/an id\n")
    with pytest.raises(StorageError, match="account id 'not/an id' is not valid"):
        resolve("r2", StorageConfig())


def test_a_node_gets_the_keys_of_the_stores_its_job_names_and_no_others(tmp_path: Path) -> None:
    storage = StorageConfig.model_validate({
        "r2": {"credentials_file": str(credentials(tmp_path, "r2", "r2key", "r2secret")), "account_id": "abc1"},
        "nebius": {"credentials_file": str(credentials(tmp_path, "nebius", "nbkey", "nbsecret"))}})
    assert set(named_stores(["r2://bkt1/x", "s3://bkt2", "local://bkt3"], storage)) == {"r2"}
    from orchestrator.config import SortieConfig

    config = SortieConfig(storage=storage)
    files = NodeFiles(config, tmp_path, [NodeStep("/d", "copy", url="r2://bkt1/x")], 1, infra="aws/us-east-1")
    env = files._env()
    assert env["SORTIE_R2_ACCESS_KEY_ID"] == "r2key" and env["SORTIE_R2_SECRET_ACCESS_KEY"] == "r2secret"
    assert not any(k.startswith("SORTIE_NEBIUS_") for k in env)
    command = files._command("fetch", files.steps)
    plan = json.loads(base64.urlsafe_b64decode(command.split()[-1]))
    assert plan["storage"]["r2"]["endpoint_url"] == "https://abc1.r2.cloudflarestorage.com"
    assert "r2secret" not in command  # keys travel in the environment only
    assert NodeFiles(config, tmp_path, [NodeStep("/d", "copy", url="s3://bkt2")], 1)._env().keys().isdisjoint(
        {"SORTIE_R2_ACCESS_KEY_ID", "SORTIE_NEBIUS_ACCESS_KEY_ID"})


# --- end to end on the local cloud -------------------------------------------------------------------------------

FAST = "controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  grace_misses: 2\n"


def _cli(sortie_cli, kind: str, endpoint: str, tmp_path: Path, extra: str = "") -> Sortie:
    creds = credentials(tmp_path, kind)
    return sortie_cli(FAST + f"storage:\n  {kind}:\n    endpoint_url: {endpoint}\n    credentials_file: {creds}\n"
                      + extra)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.e2e
@pytest.mark.skipif(not path_view_works(), reason="no mount namespaces here")
def test_r2_like_store_upload_copy_cached_and_deletion(kind: str, sortie_cli, no_aws_keys: S3Config,
                                                       tmp_path: Path) -> None:
    """The intermediate bucket, a COPY of an existing bucket, MOUNT_CACHED writes into a persistent bucket and a
    `persistent: false` one Sortie makes and deletes, all in the S3-compatible store, with its keys only."""
    from tests.e2e.test_storage_e2e import _project, wait_storage_cleaned

    store = open_store(kind, storage_for(kind, no_aws_keys.endpoint_url or "", tmp_path), tmp_path)
    inter, data, kept, temp = (f"{w}-{secrets.token_hex(4)}" for w in ("inter", "data", "kept", "temp"))
    for name in (inter, data):
        store.create_bucket(name)
    store.put_file(data, "inputs/in.txt", write(tmp_path, "in.txt", f"{kind}-input\n"))
    cli = _cli(sortie_cli, kind, no_aws_keys.endpoint_url or "", tmp_path,
               f"jobs:\n  bucket: {kind}://{inter}/sortie\n")
    yaml = write(tmp_path, "t.yaml", f"""\
workdir: {_project(tmp_path)}
file_mounts:
  /inputs: {kind}://{data}/inputs
  /out:
    name: {kept}
    store: {kind}
    mode: MOUNT_CACHED
  /tmpout:
    name: {temp}
    store: {kind}
    mode: MOUNT_CACHED
    persistent: false
run: |
  cat src/main.txt /inputs/in.txt
  echo result-1 > /out/result.txt
  echo t > /tmpout/t.txt
""")
    job_id = cli.launch(yaml)
    job = cli.wait(job_id, timeout=120)
    assert job["status"] == "SUCCEEDED", cli.logs(job_id, "--controller")
    log = cli.logs(job_id)
    assert "main-code" in log and f"{kind}-input" in log
    wait_storage_cleaned(cli, job_id)
    assert store.list_objects(kept) == {"result.txt": len("result-1\n")}
    assert not store.bucket_exists(temp)
    assert store.bucket_exists(inter) and store.list_objects(inter, f"sortie/job-{job_id}") == {}
    assert store.list_objects(data) == {"inputs/in.txt": len(f"{kind}-input\n")}


@pytest.mark.e2e
@pytest.mark.skipif(not path_view_works(), reason="no mount namespaces here")
def test_r2_mount_reads_and_writes_through_rclone(sortie_cli, no_aws_keys: S3Config, tmp_path: Path) -> None:
    from tests.e2e.test_node_mounts import fuse_works

    why = fuse_works()
    if why:
        pytest.skip(why)
    store = open_store("r2", storage_for("r2", no_aws_keys.endpoint_url or "", tmp_path), tmp_path)
    bucket = f"mnt-{secrets.token_hex(4)}"
    store.create_bucket(bucket)
    store.put_file(bucket, "inputs/in.txt", write(tmp_path, "in.txt", "from-r2\n"))
    cli = _cli(sortie_cli, "r2", no_aws_keys.endpoint_url or "", tmp_path)
    yaml = write(tmp_path, "m.yaml", f"""\
file_mounts:
  /mnt/b:
    source: r2://{bucket}
    mode: MOUNT
run: |
  echo "read $(cat /mnt/b/inputs/in.txt)"
  echo written-on-the-node > /mnt/b/result.txt
  grep -q "fuse.rclone" /proc/self/mountinfo && echo "a FUSE mount"
""")
    job_id = cli.launch(yaml)
    job = cli.wait(job_id, timeout=120)
    assert job["status"] == "SUCCEEDED", (cli.logs(job_id), cli.logs(job_id, "--controller"))
    log = cli.logs(job_id)
    assert "read from-r2" in log and "a FUSE mount" in log
    assert store.list_objects(bucket)["result.txt"] == len("written-on-the-node\n")


def test_a_nodes_rclone_mount_gets_the_stores_keys_and_no_aws_ones(tmp_path: Path) -> None:
    from orchestrator.node.node_storage import _mount_settings

    plan = {"storage": {"r2": {"endpoint_url": "https://abc1.r2.cloudflarestorage.com", "region": "auto",
                               "credentials_file": str(tmp_path / "absent")}}}
    env = {"AWS_ACCESS_KEY_ID": "aws", "AWS_SECRET_ACCESS_KEY": "aws-secret", "AWS_PROFILE": "p",
           "SORTIE_R2_ACCESS_KEY_ID": "r2key", "SORTIE_R2_SECRET_ACCESS_KEY": "r2secret", "PATH": "/bin"}
    settings = _mount_settings("r2", plan, env)
    assert settings == {"endpoint_url": "https://abc1.r2.cloudflarestorage.com", "region": "auto",
                        "mount_tool": "auto"}
    assert env == {"AWS_ACCESS_KEY_ID": "r2key", "AWS_SECRET_ACCESS_KEY": "r2secret", "PATH": "/bin",
                   "SORTIE_R2_ACCESS_KEY_ID": "r2key", "SORTIE_R2_SECRET_ACCESS_KEY": "r2secret"}
