"""Node side, bucket work on a node, run by the node agent (outside a local-cloud node's path view, so that an S3 MOUNT
made under $SORTIE_MOUNTS_ROOT is seen by the runs after it at its path):

    python -m orchestrator.node.node_storage fetch PLAN   COPY steps download; MOUNT_CACHED steps pull; S3 MOUNTs mount
    python -m orchestrator.node.node_storage cache PLAN   MOUNT_CACHED: upload changes every few seconds until SIGTERM,
                                                     then a last upload (so a clean preemption loses nothing)
    python -m orchestrator.node.node_storage flush PLAN   MOUNT_CACHED: upload changes once (before the task ends)

PLAN is base64 JSON: {"storage": <StorageConfig as JSON>, "home": <controller's Sortie home>, "steps": [NodeStep
JSON...], "interval": seconds}. Credentials come from the environment (AWS_* for S3). Destinations are the
node's paths: relative ones under the run's working directory (the workdir), `~/...` under $HOME, absolute
ones under $SORTIE_MOUNTS_ROOT where the agent sets it (local-cloud nodes; see `node_path`).
Exit 0 on success; otherwise one line `sortie-storage: <what>: <why>` on stderr and exit 3.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from orchestrator.config import StorageConfig
from orchestrator.errors import SortieError
from orchestrator.node.agent import place_destination
from orchestrator.storage.stores import Store, open_store, parse_bucket_url
from orchestrator.storage.trees import CachedSync, download_tree

EXIT_STORAGE_ERROR = 3
FUSE_TOOLS = ("rclone", "s3fs")


def encode_plan(plan: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(plan).encode()).decode()


def _decode_plan(text: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(text.encode()))


def node_path(dest: str) -> Path:
    """Where `dest` is on this node, by the agent's rules (`place_destination`): relative under the run's working
    directory, `~/...` under $HOME, absolute under $SORTIE_MOUNTS_ROOT on a local-cloud node (which the node's
    later runs see at the path itself). A destination that would leave its root is a SortieError."""
    root = os.environ.get("SORTIE_MOUNTS_ROOT")
    try:
        return place_destination(dest, Path.cwd(), Path(os.path.expanduser("~")), Path(root) if root else None)
    except ValueError as exc:
        raise SortieError(str(exc)) from None


def _state_dir() -> Path:
    base = os.environ.get("SORTIE_NODE_SANDBOX") or os.path.expanduser("~")
    return Path(base) / ".sortie-storage"


class _Stores:
    def __init__(self, plan: dict[str, Any]) -> None:
        self.config = StorageConfig.model_validate(plan.get("storage") or {})
        self.home = Path(plan.get("home") or _state_dir())
        self._open: dict[str, Store] = {}

    def get(self, kind: str) -> Store:
        """The store of `kind`; a local store reads a hard-linked file only where the run's user may (issue 28)."""
        if kind not in self._open:
            self._open[kind] = open_store(kind, self.config, self.home, reader=_run_user_reader()[1])
        return self._open[kind]


def _cached(plan: dict[str, Any], stores: _Stores) -> list[CachedSync]:
    syncs = []
    anchor, reader = _run_user_reader()
    for step in plan["steps"]:
        if step["kind"] != "cached":
            continue
        url = parse_bucket_url(step["url"])
        digest = hashlib.sha256(f"{step['dest']}|{step['url']}".encode()).hexdigest()[:16]
        syncs.append(CachedSync(stores.get(url.store), url, node_path(step["dest"]),
                                state_file=_state_dir() / f"cached-{digest}.json", anchor=anchor, reader=reader))
    return syncs


def _run_user_reader() -> tuple[Path | None, Any]:
    """Issue 17: the MOUNT_CACHED uploader runs as root beside the run. Its reads are anchored at the node's
    sandbox (no symlink followed from there down) and, on a node with a user of its own (SORTIE_RUN_UID), made
    with that user's filesystem identity: it uploads nothing the run could not read itself."""
    sandbox = os.environ.get("SORTIE_NODE_SANDBOX")
    anchor = Path(os.path.realpath(sandbox)) if sandbox else None
    owner = os.environ.get("SORTIE_RUN_UID", "")
    if not owner or os.geteuid() != 0:
        return anchor, None
    from orchestrator.node.node_user import NodeUser, as_user

    uid, _, gid = owner.partition(":")
    user = NodeUser(int(uid), int(gid or uid))
    return anchor, lambda: as_user(user)


def fuse_mount_command(tool: str, remote: str, target: Path, s3: dict[str, Any], log: Path,
                       env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command line (and its environment) that FUSE-mounts the S3 `remote` (`bucket[/prefix]`) at `target`,
    with the settings of `storage.s3` (endpoint_url, region, profile).

    rclone streams: `--vfs-cache-mode off`, so a write reaches the bucket when its file is closed and nothing
    waits in a local cache when the node goes (random writes fail: MOUNT_CACHED is for those, as in SkyPilot);
    directory listings are re-read after 5 s, so files written by other nodes show. rclone's S3 client refuses
    AWS_CA_BUNDLE (`LoadCustomCABundleError`): that bundle is given to it as `--ca-cert` instead. s3fs uploads a
    file when it is closed too."""
    env = dict(env)
    endpoint, region, profile = s3.get("endpoint_url"), s3.get("region"), s3.get("profile")
    # A local-cloud node's runs have a user of their own when its agent is root (node_user.py): SORTIE_RUN_UID
    # "uid:gid". Only the processes that can reach the mount point (the node's mounts/, that user's) see the mount.
    owner = tuple(env.get("SORTIE_RUN_UID", "").split(":", 1)) if env.get("SORTIE_RUN_UID") else ()
    if tool == "rclone":
        command = ["rclone", "mount", f":s3:{remote}", str(target), "--daemon", "--s3-provider",
                   "Other" if endpoint else "AWS", "--s3-env-auth", "--vfs-cache-mode", "off",
                   "--dir-cache-time", "5s", "--log-file", str(log)]
        for flag, value in (("--s3-endpoint", endpoint), ("--s3-region", region), ("--s3-profile", profile)):
            if value:
                command += [flag, value]
        bundle = env.pop("AWS_CA_BUNDLE", None)
        if bundle:
            command += ["--ca-cert", bundle]
        if owner:  # mounted by root for the node's own user (issue 17): its files are that user's alone
            command += ["--allow-other", "--uid", owner[0], "--gid", owner[1], "--umask", "077"]
        return command, env
    command = ["s3fs", remote.replace("/", ":/", 1) if "/" in remote else remote, str(target),
               "-o", f"logfile={log}"]
    if endpoint:
        command += ["-o", f"url={endpoint}", "-o", "use_path_request_style"]
    if region:
        command += ["-o", f"endpoint={region}"]
    if profile:
        command += ["-o", f"profile={profile}"]
    if owner:
        command += ["-o", f"allow_other,uid={owner[0]},gid={owner[1]},umask=077"]
    return command, env


def _fuse_tool(s3: dict[str, Any], where: str, url: str) -> str:
    """The FUSE tool for an S3 MOUNT on this node (`storage.s3.mount_tool`), or a one-line reason."""
    chosen = s3.get("mount_tool") or "auto"
    tools = FUSE_TOOLS if chosen == "auto" else (chosen,)
    tool = next((t for t in tools if shutil.which(t)), None)
    has_fuse = Path("/dev/fuse").exists()
    if tool is not None and has_fuse:
        return tool
    if tool is None and chosen != "auto":
        missing = f"storage.s3.mount_tool is {chosen}, which is not installed"
    elif tool is None:
        missing = "neither rclone nor s3fs found here" + ("" if has_fuse else ", no /dev/fuse")
    else:
        missing = "no /dev/fuse found here"
    raise SortieError(f"{where}: MOUNT of {url} needs a FUSE mount tool on the node ({missing}); use mode: COPY "
                      "or MOUNT_CACHED, or install rclone")


def _fuse_mount(step: dict[str, Any], plan: dict[str, Any]) -> None:
    """MOUNT of an S3 bucket: a FUSE mount with rclone or s3fs where the node has one."""
    s3 = (plan.get("storage") or {}).get("s3") or {}
    tool = _fuse_tool(s3, step.get("where") or step["dest"], step["url"])
    url = parse_bucket_url(step["url"])
    target = node_path(step["dest"])
    target.mkdir(parents=True, exist_ok=True)
    log = _state_dir() / f"{tool}-{hashlib.sha256(step['dest'].encode()).hexdigest()[:16]}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command, env = fuse_mount_command(tool, f"{url.bucket}/{url.prefix}".rstrip("/"), target, s3, log,
                                      dict(os.environ))
    said = log.with_suffix(".out")
    try:
        # Output to a file, not a pipe: the daemon it leaves running would hold a pipe open to the end.
        with said.open("ab") as out:
            code = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=90,
                                  env=env).returncode
    except subprocess.TimeoutExpired:
        raise SortieError(f"{step['dest']}: {tool} did not mount {step['url']} within 90 s (log: {log})") from None
    if code != 0:
        lines = [line.strip() for path in (log, said) if path.exists()
                 for line in path.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if any(w in line for w in ("ERROR", "CRITICAL", "Failed", "failed"))]
        why = (errors or lines or [f"exit code {code}"])[-1]
        raise SortieError(f"{step['dest']}: {tool} could not mount {step['url']}: {why}")


def fetch(plan: dict[str, Any]) -> None:
    stores = _Stores(plan)
    for step in plan["steps"]:
        if step["kind"] == "copy":
            url = parse_bucket_url(step["url"])
            stats = download_tree(stores.get(url.store), url, node_path(step["dest"]))
            print(f"sortie-storage: copied {stats.files} file(s) from {step['url']} to {step['dest']}", flush=True)
        elif step["kind"] == "mount" and parse_bucket_url(step["url"]).store != "local":
            _fuse_mount(step, plan)
            print(f"sortie-storage: mounted {step['url']} at {step['dest']}", flush=True)
    for sync in _cached(plan, stores):
        sync.local_dir.mkdir(parents=True, exist_ok=True)
        stats = sync.pull()
        print(f"sortie-storage: {sync.local_dir} holds {stats.files} file(s) of {sync.url} (MOUNT_CACHED)", flush=True)


def flush(plan: dict[str, Any]) -> int:
    uploaded = 0
    for sync in _cached(plan, _Stores(plan)):
        uploaded += sync.push().files
    return uploaded


def cache(plan: dict[str, Any]) -> None:
    """Upload MOUNT_CACHED changes every `interval` seconds; on SIGTERM or SIGINT upload once more and exit."""
    stores = _Stores(plan)
    syncs = _cached(plan, stores)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    interval = float(plan.get("interval") or 5.0)
    print(f"sortie-storage: uploading changes of {len(syncs)} cached mount(s) every {interval:g}s", flush=True)
    while True:
        stopping = stop.wait(interval)
        for sync in syncs:
            try:
                stats = sync.push()
                if stats.files:
                    print(f"sortie-storage: uploaded {stats.files} file(s) to {sync.url}", flush=True)
            except SortieError as exc:  # keep trying; the flush before the task ends reports for good
                print(f"sortie-storage: upload to {sync.url} failed, will retry: {exc}", flush=True)
        if stopping:
            return


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("fetch", "cache", "flush"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        plan = _decode_plan(args[1])
        if args[0] == "fetch":
            fetch(plan)
        elif args[0] == "flush":
            print(f"sortie-storage: flushed {flush(plan)} file(s)", flush=True)
        else:
            cache(plan)
    except SortieError as exc:
        print(f"sortie-storage: {exc}", file=sys.stderr, flush=True)
        return EXIT_STORAGE_ERROR
    except OSError as exc:
        print(f"sortie-storage: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_STORAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
