"""Object stores: the local store and S3 (moto's real server on loopback), bucket URLs, ignore files,
tree upload/download and the MOUNT_CACHED write-back cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator.config import S3Config, StorageConfig
from orchestrator.storage import (
    BucketURL,
    CachedSync,
    LocalStore,
    S3Store,
    StorageError,
    Store,
    TreeStats,
    UploadTooLarge,
    check_bucket_name,
    download_tree,
    open_store,
    parse_bucket_url,
    scan_tree,
    store_kind,
    upload_tree,
)
from orchestrator.storage.stores import s3_error_message
from tests.support.s3 import free_port

BUCKET = "sortie-test"
SUPPORTED = "s3://, local://, r2://, oci://, nebius://"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "buckets")
    return S3Store(request.getfixturevalue("s3_env"), part_size=5 * 2**20)


@pytest.fixture
def bucket(store: Store) -> str:
    store.create_bucket(BUCKET)
    return BUCKET


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class CountingStore:
    """Delegates to a real store, counting uploads."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.puts: list[str] = []

    def put_file(self, bucket: str, key: str, path: Path) -> None:
        self.puts.append(key)
        self.inner.put_file(bucket, key, path)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


# ---------------------------------------------------------------- store behaviour, on both stores


def test_bucket_lifecycle_is_idempotent(store: Store, tmp_path: Path) -> None:
    assert not store.bucket_exists(BUCKET)
    store.create_bucket(BUCKET)
    store.create_bucket(BUCKET)
    assert store.bucket_exists(BUCKET)
    for key in ("a", "d/b", "d/e/c"):
        store.put_file(BUCKET, key, write(tmp_path / "f", key))
    store.delete_bucket(BUCKET)
    assert not store.bucket_exists(BUCKET)
    store.delete_bucket(BUCKET)
    if isinstance(store, LocalStore):
        assert (tmp_path / "buckets").is_dir()
        store.create_bucket(BUCKET)
        assert (tmp_path / "buckets" / BUCKET).stat().st_mode & 0o777 == 0o700


def test_list_uses_path_prefixes(store: Store, bucket: str, tmp_path: Path) -> None:
    sizes = {"a/b/c": 1, "a/b/d/e": 2, "a/bc": 3, "x/y": 4}
    for key, size in sizes.items():
        store.put_file(bucket, key, write(tmp_path / "f", b"z" * size))
    assert store.list_objects(bucket) == sizes
    assert store.list_objects(bucket, "a/b") == {"a/b/c": 1, "a/b/d/e": 2}
    assert store.list_objects(bucket, "/a/b/") == {"a/b/c": 1, "a/b/d/e": 2}
    assert store.list_objects(bucket, "a/bc") == {"a/bc": 3}
    assert store.list_objects(bucket, "a") == {"a/b/c": 1, "a/b/d/e": 2, "a/bc": 3}
    assert store.list_objects(bucket, "a/b/c") == {"a/b/c": 1}
    assert store.list_objects(bucket, "nothing") == {}
    with pytest.raises(StorageError, match="no-such-bucket"):
        store.list_objects("no-such-bucket")


def test_put_get_round_trip(store: Store, bucket: str, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    store.put_file(bucket, "dir/obj.bin", write(tmp_path / "src.bin", data))
    target = tmp_path / "out" / "deep" / "obj.bin"
    store.get_file(bucket, "dir/obj.bin", target)
    assert target.read_bytes() == data
    write(target, b"old contents")
    store.get_file(bucket, "dir/obj.bin", target)
    assert target.read_bytes() == data
    assert sorted(p.name for p in target.parent.iterdir()) == ["obj.bin"]  # no temp file left
    with pytest.raises(StorageError, match="dir/missing"):
        store.get_file(bucket, "dir/missing", tmp_path / "x")
    if isinstance(store, LocalStore):
        assert store.local_dir(bucket, "dir") == tmp_path / "buckets" / bucket / "dir"
    else:
        assert store.local_dir(bucket, "dir") is None


def test_delete_prefix_leaves_other_prefixes(store: Store, bucket: str, tmp_path: Path) -> None:
    for key in ("job-1/x", "job-1/y/z", "job-10/x", "other"):
        store.put_file(bucket, key, write(tmp_path / "f", key))
    assert store.delete_prefix(bucket, "job-1") == 2
    assert list(store.list_objects(bucket)) == ["job-10/x", "other"]
    assert store.delete_prefix(bucket, "job-1") == 0
    assert store.delete_prefix("no-such-bucket", "job-1") == 0
    assert store.delete_prefix(bucket, "") == 2
    assert store.list_objects(bucket) == {}
    assert store.bucket_exists(bucket)


def make_tree(root: Path) -> dict[str, bytes]:
    content = {
        "train.py": b"print('hi')\n",
        "empty": b"",
        "data/blob.bin": os.urandom(70_000),
        "data/nested/deeper/x.txt": b"x" * 10,
        "data/nested/y.txt": b"y",
        "conf/a b.yaml": b"key: value\n",
    }
    for rel, data in content.items():
        write(root / rel, data)
    return content


def test_tree_round_trip(store: Store, bucket: str, tmp_path: Path) -> None:
    content = make_tree(tmp_path / "src")
    dest = BucketURL(store.kind, bucket).join("job-1", "workdir")
    stats = upload_tree(store, tmp_path / "src", dest)
    assert stats == TreeStats(len(content), sum(map(len, content.values())))
    assert sorted(store.list_objects(bucket)) == sorted(f"job-1/workdir/{k}" for k in content)
    out = tmp_path / "out"
    assert download_tree(store, dest, out) == stats
    assert files_of(out) == content
    # A sub-"directory" downloads alone, relative to its own prefix.
    assert download_tree(store, dest.join("data/nested"), tmp_path / "nested") == TreeStats(2, 11)
    assert files_of(tmp_path / "nested") == {"deeper/x.txt": b"x" * 10, "y.txt": b"y"}


def test_single_file_upload_and_download(store: Store, bucket: str, tmp_path: Path) -> None:
    data = os.urandom(1000)
    src = write(tmp_path / "model.ckpt", data)
    dest = BucketURL(store.kind, bucket, "mounts/m")
    assert upload_tree(store, src, dest) == TreeStats(1, 1000)
    assert store.list_objects(bucket) == {"mounts/m/model.ckpt": 1000}
    target = tmp_path / "got" / "weights.ckpt"
    assert download_tree(store, dest.join("model.ckpt"), target) == TreeStats(1, 1000)
    assert target.read_bytes() == data


def test_download_of_missing_prefix_is_an_empty_dir(store: Store, bucket: str, tmp_path: Path) -> None:
    assert download_tree(store, BucketURL(store.kind, bucket, "nothing/here"), tmp_path / "d") == TreeStats(0, 0)
    assert (tmp_path / "d").is_dir()
    assert list((tmp_path / "d").iterdir()) == []


def test_upload_too_large_uploads_nothing(store: Store, bucket: str, tmp_path: Path) -> None:
    for i in range(3):
        write(tmp_path / "src" / f"f{i}", b"z" * 1000)
    with pytest.raises(UploadTooLarge) as info:
        upload_tree(store, tmp_path / "src", BucketURL(store.kind, bucket, "w"), max_bytes=2999, what="workdir")
    message = str(info.value)
    assert message.startswith(f"workdir {tmp_path / 'src'} is 2.9 KiB after .gitignore/.skyignore, over the 2.9 KiB")
    assert "jobs.max_upload_mb" in message and ".skyignore" in message
    assert store.list_objects(bucket) == {}
    assert upload_tree(store, tmp_path / "src", BucketURL(store.kind, bucket), max_bytes=3000).files == 3


def test_progress_reaches_the_total(store: Store, bucket: str, tmp_path: Path) -> None:
    content = make_tree(tmp_path / "src")
    total = sum(map(len, content.values()))
    calls: list[tuple[int, int]] = []
    upload_tree(store, tmp_path / "src", BucketURL(store.kind, bucket), progress=lambda d, t: calls.append((d, t)))
    assert len(calls) == len(content)
    assert calls[-1] == (total, total)
    assert [d for d, _t in calls] == sorted(d for d, _t in calls)


def test_cached_sync_pushes_only_changes(store: Store, bucket: str, tmp_path: Path) -> None:
    url = BucketURL(store.kind, bucket, "ckpt")
    for name in ("a", "b", "sub/c"):
        store.put_file(bucket, f"ckpt/{name}", write(tmp_path / "f", name[-1] * 5))
    counting = CountingStore(store)
    local = tmp_path / "cache"
    state = tmp_path / "state" / "sync.json"
    sync = CachedSync(counting, url, local, state_file=state)
    assert sync.pull() == TreeStats(3, 15)
    assert files_of(local) == {"a": b"aaaaa", "b": b"bbbbb", "sub/c": b"ccccc"}
    assert sync.push() == TreeStats(0, 0)
    assert counting.puts == []

    write(local / "b", b"BBBBB")  # same size, so the mtime must tell
    stat = (local / "b").stat()
    os.utime(local / "b", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    write(local / "new/d", b"dd")
    assert sync.pending() == ["b", "new/d"]
    assert sync.push() == TreeStats(2, 7)
    assert sorted(counting.puts) == ["ckpt/b", "ckpt/new/d"]
    assert sync.push() == TreeStats(0, 0)
    assert len(counting.puts) == 2
    got = tmp_path / "check"
    download_tree(store, url, got)
    assert files_of(got)["b"] == b"BBBBB" and files_of(got)["new/d"] == b"dd"

    (local / "a").unlink()  # deletions are not propagated
    assert sync.push() == TreeStats(0, 0)
    assert "ckpt/a" in store.list_objects(bucket)

    # A new instance with the same state file knows what was synced.
    again = CachedSync(counting, url, local, state_file=state)
    assert again.pending() == []
    write(local / "a", b"back")  # made again after it was forgotten: uploaded
    assert again.push() == TreeStats(1, 4)
    assert CachedSync(counting, url, local).pending() == ["a", "b", "new/d", "sub/c"]  # no state: everything
    assert CachedSync(counting, url.join("other"), local, state_file=state).pending() != []  # state of another URL


def test_s3_multipart_round_trip(s3_env: S3Config, tmp_path: Path) -> None:
    store = S3Store(s3_env, part_size=5 * 2**20)
    store.create_bucket(BUCKET)
    data = os.urandom(11 * 2**20 + 123)
    store.put_file(BUCKET, "big.bin", write(tmp_path / "big.bin", data))
    store.get_file(BUCKET, "big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    head = store.client.head_object(Bucket=BUCKET, Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    store.delete_bucket(BUCKET)


def test_s3_delete_bucket_paginates(s3_env: S3Config, tmp_path: Path) -> None:
    store = S3Store(s3_env)
    store.create_bucket(BUCKET)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: store.client.put_object(Bucket=BUCKET, Key=f"k/{i:04d}", Body=b""), range(1005)))
    assert len(store.list_objects(BUCKET, "k")) == 1005
    store.delete_bucket(BUCKET)
    assert not store.bucket_exists(BUCKET)


def test_s3_delete_versioned_bucket(s3_env: S3Config, tmp_path: Path) -> None:
    store = S3Store(s3_env)
    store.create_bucket(BUCKET)
    store.client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    for data in ("one", "two"):
        store.put_file(BUCKET, "k", write(tmp_path / "f", data))
    store.delete_bucket(BUCKET)
    assert not store.bucket_exists(BUCKET)


def test_local_store_refuses_colliding_keys_and_bad_names(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "b")
    store.create_bucket(BUCKET)
    store.put_file(BUCKET, "a", write(tmp_path / "f", "x"))
    with pytest.raises(StorageError, match="local://sortie-test/a/b"):
        store.put_file(BUCKET, "a/b", tmp_path / "f")
    store.put_file(BUCKET, "c/d", tmp_path / "f")
    with pytest.raises(StorageError, match="local://sortie-test/c: a key and a directory"):
        store.put_file(BUCKET, "c", tmp_path / "f")
    with pytest.raises(StorageError, match=r"'\.\.'"):
        store.put_file(BUCKET, "../escape", tmp_path / "f")
    with pytest.raises(StorageError, match=r"'\.\./b'"):
        store.create_bucket("../b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [BUCKET]


# ---------------------------------------------------------------- ignore files


def keys(root: Path, **kwargs: bool) -> list[str]:
    return [key for key, _path, _size in scan_tree(root, **kwargs)]


def test_gitignore_root_subdir_and_negation(tmp_path: Path) -> None:
    root = tmp_path / "w"
    write(root / ".gitignore", "# comment\n*.log\n!keep.log\nbuild/\n!build/re.txt\n")
    for rel in ("a.py", "x.log", "keep.log", "build/out.bin", "build/re.txt", "sub/y.log", "sub/keep.log",
                "sub/data/big.bin", "sub/z.tmp", "z.tmp", "sub/only_here.txt", "sub/deeper/only_here.txt",
                "sub/deeper/data/kept-no", "special/special.log", "special/other.log", ".git/HEAD",
                "sub/build/o"):
        write(root / rel, rel)
    write(root / "sub/.gitignore", "data/\n*.tmp\n/only_here.txt\n")
    write(root / "special/.gitignore", "!special.log\n")
    assert keys(root) == [
        ".gitignore", "a.py", "keep.log", "special/.gitignore", "special/special.log", "sub/.gitignore",
        "sub/deeper/only_here.txt", "sub/keep.log", "z.tmp",
    ]
    assert len(keys(root, use_ignore_files=False)) == 20


def test_gitignore_whitelist_idiom(tmp_path: Path) -> None:
    root = tmp_path / "w"
    write(root / ".gitignore", "*\n!*/\n!*.py\n!.gitignore\n")
    for rel in ("a.py", "a.txt", "src/b.py", "src/b.txt", "src/deep/c.py"):
        write(root / rel, rel)
    assert keys(root) == [".gitignore", "a.py", "src/b.py", "src/deep/c.py"]


def test_skyignore_replaces_gitignore(tmp_path: Path) -> None:
    root = tmp_path / "w"
    write(root / ".gitignore", "*.log\n")
    write(root / "sub/.gitignore", "*\n")
    write(root / ".skyignore", "data/\n/top.txt\n*.ckpt\n")
    for rel in ("x.log", "top.txt", "sub/top.txt", "data/a", "sub/data/b", "m.ckpt", "sub/m.ckpt", "sub/k"):
        write(root / rel, rel)
    assert keys(root) == [".gitignore", ".skyignore", "sub/.gitignore", "sub/k", "sub/top.txt", "x.log"]


def test_upload_honours_ignore_files(tmp_path: Path) -> None:
    root = tmp_path / "w"
    write(root / ".gitignore", "*.log\n")
    write(root / "a.py", "a")
    write(root / "big.log", "b" * 5000)
    store = LocalStore(tmp_path / "b")
    store.create_bucket(BUCKET)
    upload_tree(store, root, BucketURL("local", BUCKET), max_bytes=100)
    assert sorted(store.list_objects(BUCKET)) == [".gitignore", "a.py"]


def test_scan_follows_symlinks_without_loops(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside" / "lib.py", "lib")
    root = tmp_path / "w"
    write(root / "a.py", "a")
    (root / "linked.py").symlink_to(outside)
    (root / "libdir").symlink_to(outside.parent, target_is_directory=True)
    (root / "sub").mkdir()
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "broken").symlink_to(tmp_path / "nowhere")
    assert [(k, s) for k, _p, s in scan_tree(root)] == [("a.py", 1), ("libdir/lib.py", 3), ("linked.py", 3)]
    assert keys(outside) == ["lib.py"]
    with pytest.raises(StorageError, match="nowhere"):
        scan_tree(tmp_path / "nowhere")


# ---------------------------------------------------------------- URLs, names, store kinds


def test_parse_bucket_url_good() -> None:
    assert parse_bucket_url("s3://bucket") == BucketURL("s3", "bucket", "")
    url = parse_bucket_url("s3://my.bucket-1/a//b/")
    assert url == BucketURL("s3", "my.bucket-1", "a/b")
    assert str(url) == "s3://my.bucket-1/a/b"
    assert str(parse_bucket_url("local://b12/")) == "local://b12"
    assert url.join("job-3", "x/y/") == BucketURL("s3", "my.bucket-1", "a/b/job-3/x/y")
    assert BucketURL("local", "bkt").join("w") == BucketURL("local", "bkt", "w")
    with pytest.raises(StorageError, match=r"'\.\.'"):
        url.join("..", "escape")


@pytest.mark.parametrize(("text", "name"), [
    ("az://container/x", "Azure Blob"),
    ("https://acct.blob.core.windows.net/container", "Azure Blob"),
    ("cos://bucket", "IBM COS"),
])
def test_parse_bucket_url_unsupported(text: str, name: str) -> None:
    with pytest.raises(StorageError) as info:
        parse_bucket_url(text)
    assert str(info.value) == f"{text}: {name} buckets are not supported yet (supported: {SUPPORTED})"


def test_parse_bucket_url_of_s3_compatible_stores() -> None:
    for kind in ("r2", "oci", "nebius"):
        assert parse_bucket_url(f"{kind}://my-bucket/a/b") == BucketURL(kind, "my-bucket", "a/b")
        assert store_kind(kind.upper()) == kind


def test_parse_bucket_url_bad() -> None:
    with pytest.raises(StorageError) as info:
        parse_bucket_url("gs://b")
    assert str(info.value) == f"gs://b: GCS buckets are not supported yet (supported: {SUPPORTED})"
    for text, fragment in [("ftp://bkt", "ftp://"), ("bucket", "not a bucket URL"), ("s3://", "names no bucket"),
                           ("s3://Bad_Name/x", "'Bad_Name'"), ("local://ab", "'ab'")]:
        with pytest.raises(StorageError) as info:
            parse_bucket_url(text)
        assert fragment in str(info.value) and str(info.value).startswith(text), text
    with pytest.raises(StorageError, match="3-63 characters"):
        parse_bucket_url("s3://UPPER")


def test_check_bucket_name() -> None:
    for good in ("abc", "a.b-c", "0-bucket-9", "a" * 63):
        assert check_bucket_name(good) == good
    for bad in ("ab", "a" * 64, "-abc", "abc-", ".abc", "ABC", "a_b", "", "a/b"):
        with pytest.raises(StorageError) as info:
            check_bucket_name(bad)
        assert repr(bad) in str(info.value) and "lowercase letters" in str(info.value)


def test_store_kind() -> None:
    assert store_kind("s3") == store_kind("S3") == "s3"
    assert store_kind(" local ") == "local"
    with pytest.raises(StorageError) as info:
        store_kind("gcs")
    assert str(info.value) == "store gcs is not supported yet (supported: local, s3, r2, oci, nebius)"
    for name in ("azure", "ibm"):
        with pytest.raises(StorageError, match=f"store {name} is not supported yet"):
            store_kind(name)
    with pytest.raises(StorageError, match="'dropbox' is unknown"):
        store_kind("dropbox")


def test_open_store(tmp_path: Path, s3_env: S3Config) -> None:
    local = open_store("local", StorageConfig(), tmp_path)
    assert isinstance(local, LocalStore) and local.root == tmp_path / "buckets"
    configured = open_store("local", StorageConfig(local_root=str(tmp_path / "elsewhere")), tmp_path)
    assert isinstance(configured, LocalStore) and configured.root == tmp_path / "elsewhere"
    s3 = open_store("S3", StorageConfig(s3=s3_env), tmp_path)
    assert isinstance(s3, S3Store) and s3.endpoint == s3_env.endpoint_url
    with pytest.raises(StorageError, match="store gcs"):
        open_store("gcs", StorageConfig(), tmp_path)


# ---------------------------------------------------------------- S3 errors


def test_s3_unreachable_endpoint_is_named_quickly(monkeypatch: pytest.MonkeyPatch, s3_env: S3Config) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store(S3Config(endpoint_url=endpoint), connect_timeout=1, max_attempts=1)
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.bucket_exists(BUCKET)
    assert time.monotonic() - started < 5
    assert str(info.value).startswith(f"S3 endpoint {endpoint} is unreachable")


def test_s3_without_credentials(monkeypatch: pytest.MonkeyPatch, s3_env: S3Config, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError) as info:
        S3Store(s3_env, max_attempts=1).create_bucket(BUCKET)
    assert str(info.value).startswith("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    assert "storage.s3.profile" in str(info.value)
    with pytest.raises(StorageError, match=r"storage\.s3\.profile 'nope'"):
        S3Store(S3Config(endpoint_url=s3_env.endpoint_url, profile="nope"))


def test_s3_error_messages_name_the_bucket() -> None:
    from botocore.exceptions import ClientError

    def client_error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "HeadBucket")

    denied = s3_error_message(client_error("403"), "theirs", "checking s3://theirs", "https://s3.example")
    assert "theirs" in denied and "denied" in denied
    taken = s3_error_message(client_error("BucketAlreadyExists"), "taken", "creating s3://taken", "e")
    assert taken == "S3 bucket taken belongs to another account; choose another bucket name"
    other = s3_error_message(client_error("SlowDown"), "b", "listing s3://b/p", "e")
    assert other.startswith("S3 error while listing s3://b/p:") and "\n" not in other


def test_boto3_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import sys, orchestrator.storage; assert 'boto3' not in sys.modules and 'botocore' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(StorageError) as info:
        S3Store(S3Config())
    assert str(info.value) == "the S3 store needs boto3: pip install 'sortie[s3]'"
