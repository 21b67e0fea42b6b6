"""Node side, /etc/passwd and /etc/group entries for the local cloud's run users (issue 17), standard library only.

A node user (`node_user.py`) or a pool job's user gets an account for its lifetime, so that `whoami`, `id -un`,
getpwuid(), `ssh`, `pip --user`, git and the like work as on a VM: `sortie-<uid>` (uid and gid from the reserved
range), its home the run's own private `$HOME`, shell /bin/bash, no password (the entry's `x` points at
/etc/shadow, which has no line for it: no one can log in as it). Its group is `sortie-<gid>`. The entries are
removed with the user (the node's end, the pool job's end), and any entry of the range whose home is gone (an agent
killed without its cleanup) is removed whenever one is added.

Edits are made under the lock that `lckpwdf(3)` and the shadow tools take (an fcntl lock on /etc/.pwd.lock), and
a thread lock in this process; a file is replaced whole (a temporary file beside it, renamed over it), or rewritten
in place where it cannot be renamed over (a bind-mounted /etc/passwd).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

ETC = Path("/etc")  # tests point it at a directory of their own
PREFIX = "sortie-"
SHELL = "/bin/bash"
_lock = threading.Lock()


def account_name(uid: int) -> str:
    return f"{PREFIX}{uid}"


@contextlib.contextmanager
def _locked(etc: Path) -> Iterator[None]:
    with _lock:
        fd = os.open(etc / ".pwd.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _rewrite(path: Path, change: Callable[[list[str]], list[str]]) -> None:
    lines = path.read_text().splitlines() if path.exists() else []
    new = change(lines)
    if new == lines:
        return
    text = "".join(f"{line}\n" for line in new)
    st = path.stat() if path.exists() else None
    tmp = path.with_name(f".{path.name}.sortie-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if st is not None:
            os.chown(tmp, st.st_uid, st.st_gid)
            os.chmod(tmp, st.st_mode & 0o7777)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM):
            raise
        path.write_text(text)  # a bind-mounted file: rewritten where it is


def _ours(line: str, in_range: Callable[[int], bool]) -> tuple[str, int] | None:
    """(name, id) of a passwd or group line that is one of ours (named sortie-<id>, id in the range)."""
    fields = line.split(":")
    if len(fields) < 4 or not fields[0].startswith(PREFIX) or not fields[2].isdigit():
        return None
    ident = int(fields[2])
    return (fields[0], ident) if fields[0] == account_name(ident) and in_range(ident) else None


def _keep(lines: list[str], drop: Callable[[int, list[str]], bool], in_range: Callable[[int], bool]) -> list[str]:
    kept = []
    for line in lines:
        ours = _ours(line, in_range)
        if ours is None or not drop(ours[1], line.split(":")):
            kept.append(line)
    return kept


def add_account(uid: int, gid: int, home: Path, in_range: Callable[[int], bool], etc: Path | None = None) -> str:
    """Add (or replace) `sortie-<uid>` with its group `sortie-<gid>`; drop the range's entries whose home is gone.
    Returns the account's name."""
    name, etc = account_name(uid), etc or ETC

    def gone(_ident: int, fields: list[str]) -> bool:
        return len(fields) > 5 and not os.path.isdir(fields[5])

    with _locked(etc):
        def passwd(lines: list[str]) -> list[str]:
            kept = _keep(lines, lambda ident, f: ident == uid or gone(ident, f), in_range)
            return [*kept, f"{name}:x:{uid}:{gid}:Sortie run user:{home}:{SHELL}"]

        _rewrite(etc / "passwd", passwd)
        users = (etc / "passwd").read_text().splitlines()
        primary = {int(f[3]) for f in (line.split(":") for line in users) if len(f) > 3 and f[3].isdigit()}

        def group(lines: list[str]) -> list[str]:
            kept = _keep(lines, lambda ident, _f: ident not in primary, in_range)
            if not any(_ours(line, in_range) == (account_name(gid), gid) for line in kept):
                kept.append(f"{account_name(gid)}:x:{gid}:")
            return kept

        _rewrite(etc / "group", group)
    return name


def remove_account(uid: int, in_range: Callable[[int], bool], etc: Path | None = None) -> None:
    """Remove `sortie-<uid>`, and its group once no account of ours has it as its primary group."""
    etc = etc or ETC
    with _locked(etc):
        _rewrite(etc / "passwd", lambda lines: _keep(lines, lambda ident, _f: ident == uid, in_range))
        users = (etc / "passwd").read_text().splitlines() if (etc / "passwd").exists() else []
        primary = {int(f[3]) for f in (line.split(":") for line in users) if len(f) > 3 and f[3].isdigit()}
        _rewrite(etc / "group", lambda lines: _keep(lines, lambda ident, _f: ident not in primary, in_range))


SUDO_SHIM = """#!/bin/sh
echo "sudo: refused on Sortie's local cloud: this run is the unprivileged user $(id -un), and root here would be \
root on this machine; install what the task needs on the machine beforehand, run the task on a cloud (sudo works \
there), or set SORTIE_NO_RUN_USERS=1 for the controller (runs then run as Sortie's own user)" >&2
exit 1
"""


def install_sudo_shim(bin_dir: Path) -> Path:
    """`<bin_dir>/sudo`, root's, 0755: what a run user's `sudo` is (first on its PATH)."""
    bin_dir.mkdir(exist_ok=True)
    os.chown(bin_dir, 0, 0)
    os.chmod(bin_dir, 0o755)
    shim = bin_dir / "sudo"
    tmp = bin_dir / ".sudo.tmp"
    tmp.write_text(SUDO_SHIM)
    os.chmod(tmp, 0o755)
    os.replace(tmp, shim)
    return shim
