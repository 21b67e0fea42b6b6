"""Node side, path views for the runs of a confined node agent (standard library only, Linux).

A confined agent (`agent.py --confine`, the local cloud's nodes) stores uploads to absolute
destinations under `<sandbox>/mounts/`. A run should still see them at the absolute paths its task
names (`cat /data/x`, `echo ok > /checkpoint/step`), as on a cloud VM. This script runs a command in
a private mount namespace where every view path P shows `<sandbox>/mounts/P` and the rest of the
machine's filesystem looks unchanged; nothing is created on the machine outside the sandbox:

    python3 node_view.py enter --sandbox S [--cwd C] [--view P]... -- COMMAND [ARG]...
    python3 node_view.py probe --sandbox S      exit 0 if mount namespaces work here

`mounts_under` and `detach` serve the node's teardown: what a run mounted under the sandbox outside the view
(a bucket's FUSE mount) is detached before the sandbox is removed, so removing it never reaches into a bucket.

How `enter` builds the view, in a new mount namespace whose mounts are all private (as root; other
users get a user namespace that maps only their own uid and gid):
  1. a tmpfs on `<sandbox>/.root`, the new root; each entry of `/` is recreated in it (a directory
     or a file: bind-mounted recursively; a symlink: the same symlink);
  2. per view P, its anchor A: the first of P's ancestors (or P) missing on the machine, or P itself
     when P exists. `<sandbox>/mounts/A` is bind-mounted at A (symlinks followed, so a linked
     directory is written through). When A is missing, its parent directory is shadowed first in
     the new root: a tmpfs over it, each of the machine's entries in it bound back;
  3. the copy of the new root that the recursive binds carry into the sandbox is detached, then
     chroot to the new root, chdir to C, and exec the command: the same pid as the agent started,
     so its process group, signals and exit code are the command's own.
  4. with `--uid U --gid G` (a root agent's node user, `node_user.py`): a new proc instance is mounted on the new
     root's /proc with `hidepid=invisible` (processes of other users are not listed, and their /proc/<pid> is not
     there), and after the chroot the process drops to U and G with no supplementary groups, before chdir and exec.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
SETUP_FAILED = 125

_libc: Any = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                       flags, data.encode() if data else None), f"mount {source or fstype} on {target}")


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def private_namespace() -> None:
    """Move this (single-threaded) process into a new mount namespace whose mounts are all private."""
    uid, gid = os.geteuid(), os.getegid()
    if _libc.unshare(CLONE_NEWNS) != 0:
        # Not privileged here (not root, or root without CAP_SYS_ADMIN): try a user namespace too.
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUSER), "unshare")
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)


def _mirror(host: str, inside: str) -> None:
    """Recreate the machine's entry `host` at `inside` (in the new root)."""
    if os.path.islink(host):
        os.symlink(os.readlink(host), inside)
        return
    if os.path.isdir(host):
        os.mkdir(inside)
    else:
        Path(inside).touch()
    _mount(host, inside, None, MS_BIND | MS_REC)


def _shadow(root: str, directory: str, passable: bool = False) -> None:
    """Make the machine's `directory` writable in the new root without touching the machine."""
    inside = root + directory
    st = os.stat(directory)
    # passable (a node user's run): others may pass through, to reach the view in it
    _mount("tmpfs", inside, "tmpfs", 0, f"mode={st.st_mode & 0o7777 | (0o011 if passable else 0):o}")
    with contextlib.suppress(OSError):
        os.chown(inside, st.st_uid, st.st_gid)
    for name in sorted(os.listdir(directory)):
        _mirror(os.path.join(directory, name), os.path.join(inside, name))


def anchor(view: str) -> tuple[str, str]:
    """(A, where A lies on the machine, symlinks resolved) for a view P; see the module docstring."""
    parts = PurePosixPath(view).parts[1:]
    for i in range(1, len(parts) + 1):
        path = "/" + "/".join(parts[:i])
        if not os.path.exists(path):
            return path, os.path.join(os.path.realpath("/" + "/".join(parts[:i - 1])), parts[i - 1])
    return view, os.path.realpath(view)


def hide_paths(root: str, hide: list[str], show: list[str], warn: Callable[[str], object] = print) -> None:
    """Issue 17: each `hide` path (the Sortie home: its state, keys, other nodes' sandboxes) is an empty tmpfs in
    the new root; each `show` path under one (a local-store bucket the node links to) is bound back at its path.
    The node's own sandbox is shown again by `build_root` afterwards."""
    for path in sorted({os.path.realpath(h) for h in hide if h.startswith("/") and h.strip("/")}):
        if not os.path.isdir(path) or not os.path.isdir(root + path):
            continue
        try:
            # 0711: a run of a node user passes through to its own sandbox and shown buckets, lists nothing
            _mount("tmpfs", root + path, "tmpfs", 0, "mode=711,size=64k")
        except OSError as exc:
            warn(f"sortie: isolation: {path} could not be hidden: {exc}")
            continue
        for shown in sorted({os.path.realpath(s) for s in show}):
            if _under(shown, path) and os.path.isdir(shown):
                try:
                    os.makedirs(root + shown, exist_ok=True)
                    _mount(shown, root + shown, None, MS_BIND | MS_REC)
                except OSError as exc:
                    warn(f"sortie: isolation: {shown} is not shown: {exc}")


def open_way(root: str, path: str, warn: Callable[[str], object] = print) -> None:
    """For a node user: each ancestor of `path` that others may not pass through (a 0700 /root above the Sortie
    home, say) becomes, in the new root, a tmpfs of mode 0711 holding only the next step of the way (bound from
    the machine), so the run reaches its sandbox and sees nothing else of that directory."""
    steps = PurePosixPath(path).parts[1:]
    for i in range(1, len(steps)):
        ancestor, step = "/" + "/".join(steps[:i]), steps[i]
        inside = root + ancestor
        if not os.path.isdir(inside):
            return  # not on the way in the new root (a hidden directory's shown path comes later, by hide_paths)
        try:
            if os.stat(inside).st_mode & 0o001:
                continue
            _mount("tmpfs", inside, "tmpfs", 0, "mode=711,size=64k")
            host = os.path.join(ancestor, step)
            os.mkdir(os.path.join(inside, step)) if os.path.isdir(host) else Path(inside, step).touch()
            _mount(host, os.path.join(inside, step), None, MS_BIND | MS_REC)
        except OSError as exc:
            warn(f"sortie: isolation: no way through {ancestor} for the node's user: {exc}")
            return


def build_root(sandbox: str, views: list[str], warn: Callable[[str], object] = print, hide: list[str] | None = None,
               show: list[str] | None = None, user: bool = False) -> str:
    """Make the new root in `<sandbox>/.root` (in this process's private namespace) and return it."""
    mounts = os.path.join(sandbox, "mounts")
    anchors = sorted({anchor(os.path.normpath(v)) for v in views if v.startswith("/") and v.strip("/")},
                     key=lambda a: (len(PurePosixPath(a[1]).parts), a[1]))
    root = os.path.join(sandbox, ".root")
    os.makedirs(root, exist_ok=True)
    _mount("tmpfs", root, "tmpfs", 0, "mode=755")
    for name in sorted(os.listdir("/")):
        try:
            _mirror("/" + name, os.path.join(root, name))
        except OSError as exc:
            warn(f"sortie: path view: /{name} is not shown: {exc}")
    if user:  # first: the views and the hidden home are then mounted on the way's binds of the machine's directories
        for way in [sandbox, *sorted({os.path.realpath(s) for s in show or []})]:
            open_way(root, way, warn)
    owned: set[str] = {"/"}
    shown: list[str] = []
    places: list[str] = []
    for original, place in anchors:
        source = os.path.realpath(os.path.join(mounts, original.lstrip("/")))
        if any(_under(original, s) for s in shown) or not os.path.exists(source):
            continue  # already visible through an enclosing view, or nothing to show
        point, parent = root + place, os.path.dirname(place)
        try:
            if not os.path.exists(point):
                if parent not in owned and not any(_under(parent, p) for p in places):
                    _shadow(root, parent, user)
                    owned.add(parent)
                if os.path.islink(point):  # a dangling symlink of the machine, in a directory we own
                    os.unlink(point)
                os.mkdir(point) if os.path.isdir(source) else Path(point).touch()
            _mount(source, point, None, MS_BIND | MS_REC)
        except OSError as exc:
            warn(f"sortie: path view: {original} is not shown: {exc}")
            continue
        shown.append(original)
        places.append(place)
    hide_paths(root, hide or [], show or [], warn)
    # A view over an ancestor of the sandbox (an upload to /tmp, say) hid it: show it again at its path
    # (the mount point is made through the view, so inside the sandbox's mounts/).
    inside = root + sandbox
    if not (os.path.isdir(inside) and os.path.samefile(inside, sandbox)):
        try:
            os.makedirs(inside, exist_ok=True)
            _mount(sandbox, inside, None, MS_BIND | MS_REC)
        except OSError as exc:
            warn(f"sortie: path view: the sandbox {sandbox} is not shown: {exc}")
    # The recursive binds carried a copy of the new root into the sandbox as seen from inside; drop it.
    copy = root + os.path.join(sandbox, ".root")
    for _ in range(8):
        if not os.path.ismount(copy) or _libc.umount2(copy.encode(), MNT_DETACH) != 0:
            break
    return root


def private_proc(root: str) -> None:
    """A proc instance of its own on the new root's /proc that shows a process only to its own user
    (`hidepid=invisible`, Linux 5.8; `hidepid=2` before). Raises OSError with the kernel's reason."""
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        _mount("proc", root + "/proc", "proc", flags, "hidepid=invisible")
    except OSError:
        _mount("proc", root + "/proc", "proc", flags, "hidepid=2")


def drop_to(uid: int, gid: int) -> None:
    """Become the node user for good: no supplementary groups, then gid, then uid (real, effective, saved)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getegid() != gid:
        raise OSError(1, f"could not become uid {uid} gid {gid}")


def enter(sandbox: str, cwd: str | None, views: list[str], command: list[str], hide: list[str] | None = None,
          show: list[str] | None = None, uid: int | None = None, gid: int | None = None,
          umask: int | None = None) -> None:
    """Run `command` (exec: this process becomes it) in the path view, as `uid`/`gid` when given, with `umask`
    when given (set last: the view's own directories are made with the agent's); exit 125 if the view fails or
    the user cannot be taken (a /proc that cannot be made private is said in the log)."""
    sandbox = os.path.realpath(sandbox)
    try:
        private_namespace()
        root = build_root(sandbox, views, lambda line: print(line, file=sys.stderr, flush=True), hide, show,
                          user=uid is not None)
        if uid is not None:
            try:
                private_proc(root)
            except OSError as exc:  # the user still cannot read or signal other users' processes; it can list them
                print(f"sortie: isolation: /proc is not private to the node's user: {exc}", file=sys.stderr,
                      flush=True)
        os.chroot(root)
        if uid is not None:
            drop_to(uid, uid if gid is None else gid)
        os.chdir(cwd or "/")
        if umask is not None:
            os.umask(umask)
    except OSError as exc:
        print(f"sortie: path view could not be set up: {exc}", file=sys.stderr, flush=True)
        sys.exit(SETUP_FAILED)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"sortie: {command[0]}: {exc.strerror}", file=sys.stderr, flush=True)
        sys.exit(127)


def _unescape(field: str) -> str:
    """A path as /proc/self/mountinfo writes it (space, tab, newline and backslash as octal escapes)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path: str) -> list[str]:
    """Mount points at or below `path` in this process's mount namespace, deepest first."""
    base = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = {_unescape(fields[4]) for fields in map(str.split, lines) if len(fields) > 4}
    return sorted((p for p in points if _under(p, base)), key=lambda p: (-p.count("/"), p))


def detach(point: str) -> bool:
    """Unmount `point` lazily (it leaves the tree at once; a dead FUSE mount included): umount2(MNT_DETACH) as
    root, else fusermount's `-uz` for a user's own FUSE mount. Whether it is gone."""
    if _libc.umount2(point.encode(), MNT_DETACH) != 0:
        for tool in ("fusermount3", "fusermount"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                if subprocess.run([tool, "-uz", point], capture_output=True, timeout=30).returncode == 0:
                    break
    return point not in mounts_under(os.path.dirname(point) or "/")


def probe(sandbox: str) -> bool:
    """Whether a private mount namespace and a tmpfs mount work here (call in a throwaway process)."""
    try:
        private_namespace()
        target = os.path.join(sandbox, ".root")
        os.makedirs(target, exist_ok=True)
        _mount("tmpfs", target, "tmpfs", 0, "mode=755")
    except OSError as exc:
        print(f"sortie: no mount namespaces: {exc}", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a command in a path view of a node sandbox")
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("enter", help="run a command in the view")
    run.add_argument("--sandbox", required=True)
    run.add_argument("--cwd")
    run.add_argument("--view", action="append", default=[], help="an absolute path shown from <sandbox>/mounts")
    run.add_argument("--hide", action="append", default=[], help="a directory runs see empty (the Sortie home)")
    run.add_argument("--show", action="append", default=[], help="a directory under a hidden one shown again")
    run.add_argument("--uid", type=int, help="run the command as this uid (the node's user), /proc private to it")
    run.add_argument("--gid", type=int, help="... and this gid (default: the uid)")
    run.add_argument("--umask", type=lambda text: int(text, 8), help="the command's umask, in octal (a node user's)")
    run.add_argument("command", nargs=argparse.REMAINDER)
    check = sub.add_parser("probe", help="exit 0 if mount namespaces work here")
    check.add_argument("--sandbox", required=True)
    args = parser.parse_args(argv)
    if args.action == "probe":
        sys.exit(0 if probe(args.sandbox) else 1)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("enter: a command is required after --")
    enter(args.sandbox, args.cwd, args.view, command, args.hide, args.show, args.uid, args.gid, args.umask)


if __name__ == "__main__":
    main()
