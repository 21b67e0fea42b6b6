"""S3-compatible stores other than S3: Cloudflare R2 (`r2://`), OCI Object Storage through its S3 compatibility
endpoint (`oci://`) and Nebius Object Storage (`nebius://`). One mechanism for all: each is the S3 store (boto3 on
the controller, rclone on the nodes) with its own endpoint and its own keys, never the AWS ones.

Where the keys come from, in order: `SORTIE_<KIND>_ACCESS_KEY_ID` / `SORTIE_<KIND>_SECRET_ACCESS_KEY` (what the
controller gives a node's bucket work for the stores its job names), else the profile of the store's
credentials file (SkyPilot's places: `[r2]` in ~/.cloudflare/r2.credentials, `[oci]` and `[nebius]` in
~/.aws/credentials). The endpoint: `storage.<kind>.endpoint_url`, else R2's
`https://<account id>.r2.cloudflarestorage.com` (the id from `storage.r2.account_id` or ~/.cloudflare/accountid),
OCI's `https://<namespace>.compat.objectstorage.<region>.oraclecloud.com`, Nebius's
`https://storage.<region>.nebius.cloud:443`.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from orchestrator.storage.stores import S3Store, StorageError, parse_bucket_url

if TYPE_CHECKING:
    from orchestrator.config import S3CompatibleConfig, StorageConfig

MAX_KEY_FILE_BYTES = 64 * 1024


@dataclass(frozen=True)
class CompatibleKind:
    kind: str
    name: str                 # in messages
    credentials_file: str     # default, AWS-style (profile sections)
    region: str | None        # default region


KINDS: dict[str, CompatibleKind] = {
    "r2": CompatibleKind("r2", "Cloudflare R2", "~/.cloudflare/r2.credentials", "auto"),
    "oci": CompatibleKind("oci", "OCI Object Storage", "~/.aws/credentials", None),
    "nebius": CompatibleKind("nebius", "Nebius Object Storage", "~/.aws/credentials", "eu-north1"),
}
R2_ACCOUNT_ID_FILE = "~/.cloudflare/accountid"


@dataclass(frozen=True)
class Resolved:
    """A store's endpoint, region and keys, ready for boto3 and rclone."""

    kind: str
    endpoint_url: str
    region: str | None
    access_key_id: str
    secret_access_key: str
    mount_tool: str = "auto"

    def mount_settings(self) -> dict[str, Any]:
        """The `storage.s3`-like settings a node's FUSE mount uses (no profile: the keys go in the environment)."""
        return {"endpoint_url": self.endpoint_url, "region": self.region, "mount_tool": self.mount_tool}

    def key_env(self) -> dict[str, str]:
        """The environment that hands these keys to a node's bucket work."""
        prefix = f"SORTIE_{self.kind.upper()}_"
        return {prefix + "ACCESS_KEY_ID": self.access_key_id, prefix + "SECRET_ACCESS_KEY": self.secret_access_key}


def is_compatible(kind: str) -> bool:
    return kind in KINDS


def config_of(kind: str, storage: StorageConfig) -> S3CompatibleConfig:
    config: S3CompatibleConfig = getattr(storage, kind)
    return config


def _read_small(path: Path, what: str) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise StorageError(f"{what}: {path} does not exist") from None
    except OSError as exc:
        raise StorageError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise StorageError(f"{what}: {path} is over {MAX_KEY_FILE_BYTES} bytes; is it the right file?")
    return data.decode(errors="replace")


def _keys(kind: CompatibleKind, config: S3CompatibleConfig,
          environ: Mapping[str, str]) -> tuple[str, str]:
    prefix = f"SORTIE_{kind.kind.upper()}_"
    given = environ.get(prefix + "ACCESS_KEY_ID"), environ.get(prefix + "SECRET_ACCESS_KEY")
    if given[0] and given[1]:
        return given[0], given[1]
    path = Path(config.credentials_file or kind.credentials_file).expanduser()
    profile = config.profile or kind.kind
    where = f"{kind.name} keys (storage.{kind.kind}.credentials_file, profile {profile})"
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(_read_small(path, where))
    except configparser.Error as exc:
        raise StorageError(f"{where}: {path} is not an AWS-style credentials file: "
                           f"{str(exc).splitlines()[0]}") from None
    if not parser.has_section(profile):
        raise StorageError(f"{where}: {path} has no [{profile}] section; add one with aws_access_key_id and "
                           "aws_secret_access_key")
    section = parser[profile]
    key, secret = section.get("aws_access_key_id", "").strip(), section.get("aws_secret_access_key", "").strip()
    if not key or not secret:
        raise StorageError(f"{where}: [{profile}] in {path} lacks aws_access_key_id or aws_secret_access_key")
    return key, secret


def _endpoint(kind: CompatibleKind, config: S3CompatibleConfig, region: str | None) -> str:
    if config.endpoint_url:
        return config.endpoint_url
    if kind.kind == "r2":
        account = (config.account_id or "").strip()
        if not account:
            account = _read_small(Path(R2_ACCOUNT_ID_FILE).expanduser(),
                                  "Cloudflare R2 account id (storage.r2.account_id)").strip()
        if not account.isalnum():
            raise StorageError(f"Cloudflare R2 account id {account[:40]!r} is not valid: letters and digits only; "
                               f"fix {R2_ACCOUNT_ID_FILE} or storage.r2.account_id")
        return f"https://{account}.r2.cloudflarestorage.com"
    if kind.kind == "oci":
        if not config.namespace or not region:
            raise StorageError("OCI Object Storage needs storage.oci.namespace and storage.oci.region (or "
                               "storage.oci.endpoint_url) in config.yaml for its S3 compatibility endpoint")
        return f"https://{config.namespace}.compat.objectstorage.{region}.oraclecloud.com"
    return f"https://storage.{region}.nebius.cloud:443"


def resolve(kind_name: str, storage: StorageConfig,
            environ: Mapping[str, str] | None = None) -> Resolved:
    """The endpoint and keys of an S3-compatible store, as this machine (or a node given them) has them."""
    kind = KINDS[kind_name]
    config = config_of(kind_name, storage)
    region = config.region or kind.region
    key, secret = _keys(kind, config, os.environ if environ is None else environ)
    return Resolved(kind_name, _endpoint(kind, config, region), region, key, secret, config.mount_tool)


def named_stores(urls: Iterable[str], storage: StorageConfig) -> dict[str, Resolved]:
    """The S3-compatible stores the bucket URLs name -> their endpoint and keys (as this machine has them): what a
    node's bucket work is given, and no other store's keys (policy/node_credentials.py)."""
    kinds = sorted({kind for url in urls if is_compatible(kind := parse_bucket_url(url).store)})
    return {kind: resolve(kind, storage) for kind in kinds}


class S3CompatibleStore(S3Store):
    """R2, OCI or Nebius: the S3 store with the endpoint and keys of `resolve`."""

    def __init__(self, kind: str, storage: StorageConfig, **options: Any) -> None:
        from orchestrator.config import S3Config

        resolved = resolve(kind, storage)
        self.store_name = KINDS[kind].name
        super().__init__(S3Config(endpoint_url=resolved.endpoint_url, region=resolved.region),
                         credentials=(resolved.access_key_id, resolved.secret_access_key), **options)
        self.kind = kind

    def _fail(self, exc: Exception, bucket: str, what: str) -> NoReturn:
        try:
            super()._fail(exc, bucket, what)
        except StorageError as error:
            text = str(error).replace("S3 bucket", f"{self.store_name} bucket").replace("S3 ", f"{self.store_name} ")
            text = text.replace("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage.s3.profile",
                                f"the keys in storage.{self.kind}.credentials_file")
            raise StorageError(text.replace("storage.s3.", f"storage.{self.kind}.")) from None
