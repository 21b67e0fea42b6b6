"""Object stores: bucket URLs, the `Store` protocol, the local store (a directory) and S3 (or any S3-compatible
endpoint). boto3 is imported only when an S3 store is opened.

Prefixes are paths in every store: prefix "a/b" covers the key "a/b" and keys under "a/b/", never "a/bc".
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from orchestrator.errors import SortieError

if TYPE_CHECKING:
    from orchestrator.config import S3Config, StorageConfig


class StorageError(SortieError):
    """A bucket or object could not be used; the message names it and what to do."""


class UploadTooLarge(StorageError):
    """An upload is over its size limit; raised before anything is uploaded."""


STORES = ("local", "s3", "r2", "oci", "nebius")  # r2, oci, nebius: s3_compatible.py
# Stores SkyPilot knows that Sortie does not support yet: store field -> (name in messages, URL schemes).
UNSUPPORTED_STORES: dict[str, tuple[str, tuple[str, ...]]] = {
    "gcs": ("GCS", ("gs",)),
    "azure": ("Azure Blob", ("az",)),
    "ibm": ("IBM COS", ("cos",)),
}
_SUPPORTED_SCHEMES = ", ".join(f"{s}://" for s in ("s3", "local", "r2", "oci", "nebius"))
_BUCKET_RULE = ("3-63 characters: lowercase letters, digits, dots and hyphens, "
                "starting and ending with a letter or digit")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_AZURE_HTTPS_RE = re.compile(r"^https://[^/]+\.blob\.core\.windows\.net(/|$)", re.IGNORECASE)


def check_bucket_name(name: str) -> str:
    """The name, if it is a valid bucket name (S3's rules, also used for local buckets)."""
    if not _BUCKET_RE.match(name):
        raise StorageError(f"bucket name {name!r} is not valid: use {_BUCKET_RULE}")
    return name


def normalize_key(key: str) -> str:
    """A key or prefix without leading, trailing or doubled slashes; '.' and '..' parts are refused."""
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageError(f"object key {key!r} has a '.' or '..' part; use plain path parts")
    return "/".join(parts)


def under_prefix(key: str, prefix: str) -> bool:
    """Whether `key` is the object `prefix` or under the directory `prefix` ("" covers everything)."""
    return not prefix or key == prefix or key.startswith(prefix + "/")


@dataclass(frozen=True)
class BucketURL:
    """A bucket, optionally with a path inside it."""

    store: str
    bucket: str
    prefix: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", normalize_key(self.prefix))

    def __str__(self) -> str:
        return f"{self.store}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def join(self, *parts: str) -> BucketURL:
        return BucketURL(self.store, self.bucket, "/".join([self.prefix, *parts]))


def parse_bucket_url(text: str) -> BucketURL:
    """`s3://BUCKET[/PATH]`, `local://BUCKET[/PATH]`, or an S3-compatible store's (`r2://`, `oci://`, `nebius://`)."""
    if _AZURE_HTTPS_RE.match(text):
        raise StorageError(f"{text}: Azure Blob buckets are not supported yet (supported: {_SUPPORTED_SCHEMES})")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise StorageError(f"{text}: not a bucket URL; write s3://BUCKET[/PATH] or local://BUCKET[/PATH]")
    scheme = scheme.lower()
    for name, schemes in UNSUPPORTED_STORES.values():
        if scheme in schemes:
            raise StorageError(f"{text}: {name} buckets are not supported yet (supported: {_SUPPORTED_SCHEMES})")
    if scheme not in STORES:
        raise StorageError(f"{text}: unknown bucket URL scheme {scheme}:// (supported: {_SUPPORTED_SCHEMES})")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"{text}: names no bucket; write {scheme}://BUCKET[/PATH]")
    try:
        check_bucket_name(bucket)
        return BucketURL(scheme, bucket, prefix)
    except StorageError as exc:
        raise StorageError(f"{text}: {exc}") from None


def store_kind(store_field: str) -> str:
    """Normalize a task YAML's `store:` value to a supported store kind."""
    kind = store_field.strip().lower()
    if kind in STORES:
        return kind
    if kind in UNSUPPORTED_STORES:
        raise StorageError(f"store {kind} is not supported yet (supported: {', '.join(STORES)})")
    known = ", ".join([*STORES, *UNSUPPORTED_STORES])
    raise StorageError(f"store {store_field!r} is unknown (known: {known}); use one of: {', '.join(STORES)}")


class Store(Protocol):
    """A place of buckets of objects. Keys are posix paths; prefixes are paths (see the module docstring)."""

    kind: str

    def bucket_exists(self, bucket: str) -> bool: ...
    def create_bucket(self, bucket: str) -> None: ...
    def delete_bucket(self, bucket: str) -> None: ...
    def list_objects(self, bucket: str, prefix: str = "") -> dict[str, int]: ...
    def put_file(self, bucket: str, key: str, path: Path) -> None: ...
    def get_file(self, bucket: str, key: str, path: Path) -> None: ...
    def delete_prefix(self, bucket: str, prefix: str) -> int: ...
    def local_dir(self, bucket: str, prefix: str = "") -> Path | None: ...


def _copy_atomic(source: Path, target: Path) -> None:
    """Copy a file so that `target` is either the old file or the whole new one, never half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(target)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.sortie-{secrets.token_hex(4)}.tmp")


def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".sortie-" in name and name.endswith(".tmp")


class LocalStore:
    """Buckets are directories `root/NAME` (0700); an object is the file at its key under them."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _bucket_dir(self, bucket: str) -> Path:
        return self.root / check_bucket_name(bucket)

    def _existing(self, bucket: str) -> Path:
        path = self._bucket_dir(bucket)
        if not path.is_dir():
            raise StorageError(f"bucket local://{bucket} does not exist (in {self.root}); create it or fix the name")
        return path

    def bucket_exists(self, bucket: str) -> bool:
        return self._bucket_dir(bucket).is_dir()

    def create_bucket(self, bucket: str) -> None:
        path = self._bucket_dir(bucket)
        self.root.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)

    def delete_bucket(self, bucket: str) -> None:
        shutil.rmtree(self._bucket_dir(bucket), ignore_errors=True)

    def list_objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        base = self._existing(bucket)
        prefix = normalize_key(prefix)
        start = base / prefix if prefix else base
        if start.is_file():
            return {prefix: start.stat().st_size}
        found: dict[str, int] = {}
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                path = Path(dirpath, name)
                if not _is_temp(name):
                    found[path.relative_to(base).as_posix()] = path.stat().st_size
        return dict(sorted(found.items()))

    def put_file(self, bucket: str, key: str, path: Path) -> None:
        target = self._existing(bucket) / normalize_key(key)
        try:
            _copy_atomic(path, target)
        except FileNotFoundError as exc:
            raise StorageError(f"cannot upload {path}: {exc.strerror}: {exc.filename}") from None
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
            raise StorageError(f"local://{bucket}/{key}: a key and a directory of keys collide ({exc.strerror}); "
                               "the local store cannot hold both") from None

    def get_file(self, bucket: str, key: str, path: Path) -> None:
        source = self._existing(bucket) / normalize_key(key)
        if not source.is_file():
            raise StorageError(f"local://{bucket}/{key} does not exist; check the path")
        _copy_atomic(source, path)

    def delete_prefix(self, bucket: str, prefix: str) -> int:
        if not self.bucket_exists(bucket):
            return 0
        prefix = normalize_key(prefix)
        keys = self.list_objects(bucket, prefix)
        base = self._bucket_dir(bucket)
        target = base / prefix if prefix else base
        if target.is_file():
            target.unlink()
        elif prefix:
            shutil.rmtree(target, ignore_errors=True)
        else:
            for child in base.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        return len(keys)

    def local_dir(self, bucket: str, prefix: str = "") -> Path | None:
        prefix = normalize_key(prefix)
        base = self._bucket_dir(bucket)
        return base / prefix if prefix else base


_NO_CREDENTIALS = ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or name a profile "
                   "from ~/.aws in storage.s3.profile (config.yaml)")


class S3Store:
    """AWS S3 or an S3-compatible endpoint, through boto3 (multi-part transfers for big files)."""

    kind = "s3"

    def __init__(self, config: S3Config, *, connect_timeout: float = 10.0, max_attempts: int = 3,
                 part_size: int = 64 * 2**20, credentials: tuple[str, str] | None = None) -> None:
        """`max_attempts` counts the first try; files over `part_size` move in parts of that size; `credentials`
        (key id, secret) replace boto3's chain (the S3-compatible stores' own keys)."""
        try:
            import boto3
            import boto3.s3.transfer
            import botocore.config
            import botocore.exceptions
        except ImportError:
            raise StorageError("the S3 store needs boto3: pip install 'sortie[s3]'") from None
        self._exc = botocore.exceptions
        self.config = config
        options: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "read_timeout": 60,
            "retries": {"max_attempts": max_attempts, "mode": "standard"},
            "max_pool_connections": 32,
        }
        if config.endpoint_url:
            options["s3"] = {"addressing_style": "path"}
        try:
            keys = ({"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]}
                    if credentials else {})
            session = boto3.session.Session(profile_name=config.profile, region_name=config.region, **keys)
            self.client = session.client("s3", endpoint_url=config.endpoint_url,
                                         config=botocore.config.Config(**options))
        except botocore.exceptions.ProfileNotFound:
            raise StorageError(f"storage.s3.profile {config.profile!r} is not in ~/.aws/config or "
                               "~/.aws/credentials; fix the profile name") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageError(f"cannot set up the S3 client: {exc}; check storage.s3 in config.yaml") from None
        self._transfer = boto3.s3.transfer.TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size)

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def _fail(self, exc: Exception, bucket: str, what: str) -> NoReturn:
        """Raise the one-line StorageError for a botocore/boto3 error."""
        raise StorageError(s3_error_message(exc, bucket, what, self.endpoint)) from None

    def bucket_exists(self, bucket: str) -> bool:
        try:
            self.client.head_bucket(Bucket=bucket)
            return True
        except self._exc.ClientError as exc:
            if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                return False
            self._fail(exc, bucket, f"checking {self.kind}://{bucket}")
        except Exception as exc:
            self._fail(exc, bucket, f"checking {self.kind}://{bucket}")

    def create_bucket(self, bucket: str) -> None:
        if self.bucket_exists(bucket):
            return
        region = self.config.region or self.client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except self._exc.ClientError as exc:
            if _code(exc) != "BucketAlreadyOwnedByYou":
                self._fail(exc, bucket, f"creating {self.kind}://{bucket}")
        except Exception as exc:
            self._fail(exc, bucket, f"creating {self.kind}://{bucket}")

    def delete_bucket(self, bucket: str) -> None:
        if not self.bucket_exists(bucket):
            return
        self.delete_prefix(bucket, "")
        try:
            try:
                self.client.delete_bucket(Bucket=bucket)
            except self._exc.ClientError as exc:
                if _code(exc) != "BucketNotEmpty":
                    raise
                self._delete_versions(bucket)  # a versioned bucket keeps old versions and delete markers
                self.client.delete_bucket(Bucket=bucket)
        except self._exc.ClientError as exc:
            if _code(exc) not in ("404", "NoSuchBucket"):
                self._fail(exc, bucket, f"deleting {self.kind}://{bucket}")
        except StorageError:
            raise
        except Exception as exc:
            self._fail(exc, bucket, f"deleting {self.kind}://{bucket}")

    def _delete_versions(self, bucket: str) -> None:
        for page in self.client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            batch = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                     for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]]
            self._delete_batch(bucket, batch)

    def _delete_batch(self, bucket: str, objects: list[dict[str, str]]) -> None:
        for start in range(0, len(objects), 1000):
            chunk = objects[start : start + 1000]
            reply = self.client.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
            errors = reply.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(f"could not delete {self.kind}://{bucket}/{first.get('Key')}: {first.get('Code')}: "
                                   f"{first.get('Message')} ({len(errors)} objects failed)")

    def list_objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        prefix = normalize_key(prefix)
        found: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if under_prefix(obj["Key"], prefix):
                        found[obj["Key"]] = int(obj["Size"])
        except Exception as exc:
            self._fail(exc, bucket, f"listing {self.kind}://{bucket}/{prefix}")
        return dict(sorted(found.items()))

    def put_file(self, bucket: str, key: str, path: Path) -> None:
        key = normalize_key(key)
        try:
            self.client.upload_file(str(path), bucket, key, Config=self._transfer)
        except FileNotFoundError as exc:
            raise StorageError(f"cannot upload {path}: {exc.strerror}") from None
        except Exception as exc:
            self._fail(exc, bucket, f"uploading {path} to {self.kind}://{bucket}/{key}")

    def get_file(self, bucket: str, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(path)
        try:
            self.client.download_file(bucket, key, str(tmp), Config=self._transfer)
            os.replace(tmp, path)
        except self._exc.ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise StorageError(f"{self.kind}://{bucket}/{key} does not exist; check the path") from None
            self._fail(exc, bucket, f"downloading {self.kind}://{bucket}/{key}")
        except Exception as exc:
            self._fail(exc, bucket, f"downloading {self.kind}://{bucket}/{key}")
        finally:
            tmp.unlink(missing_ok=True)

    def delete_prefix(self, bucket: str, prefix: str) -> int:
        try:
            keys = list(self.list_objects(bucket, prefix))
        except StorageError:
            if not self.bucket_exists(bucket):
                return 0
            raise
        try:
            self._delete_batch(bucket, [{"Key": k} for k in keys])
        except StorageError:
            raise
        except Exception as exc:
            self._fail(exc, bucket, f"deleting {self.kind}://{bucket}/{normalize_key(prefix)}")
        return len(keys)

    def local_dir(self, bucket: str, prefix: str = "") -> Path | None:
        return None


def open_store(kind: str, config: StorageConfig, home: Path) -> Store:
    """The store of a kind (as `store_kind` accepts) as `config` sets it up."""
    kind = store_kind(kind)
    if kind == "s3":
        return S3Store(config.s3)
    if kind != "local":
        from orchestrator.storage.s3_compatible import S3CompatibleStore

        return S3CompatibleStore(kind, config)
    return LocalStore(Path(config.local_root).expanduser() if config.local_root else Path(home) / "buckets")


def _code(exc: Any) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def s3_error_message(exc: BaseException, bucket: str, what: str, endpoint: str) -> str:
    """One line for an error of boto3/botocore while `what` (e.g. "creating s3://b")."""
    cause = exc.__context__ if type(exc).__name__ == "S3UploadFailedError" and exc.__context__ else exc
    name = type(cause).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return _NO_CREDENTIALS
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ProxyConnectionError"):
        return (f"S3 endpoint {endpoint} is unreachable while {what}; check storage.s3.endpoint_url "
                "and that the service is up")
    code = _code(cause)
    if code in ("AccessDenied", "403", "AllAccessDisabled", "AccountProblem"):
        return (f"access to S3 bucket {bucket} is denied while {what}: the bucket belongs to another account "
                "or these credentials lack permission; use another bucket or fix the credentials")
    if code == "BucketAlreadyExists":
        return f"S3 bucket {bucket} belongs to another account; choose another bucket name"
    if code == "NoSuchBucket":
        return f"S3 bucket {bucket} does not exist; create it or fix the name"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
        return (f"S3 at {endpoint} refused the credentials ({code}) while {what}; check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or storage.s3.profile")
    detail = str(cause).splitlines()[0] if str(cause) else name
    return f"S3 error while {what}: {detail}"
