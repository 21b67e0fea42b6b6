"""Object stores: bucket URLs, the `Store` protocol, the local store (a directory) and S3 (or any S3-compatible
endpoint). boto3 is imported only when an S3 store is opened.

Prefixes are paths in every store: prefix "a/b" covers the key "a/b" and keys under "a/b/", never "a/bc".
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, Protocol

from orchestrator.errors import SortieError
from orchestrator.node.nofollow import (
    Reader,
    lstat_at,
    open_dir,
    open_file,
    opened_dir,
    readable_as,
    regular_files,
    walk_down,
)

if TYPE_CHECKING:
    from orchestrator.config import S3Config, StorageConfig


class StorageError(SortieError):
    """A bucket or object could not be used; the message names it and what to do."""


class UploadTooLarge(StorageError):
    """An upload is over its size limit; raised before anything is uploaded."""


STORES = ("local", "s3")
# Stores SkyPilot knows that Sortie does not support yet: store field -> (name in messages, URL schemes).
UNSUPPORTED_STORES: dict[str, tuple[str, tuple[str, ...]]] = {
    "gcs": ("GCS", ("gs",)),
    "azure": ("Azure Blob", ("az",)),
    "r2": ("Cloudflare R2", ("r2",)),
    "ibm": ("IBM COS", ("cos",)),
    "oci": ("OCI Object Storage", ("oci",)),
    "nebius": ("Nebius Object Storage", ("nebius",)),
}
_SUPPORTED_SCHEMES = ", ".join(f"{s}://" for s in ("s3", "local"))
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
    """`s3://BUCKET[/PATH]` or `local://BUCKET[/PATH]`."""
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


def _copy_atomic(source: Path | BinaryIO, target: Path) -> None:
    """Copy a file (a path, or a file open for reading) so that `target` is either the old file or the whole new
    one, never half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(target)
    try:
        if isinstance(source, Path):
            shutil.copyfile(source, tmp)
        else:
            with tmp.open("xb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.sortie-{secrets.token_hex(4)}.tmp")


def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".sortie-" in name and name.endswith(".tmp")


def _key_parts(key: str) -> list[str]:
    key = normalize_key(key)
    return key.split("/") if key else []


def _remove_at(dirfd: int, name: str) -> None:
    """Remove the entry `name` of the directory `dirfd`: a link itself (never what it points at), a file, or a
    directory tree (shutil.rmtree by descriptor follows no link)."""
    st = lstat_at(dirfd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dirfd, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dirfd)


class LocalStore:
    """Buckets are directories `root/NAME` (0700); an object is the regular file at its key under them.

    Issue 28: every path below `root` is resolved by `orchestrator.node.nofollow` (one component at a time,
    O_NOFOLLOW), as an object store's keys are: a symlink in a bucket (a job that MOUNTs it can make one) is no
    object. It is never listed, read, written through or deleted through (only itself is removed), and a key
    whose path crosses one does not exist. With `reader` (the identity of the run a node fetches for), a file
    with several hard links is read only if that identity may read it: a job cannot hard-link its way to a file
    only root reads."""

    kind = "local"

    def __init__(self, root: Path, reader: Reader | None = None) -> None:
        self.root = Path(root)
        self.reader = reader

    def _bucket_dir(self, bucket: str) -> Path:
        return self.root / check_bucket_name(bucket)

    def _bucket_fd(self, bucket: str) -> int:
        try:
            return open_dir(self.root, [check_bucket_name(bucket)])
        except FileNotFoundError:
            raise StorageError(f"bucket local://{bucket} does not exist (in {self.root}); create it or fix the "
                               "name") from None
        except OSError as exc:
            raise StorageError(f"bucket local://{bucket}: {self._bucket_dir(bucket)} is not a directory "
                               f"({exc.strerror}); the local store follows no symlinks") from None

    def _dir_fd(self, bucket: str, parts: list[str], create: bool = False, key: str | None = None) -> int:
        """A descriptor of the directory bucket/parts, nothing followed (made where missing, with `create`);
        `key`: the object the directory is for, in messages."""
        fd = self._bucket_fd(bucket)
        where = f"local://{bucket}/{key if key is not None else '/'.join(parts)}"
        try:
            return walk_down(fd, parts, 0o777 if create else None)
        except FileNotFoundError:
            raise StorageError(f"{where} does not exist; check the path") from None
        except OSError as exc:
            raise StorageError(f"{where}: a file or a symlink is in the way ({exc.strerror}); the local store "
                               "follows no symlinks, and a key cannot also be a directory of keys") from None

    def bucket_exists(self, bucket: str) -> bool:
        try:
            os.close(self._bucket_fd(bucket))
        except StorageError:
            return False
        return True

    def create_bucket(self, bucket: str) -> None:
        path = self._bucket_dir(bucket)
        self.root.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)

    def delete_bucket(self, bucket: str) -> None:
        with contextlib.suppress(OSError), opened_dir(self.root) as fd:
            _remove_at(fd, check_bucket_name(bucket))

    def list_objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        parts = _key_parts(prefix)
        try:
            fd = walk_down(self._bucket_fd(bucket), parts)
        except OSError:  # a file (one object), nothing, or only through a link (nothing of the bucket's)
            return self._one_object(bucket, parts)
        try:
            base = "".join(f"{p}/" for p in parts)
            found = {base + key: st.st_size for key, st in regular_files(fd) if not _is_temp(key.rsplit("/", 1)[-1])}
            return dict(sorted(found.items()))
        finally:
            os.close(fd)

    def _one_object(self, bucket: str, parts: list[str]) -> dict[str, int]:
        """{key: size} when bucket/parts is a regular file reached through no link, else {}."""
        if not parts:
            return {}
        try:
            fd = walk_down(self._bucket_fd(bucket), parts[:-1])
        except OSError:
            return {}
        try:
            st = lstat_at(fd, parts[-1])
        except OSError:
            st = None
        finally:
            os.close(fd)
        return {"/".join(parts): st.st_size} if st is not None and stat.S_ISREG(st.st_mode) else {}

    def put_file(self, bucket: str, key: str, path: Path) -> None:
        *dirs, name = _key_parts(key) or [""]
        if not name:
            raise StorageError(f"local://{bucket}: an object needs a key; name a file")
        try:
            source = open(path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError as exc:
            raise StorageError(f"cannot upload {path}: {exc.strerror}: {exc.filename}") from None
        with source:
            fd = self._dir_fd(bucket, dirs, create=True, key=key)
            tmp = f".{name}.sortie-{secrets.token_hex(4)}.tmp"
            try:
                out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                              dir_fd=fd)
                with os.fdopen(out, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
                os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
                raise StorageError(f"local://{bucket}/{key}: a key and a directory of keys collide "
                                   f"({exc.strerror}); the local store cannot hold both") from None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=fd)
                os.close(fd)

    def get_file(self, bucket: str, key: str, path: Path) -> None:
        try:
            fd = open_file(self.root, "/".join([check_bucket_name(bucket), *_key_parts(key)]))
        except (FileNotFoundError, IsADirectoryError):
            raise StorageError(f"local://{bucket}/{key} does not exist; check the path") from None
        except OSError as exc:
            raise StorageError(f"local://{bucket}/{key} is not a file of the bucket ({exc.strerror}): the local "
                               "store follows no symlinks; name the file itself") from None
        with os.fdopen(fd, "rb") as source:
            if self.reader is not None and os.fstat(fd).st_nlink > 1 and not readable_as(fd, self.reader):
                raise StorageError(f"local://{bucket}/{key} is a hard link to a file the job's user may not read; "
                                   "it is not copied")
            _copy_atomic(source, path)

    def delete_prefix(self, bucket: str, prefix: str) -> int:
        if not self.bucket_exists(bucket):
            return 0
        parts = _key_parts(prefix)
        keys = self.list_objects(bucket, prefix)
        try:
            fd = walk_down(self._bucket_fd(bucket), parts[:-1])
        except OSError:
            return 0  # only through a link: nothing of the bucket's there
        try:
            for name in parts[-1:] or os.listdir(fd):
                _remove_at(fd, name)
        finally:
            os.close(fd)
        return len(keys)

    def local_dir(self, bucket: str, prefix: str = "") -> Path | None:
        prefix = normalize_key(prefix)
        base = self._bucket_dir(bucket)
        return base / prefix if prefix else base

    def make_dir(self, bucket: str, prefix: str = "") -> Path:
        """The directory of `prefix` in the bucket (a local-store MOUNT's target), made where missing, every
        component a directory of the bucket's own (StorageError for a symlink or a file on the way)."""
        os.close(self._dir_fd(bucket, _key_parts(prefix), create=True))
        path = self.local_dir(bucket, prefix)
        assert path is not None
        return path


_NO_CREDENTIALS = ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or name a profile "
                   "from ~/.aws in storage.s3.profile (config.yaml)")


class S3Store:
    """AWS S3 or an S3-compatible endpoint, through boto3 (multi-part transfers for big files)."""

    kind = "s3"

    def __init__(self, config: S3Config, *, connect_timeout: float = 10.0, max_attempts: int = 3,
                 part_size: int = 64 * 2**20) -> None:
        """`max_attempts` counts the first try; files over `part_size` move in parts of that size."""
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
            session = boto3.session.Session(profile_name=config.profile, region_name=config.region)
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
            self._fail(exc, bucket, f"checking s3://{bucket}")
        except Exception as exc:
            self._fail(exc, bucket, f"checking s3://{bucket}")

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
                self._fail(exc, bucket, f"creating s3://{bucket}")
        except Exception as exc:
            self._fail(exc, bucket, f"creating s3://{bucket}")

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
                self._fail(exc, bucket, f"deleting s3://{bucket}")
        except StorageError:
            raise
        except Exception as exc:
            self._fail(exc, bucket, f"deleting s3://{bucket}")

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
                raise StorageError(f"could not delete s3://{bucket}/{first.get('Key')}: {first.get('Code')}: "
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
            self._fail(exc, bucket, f"listing s3://{bucket}/{prefix}")
        return dict(sorted(found.items()))

    def put_file(self, bucket: str, key: str, path: Path) -> None:
        key = normalize_key(key)
        try:
            self.client.upload_file(str(path), bucket, key, Config=self._transfer)
        except FileNotFoundError as exc:
            raise StorageError(f"cannot upload {path}: {exc.strerror}") from None
        except Exception as exc:
            self._fail(exc, bucket, f"uploading {path} to s3://{bucket}/{key}")

    def get_file(self, bucket: str, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(path)
        try:
            self.client.download_file(bucket, key, str(tmp), Config=self._transfer)
            os.replace(tmp, path)
        except self._exc.ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise StorageError(f"s3://{bucket}/{key} does not exist; check the path") from None
            self._fail(exc, bucket, f"downloading s3://{bucket}/{key}")
        except Exception as exc:
            self._fail(exc, bucket, f"downloading s3://{bucket}/{key}")
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
            self._fail(exc, bucket, f"deleting s3://{bucket}/{normalize_key(prefix)}")
        return len(keys)

    def local_dir(self, bucket: str, prefix: str = "") -> Path | None:
        return None


def local_store_root(config: StorageConfig, home: Path) -> Path:
    """The directory of the local store (`storage.local_root`, default <home>/buckets)."""
    return Path(config.local_root).expanduser() if config.local_root else Path(home) / "buckets"


def open_store(kind: str, config: StorageConfig, home: Path, reader: Reader | None = None) -> Store:
    """The store of a kind ("local" or "s3", as `store_kind` accepts) as `config` sets it up; `reader`: the
    identity a node's fetch reads a local store's hard-linked files as (`LocalStore`)."""
    kind = store_kind(kind)
    if kind == "s3":
        return S3Store(config.s3)
    return LocalStore(local_store_root(config, home), reader)


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
