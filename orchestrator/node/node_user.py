"""Node side, a user of its own for each local-cloud node (issue 17): standard library only, Linux.

When the agent runs as root with `--confine` (the local cloud's nodes, on a machine where Sortie runs as root),
each node's runs run as a uid and gid of their own, so one job cannot read or signal another's processes or files:

- the uid is allocated deterministically from a reserved range, NODE_UID_BASE .. NODE_UID_BASE + NODE_UID_SLOTS - 1
  (1,900,000,000 ..): the first of sha256(node id, n) for n = 0, 1, ... that no other node's sandbox (nor pool
  job user) holds and no account of this machine has, chosen under an flock on the nodes' directory. The gid is the
  same number. It gets an /etc/passwd and /etc/group entry for its lifetime (`node_accounts.py`: `sortie-<uid>`,
  its home the sandbox's `home/`), removed when the node's agent stops; `sudo` is a shim first on its PATH that
  refuses in one line (root there would be root on the user's machine);
- a pool job (POST /runs with "user") runs as a user of its own on its worker, made at its run's start and removed
  with its files at its end (`remove_job`): a uid of the same range, the worker's gid (to pass through the
  sandbox), its own private `$HOME` and `$TMPDIR` (`users/<key>/`), umask 077, an account of its own; the worker's
  `workdir/`, `home/` and `mounts/` are readable (0750) but not writable to it, so what one job leaves is never
  another's to read;
- the sandbox is root's, mode 0710 with the node's group (it can only pass through), its run directories
  (`workdir/`, `home/`, `mounts/`, `tmp/`) are the node user's, 0700 (the first three 0750 once a pool job runs
  there); a root-owned `bin/` holds the `sudo` shim; the agent's records (`runs/`, journal,
  tokens) stay root's alone;
- setup and run go through the path view (`node_view.py enter --uid --gid`), which mounts a private /proc with
  `hidepid=invisible` in the run's mount namespace and drops to the user last: another job's processes are
  neither listed nor readable (`/proc/<pid>/environ`) nor signalable;
- what the agent places in the run directories (uploads, links) it writes with the thread's filesystem uid set
  to the node user (`setfsuid`), so a path the user controls can never lead a root write elsewhere, and what
  it places belongs to the user; what the node's own bucket steps (run as root, outside the view) leave there
  is given to the user afterwards (`give_tree`: no symlink followed, no mount crossed);
- a local-store bucket the node links to gets an ACL entry for the node user (`grant_tree`): the bucket stays the
  controller's, each node (and each pool job's user) that mounts it may read and write it.

In container mode (image_id: docker:...) the task's container runs as the node user (`--user uid:gid`, no
capabilities, no-new-privileges; `container.py`); a pool job's runs there are the node user's too.

Not used (runs keep the agent's own user) when the agent is not root, where mount namespaces fail (unless the runs
are in a container), or with SORTIE_NO_RUN_USERS=1.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import signal
import stat
import struct
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.node import node_accounts, nofollow

NODE_UID_BASE = 1_900_000_000
NODE_UID_SLOTS = 1 << 24  # the range ends at 1,916,777,215: above any distribution's and subuid's usual ranges
OPT_OUT_ENV = "SORTIE_NO_RUN_USERS"
RUN_DIRS = ("workdir", "home", "mounts", "tmp")
MAX_TRIES = 256
JOB_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
JOB_UMASK = 0o077  # a pool job's files are its own: another job on the worker shares its /tmp
NODE_UMASK = 0o027  # a node user's files: its group's (a pool worker's jobs read its setup's), nobody else's

_libc: Any = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class NodeUser:
    uid: int
    gid: int


def in_range(uid: int) -> bool:
    return NODE_UID_BASE <= uid < NODE_UID_BASE + NODE_UID_SLOTS


def candidate_uid(node_id: str, n: int = 0) -> int:
    """The n-th candidate uid of a node: the same on every machine and after every restart."""
    digest = hashlib.sha256(f"sortie-node-user\0{node_id}\0{n}".encode()).digest()
    return NODE_UID_BASE + int.from_bytes(digest[:8], "big") % NODE_UID_SLOTS


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def choose_uid(node_id: str, taken: Iterable[int], has_account: Any = _has_account) -> int:
    """The first candidate of `node_id` that is not `taken` (by another node) and is no account of this machine."""
    busy = set(taken)
    for n in range(MAX_TRIES):
        uid = candidate_uid(node_id, n)
        if uid not in busy and not has_account(uid):
            return uid
    raise RuntimeError(f"no free node uid for {node_id} after {MAX_TRIES} tries")


def taken_uids(nodes_dir: Path, own: Path) -> set[int]:
    """The node uids other sandboxes beside `own` hold (their group: the sandbox is root:<node gid>), and the pool
    job users of every sandbox (`users/<key>` is the job user's)."""
    taken: set[int] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(nodes_dir):
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if entry.name != own.name and stat.S_ISDIR(st.st_mode) and in_range(st.st_gid):
                    taken.add(st.st_gid)
                for job in os.scandir(os.path.join(entry.path, "users")):
                    with contextlib.suppress(OSError):
                        if in_range(uid := job.stat(follow_symlinks=False).st_uid):
                            taken.add(uid)
    return taken


def wanted(confine: bool, container: object, view_works: bool) -> bool:
    """A node user for runs: as root, confined, not opted out, where runs are kept in a mount namespace (the path
    view, or the task's container: its processes are the node user, issue 28)."""
    return (confine and (view_works or container is not None) and os.geteuid() == 0
            and os.environ.get(OPT_OUT_ENV) != "1")


def prepare_sandbox(sandbox: Path, node_id: str) -> NodeUser:
    """Allocate the node's user (or keep the one its sandbox has, after an agent restart) and set the sandbox's
    owners and modes. Under an flock on the nodes' directory, so two nodes starting at once never share a uid."""
    st = sandbox.stat()
    if in_range(st.st_gid):
        user = NodeUser(st.st_gid, st.st_gid)
    else:
        fd = os.open(sandbox.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            uid = choose_uid(node_id, taken_uids(sandbox.parent, sandbox))
            user = NodeUser(uid, uid)
            os.chown(sandbox, 0, user.gid)  # claims the uid for the siblings' next look (still under the lock)
        finally:
            os.close(fd)
    os.chmod(sandbox, 0o710)
    for name in RUN_DIRS:
        path = sandbox / name
        path.mkdir(exist_ok=True)
        if path.is_symlink() or not path.is_dir():
            raise RuntimeError(f"{path} is not a directory")
        os.chown(path, user.uid, user.gid, follow_symlinks=False)
        os.chmod(path, 0o700)
    for name in ("runs",):
        path = sandbox / name
        path.mkdir(exist_ok=True)
        os.chown(path, 0, 0)
        os.chmod(path, 0o700)
    node_accounts.install_sudo_shim(sandbox / "bin")
    add_account(user, sandbox / "home")
    return user


def add_account(user: NodeUser, home: Path) -> None:
    """The user's account (`node_accounts`); where /etc cannot be written, the runs go on without one (said in the
    agent's log: `whoami` then finds no name)."""
    try:
        node_accounts.add_account(user.uid, user.gid, home, in_range)
    except OSError as exc:
        print(f"sortie: no /etc/passwd entry for uid {user.uid}: {exc.strerror or exc}", file=sys.stderr, flush=True)


def allocate_uid(sandbox: Path, key: str) -> int:
    """A uid for the pool job `key` on this node (not its own, no other node's or job's, no account), under the
    nodes' directory's flock; `users/<key>` is made, the new uid's, while the lock is held."""
    fd = os.open(sandbox.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        taken = taken_uids(sandbox.parent, sandbox) | {sandbox.stat().st_gid}
        uid = choose_uid(f"{sandbox.name}/{key}", taken)
        (sandbox / "users").mkdir(exist_ok=True)
        os.chmod(sandbox / "users", 0o711)
        path = sandbox / "users" / key
        path.mkdir(mode=0o700)
        os.chown(path, uid, sandbox.stat().st_gid)
    finally:
        os.close(fd)
    return uid


def remove_leftovers(uid: int, places: Iterable[str] = ("/tmp", "/var/tmp", "/dev/shm")) -> int:
    """Remove what `uid` left at the top of the machine's shared temporary directories (no link followed:
    rmtree works on descriptors); how many entries."""
    removed = 0
    for place in places:
        with contextlib.suppress(OSError):
            for entry in os.scandir(place):
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if st.st_uid != uid:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    removed += 1
    return removed


# --- acting as the node user, in one thread ------------------------------------------------------------------


@contextlib.contextmanager
def as_user(user: NodeUser | None) -> Iterator[None]:
    """File operations of this thread (only) are checked as `user`'s and create files it owns: setfsgid and
    setfsuid are per thread on Linux; root's are restored after. None: as is."""
    if user is None:
        yield
        return
    _libc.setfsgid(user.gid)
    _libc.setfsuid(user.uid)
    try:
        if _libc.setfsuid(user.uid) != user.uid:  # the call returns the previous fsuid: check that it took
            raise PermissionError("setfsuid did not take")
        yield
    finally:
        _libc.setfsuid(0)
        _libc.setfsgid(0)


def give_tree(root: Path, user: NodeUser) -> None:
    """Make everything under `root` (root included) the user's, without following a symlink (os.fwalk works on
    directory descriptors, so a directory swapped for a link midway is not followed) nor crossing into another
    filesystem (a bucket's FUSE mount)."""
    if not root.exists() or root.is_symlink():
        return
    device = root.stat().st_dev
    os.chown(root, user.uid, user.gid, follow_symlinks=False)
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        keep: list[str] = []
        for name in dirnames:
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if st.st_dev == device:
                    os.chown(name, user.uid, user.gid, dir_fd=dirfd, follow_symlinks=False)
                    keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            with contextlib.suppress(OSError):
                os.chown(name, user.uid, user.gid, dir_fd=dirfd, follow_symlinks=False)


# --- ACLs: a local-store bucket shared with the node users that mount it ----------------------------------------

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def _parse_acl(data: bytes) -> list[tuple[int, int, int]]:
    if len(data) < 4 or struct.unpack_from("<I", data)[0] != 2:
        return []
    return [struct.unpack_from("<HHI", data, off) for off in range(4, len(data) - 7, 8)]


def acl_with(existing: bytes | None, mode: int, uid: int, perm: int) -> bytes:
    """An ACL (the kernel's xattr form) that adds or replaces a named-user entry `uid: perm`, keeping the other
    entries (or, without an ACL yet, the mode's owner, group and other), with a mask that admits them all."""
    entries = {(tag, ident): p for tag, p, ident in _parse_acl(existing or b"")}
    if not entries:
        entries = {(_USER_OBJ, _NO_ID): (mode >> 6) & 7, (_GROUP_OBJ, _NO_ID): (mode >> 3) & 7,
                   (_OTHER, _NO_ID): mode & 7}
    entries[(_USER, uid)] = perm
    entries.pop((_MASK, _NO_ID), None)
    entries[(_MASK, _NO_ID)] = 0
    for (tag, _ident), p in entries.items():
        if tag in (_USER, _GROUP, _GROUP_OBJ):
            entries[(_MASK, _NO_ID)] |= p
    body = b"".join(struct.pack("<HHI", tag, p, ident) for (tag, ident), p in sorted(entries.items()))
    return struct.pack("<I", 2) + body


def _grant_one(name: str, dirfd: int, uid: int, is_dir: bool) -> None:
    # os.*xattr take no dir_fd: go through the descriptor's /proc path, the entry itself not followed ("" is the
    # directory of the descriptor itself, reached through its magic link)
    path = f"/proc/self/fd/{dirfd}/{name}" if name else f"/proc/self/fd/{dirfd}"
    kwargs: dict[str, Any] = {"follow_symlinks": not name}
    st = os.stat(path, **kwargs)
    if stat.S_ISLNK(st.st_mode):
        return
    if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and st.st_uid != uid:
        return  # issue 28: a hard link is the file it links to (perhaps one only root may touch): no ACL on it
    perm = 7 if is_dir or st.st_mode & 0o100 else 6
    current = None
    with contextlib.suppress(OSError):
        current = os.getxattr(path, ACL_ACCESS, **kwargs)
    os.setxattr(path, ACL_ACCESS, acl_with(current, st.st_mode, uid, perm), **kwargs)
    if is_dir:
        default = None
        with contextlib.suppress(OSError):
            default = os.getxattr(path, ACL_DEFAULT, **kwargs)
        os.setxattr(path, ACL_DEFAULT, acl_with(default, st.st_mode | 0o700, uid, 7), **kwargs)


def grant_tree(top: int, user: NodeUser) -> str | None:
    """Give the node user read and write on the directory tree open at `top` (a local-store bucket, opened by
    `nofollow.open_under`: no symlink on the way) through ACLs, new files included (a default ACL on each
    directory). No link below it is followed, no file with other hard links (not the user's own) is touched.
    None, or why it could not (no ACLs on that filesystem, say)."""
    try:
        _grant_one("", top, user.uid, True)
        for _dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            for name in dirnames:
                _grant_one(name, dirfd, user.uid, True)
            for name in filenames:
                _grant_one(name, dirfd, user.uid, False)
    except OSError as exc:
        return f"{exc.strerror or exc}"
    return None


def kill_user(uid: int) -> int:
    """SIGKILL every process of `uid` (what a node's runs left, a daemon that left its process group included);
    how many were signalled."""
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            if os.stat(f"/proc/{entry}").st_uid == uid:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
    return killed


class RunUser:
    """What the agent (runs.py) asks of the node's user; made by `for_agent`."""

    ENV = "SORTIE_RUN_UID"  # "uid:gid" to the node's own (root) bucket steps: their FUSE mounts are for this user

    def __init__(self, sandbox: Path, user: NodeUser) -> None:
        self.sandbox, self.user = sandbox, user
        self.root_runs: set[str] = set()  # the node's own steps (view=False), run as root
        self.targets: set[str] = set()  # link targets granted to the node user (pool jobs get them too)
        self.link_roots: list[Path] = []  # where link targets may be (the agent's `link_roots`)
        self._jobs_lock = threading.Lock()

    def job_user(self, key: str) -> NodeUser:
        """The pool job `key`'s user (made at its first run: a uid, its `users/<key>/` with a private home and tmp,
        its account; the worker's run directories opened to its group, read only)."""
        if not JOB_KEY.match(key):
            raise ValueError(f"user: {key!r} must match {JOB_KEY.pattern}")
        base = self.sandbox / "users" / key
        with self._jobs_lock:
            made = base.is_dir() and not base.is_symlink()
            uid = base.stat().st_uid if made else allocate_uid(self.sandbox, key)
            job = NodeUser(uid, self.user.gid)
            for name in ("home", "tmp"):
                (base / name).mkdir(mode=0o700, exist_ok=True)
                os.chown(base / name, uid, job.gid, follow_symlinks=False)
            for name in ("workdir", "home", "mounts"):  # the pool's setup and files: readable by its jobs
                os.chmod(self.sandbox / name, 0o750)
            for target in sorted(self.targets):
                self.grant(target, job)
            add_account(job, base / "home")
        return job

    def run_env(self, child_env: dict[str, str], env: dict[str, str], view: bool, job: str | None = None) -> list[str]:
        """Set a run's environment; the path view's arguments (a run as the user) or [] (a root step). With
        `job` (a pool job's key), the run is that job's user's, with its own $HOME and $TMPDIR."""
        user = self.job_user(job) if job and view else self.user
        if "TMPDIR" not in env:  # the user's own, not the machine's shared /tmp
            child_env["TMPDIR"] = str(self.sandbox / "users" / job / "tmp" if job else self.sandbox / "tmp")
        if not view:
            child_env[self.ENV] = f"{self.user.uid}:{self.user.gid}"
            return []
        if job and "HOME" not in env:
            child_env["SORTIE_WORKER_HOME"] = child_env.get("HOME", str(self.sandbox / "home"))
            child_env["HOME"] = str(self.sandbox / "users" / job / "home")
        child_env["USER"] = child_env["LOGNAME"] = env.get("USER") or node_accounts.account_name(user.uid)
        child_env["PATH"] = f"{self.sandbox / 'bin'}:{child_env.get('PATH') or os.defpath}"  # sudo: the shim
        return [f"--uid={user.uid}", f"--gid={user.gid}", f"--umask={(JOB_UMASK if job else NODE_UMASK):03o}"]

    def remove_job(self, key: str) -> dict[str, int]:
        """The pool job `key`'s end: its processes killed, its directory and what it left in the machine's
        temporary directories removed, its account removed."""
        if not JOB_KEY.match(key):
            raise ValueError(f"user: {key!r} must match {JOB_KEY.pattern}")
        base = self.sandbox / "users" / key
        with self._jobs_lock:
            if not base.is_dir() or base.is_symlink():
                return {"killed": 0, "removed": 0}
            uid = base.stat().st_uid
            if not in_range(uid) or uid == self.user.uid:
                raise ValueError(f"user: {key!r} is not a job user of this node")
            killed = kill_user(uid)
            shutil.rmtree(base)
            removed = remove_leftovers(uid)
            with contextlib.suppress(OSError):  # an /etc that cannot be written had no account added either
                node_accounts.remove_account(uid, in_range)
        return {"uid": uid, "killed": killed, "removed": removed}

    def ended(self, run_id: str) -> None:
        """A root step ended: what it left in the run directories becomes the user's."""
        if run_id in self.root_runs:
            self.root_runs.discard(run_id)
            for name in RUN_DIRS:
                with contextlib.suppress(OSError):
                    give_tree(self.sandbox / name, self.user)

    @contextlib.contextmanager
    def reach(self, path: Path) -> Iterator[Path]:
        """`path` (in the sandbox) as this thread reaches it acting as the user (`as_user`): through
        /proc/self/fd/N of the sandbox, opened as root, since the user may not pass through the directories above
        it (the Sortie home, a 0700 /root)."""
        fd = os.open(self.sandbox, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with as_user(self.user):
                yield Path(f"/proc/self/fd/{fd}") / path.relative_to(self.sandbox)
        finally:
            os.close(fd)

    def grant(self, target: str, user: NodeUser | None = None) -> None:
        """ACLs for the node's user (or a pool job's) on the link target `target`, resolved again inside the
        agent's link roots with no symlink followed (issue 28)."""
        try:
            top = nofollow.open_under(target, self.link_roots)
        except OSError as exc:
            raise ValueError(f"links: target {target!r} is not a directory inside the node's roots reached "
                             f"through no symlink ({exc.strerror})") from None
        try:
            trouble = grant_tree(top, user or self.user)
        finally:
            os.close(top)
        if trouble:
            raise ValueError(f"links: the node's user cannot be given {target}: {trouble}")
        self.targets.add(target)

    def give(self, path: Path) -> None:
        give_tree(path, self.user)
        os.chmod(path, 0o700)

    def kill(self) -> None:
        """The node goes: its pool jobs' users and its own killed and their accounts removed."""
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.sandbox / "users"):
                with contextlib.suppress(OSError, ValueError):
                    self.remove_job(entry.name)
        kill_user(self.user.uid)
        with contextlib.suppress(OSError):
            node_accounts.remove_account(self.user.uid, in_range)


def for_agent(sandbox: Path, node_id: str, confine: bool, container: object, view_works: bool) -> RunUser | None:
    """The node's user, for an agent that should have one (`wanted`), its sandbox prepared; else None."""
    if not wanted(confine, container, view_works):
        return None
    return RunUser(sandbox, prepare_sandbox(sandbox, node_id))
