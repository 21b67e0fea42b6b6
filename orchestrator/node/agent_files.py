"""Node side, the agent's ground floor: its limits and names, where an upload lands, atomic records, the path
view probe and killing a process group. Standard library only (shipped in the agent zipapp)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_BODY = 4 * 1024 * 1024
MAX_UPLOAD = 8 * 1024 * 1024 * 1024
CANCEL_GRACE_SECONDS = 5.0
SANDBOX_ENV = "SORTIE_NODE_SANDBOX"
NOTICE_FILE = "preemption-notice.env"
NOTICE_FILE_ENV = "SORTIE_PREEMPTION_NOTICE_FILE"
MOUNTS_ENV = "SORTIE_MOUNTS_ROOT"
EXIT_WRITE_RETRY_SECONDS = 2.0
# What a run inherits from the agent's own environment; the rest of a run's environment is what the controller
# sends (the task's envs and secrets, and SkyPilot's variables). The agent's (and on the local cloud the
# controller's) SORTIE_*, AWS_*, PYTHONPATH and the like never reach a run.
RUN_ENV_PASSTHROUGH = frozenset({"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM",
                                 "TMPDIR", "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH"})
NO_SPACE = "no space left on the node"
DISK_FULL_BYTES = 256 * 1024  # free bytes under which a node reports its disk full (issue 28)
RUN_UMASK = 0o022  # a run's own files are as on any machine; the agent's records keep the umask it was given
LOG_EVENT_SECONDS = 0.5  # log growth of a run is reported at most this often
NO_VIEW_NOTE = "sortie: no mount namespaces here; absolute paths of uploads and mounts are under ${} ({})\n"


NOT_A_LOG = b"sortie: this run's output.log was replaced by something that is not a file; it is not shown\n"


def open_log(path: Path, flags: int) -> int:
    """A run's log, opened without following a link and only if it is a regular file (OSError otherwise): a run
    that can reach its log must not make the agent, which may be root, read or write another file through it."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    if flags & os.O_ACCMODE == os.O_RDONLY:
        os.set_blocking(fd, True)
    return fd


def log_size(path: Path) -> int:
    """The size of a run's log (0 when there is none, or it is not a regular file: a link is not followed)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def destination_parts(dest: str) -> tuple[str, str]:
    """Split a node destination into its root ("workdir", "home" or "absolute") and a normalised relative
    path. Refuses `..` components, NUL bytes and `~user` (ValueError, one line naming the destination)."""
    if not dest or "\0" in dest:
        raise ValueError(f"destination {dest!r}: must be a non-empty path without NUL bytes")
    if dest == "~" or dest.startswith("~/"):
        root, rest = "home", dest[1:]
    elif dest.startswith("~"):
        raise ValueError(f"destination {dest!r}: ~user paths are not supported; use ~/... or an absolute path")
    elif dest.startswith("/"):
        root, rest = "absolute", dest
    else:
        root, rest = "workdir", dest
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"destination {dest!r}: '..' is not allowed (a destination stays inside the node's "
                         "workdir, home or mounts)")
    return root, "/".join(parts)


def contained(path: Path, root: Path) -> bool:
    """Whether `path`, with every symlink of its existing part followed, is `root` or under it."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def place_destination(dest: str, workdir: Path, home: Path, mounts: Path | None) -> Path:
    """Where `dest` lands on a node: relative under `workdir`, `~/...` under `home`, absolute under `mounts`
    (a confined node) or as is (a node that is all the job's). ValueError when it would land outside its root,
    through `..` or through a symlink that leads out (checked on the parent: the last component itself may be
    a symlink that is replaced)."""
    kind, rest = destination_parts(dest)
    if kind == "absolute" and mounts is None:
        return Path("/" + rest)
    root = {"workdir": workdir, "home": home, "absolute": mounts}[kind]
    assert root is not None
    path = root / rest if rest else root
    if not contained(path.parent if rest else path, root):
        raise ValueError(f"destination {dest!r}: resolves outside the node's {kind} root ({root})")
    return path


def run_base_env(environ: dict[str, str]) -> dict[str, str]:
    """The part of the agent's environment a run inherits (RUN_ENV_PASSTHROUGH and LC_*)."""
    return {k: v for k, v in environ.items() if k in RUN_ENV_PASSTHROUGH or k.startswith("LC_")}


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def probe_path_view(sandbox: Path) -> Path | None:
    """node_view.py if runs can get a path view here, else None (no script, no namespaces, or opted out)."""
    script = Path(__file__).with_name("node_view.py")
    if os.environ.get("SORTIE_NO_MOUNT_NAMESPACE") == "1" or not script.exists():
        return None
    probe = subprocess.run([sys.executable, "-I", "-S", str(script), "probe", "--sandbox", str(sandbox)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=60, check=False)
    return script if probe.returncode == 0 else None


def kill_group(pgid: int, grace: float) -> None:
    """SIGTERM a process group, then SIGKILL whatever is left after `grace` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


