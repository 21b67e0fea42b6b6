"""Node side, the agent's container mode (SkyPilot's `image_id: docker:...`): one long-lived container of
the task's image per node, in which every run executes. Standard library only."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from orchestrator.node.agent_files import ENV_KEY, SANDBOX_ENV

PIDS_DIR = "run-pids"
RUN_DIRS = ("workdir", "home", "mounts", "tmp", PIDS_DIR)  # the sandbox's directories a container sees
# Inside the task's container: record the shell's pid (for cancel), then run the command with bash, else sh.
_CONTAINER_WRAP = ('echo $$ > "$1"; shift; if command -v bash >/dev/null 2>&1; then exec bash -c "$1"; '
                   'else exec sh -c "$1"; fi')


def container_name(node_id: str) -> str:
    return "sortie-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", node_id)[:100]


class Container:
    """SkyPilot's `image_id: docker:<image>`: one long-lived container of the task's image per node (host
    network, the sandbox's run directories bound at their own paths, GPUs when the node has them), in which every
    run executes. `engine` is docker or podman; `options` are the task's docker.run_options (checked against
    the operator's allow-list before they reach the node: `orchestrator.policy.run_options`).

    What a run in it cannot reach (issue 28): the agent's own records (`runs/`: logs, exit codes) are not bound
    into it, so it cannot swap them for links; with `user` set (the node's own uid and gid, when the agent is
    root), its processes are that user, not root, with no capabilities and no way to gain privileges
    (setuid binaries included), so even a host path bound in reads as that user would."""

    def __init__(self, engine: str, image: str, options: list[str], node_id: str, sandbox: Path,
                 workdir: Path) -> None:
        self.engine, self.image, self.options = engine, image, options
        self.name, self.sandbox, self.workdir = container_name(node_id), sandbox, workdir
        self.pids = sandbox / PIDS_DIR  # where each run's shell records its pid (bound in; the run may write it)
        self.user: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._started = False
        self.error: str | None = None

    def confinement(self) -> list[str]:
        """The run options that make the container's processes the node's user (none without one)."""
        if self.user is None:
            return []
        uid, gid = self.user
        return [f"--user={uid}:{gid}", "--cap-drop=all", "--security-opt=no-new-privileges"]

    def bound(self) -> list[str]:
        """`-v` for each directory of the sandbox a run may use (never `runs/`, the agent's records)."""
        return [part for name in RUN_DIRS if (self.sandbox / name).is_dir()
                for part in ("-v", f"{self.sandbox / name}:{self.sandbox / name}")]

    def ensure(self, env: dict[str, str], binds: Sequence[tuple[str, str]] = ()) -> None:
        """Start the container once (a leftover of the same name goes first); `error` says why it could not.
        A private registry is logged in to first with SkyPilot's SKYPILOT_DOCKER_USERNAME/PASSWORD/SERVER from
        the task's envs or secrets (the password on stdin, never in a process's arguments)."""
        with self._lock:
            if self._started or self.error:
                return
            user, password = env.get("SKYPILOT_DOCKER_USERNAME"), env.get("SKYPILOT_DOCKER_PASSWORD")
            if user and password:
                server = env.get("SKYPILOT_DOCKER_SERVER") or ""
                login = subprocess.run([self.engine, "login", "--username", user, "--password-stdin",
                                        *([server] if server else [])], input=password, capture_output=True,
                                       text=True, timeout=300)
                if login.returncode != 0:
                    self.error = f"cannot log in to the registry {server or '(default)'} as {user}"
                    return
            subprocess.run([self.engine, "rm", "-f", self.name], capture_output=True, timeout=120)
            gpus: list[str] = []
            if shutil.which("nvidia-smi"):
                gpus = ["--gpus", "all"] if Path(self.engine).name == "docker" else ["--device", "nvidia.com/gpu=all"]
            volumes = [part for host, path in binds if os.path.exists(host) for part in ("-v", f"{host}:{path}")]
            argv = [self.engine, "run", "-d", "--name", self.name, "--network", "host", *self.confinement(),
                    *self.bound(), *volumes, "-w", str(self.workdir), *gpus, *self.options,
                    "--entrypoint", "/bin/sh", self.image, "-c", "sleep infinity || while :; do sleep 3600; done"]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                self.error = f"cannot start a container of {self.image}: {lines[-1] if lines else done.returncode}"
            else:
                self._started = True

    def pid_file(self, run_id: str) -> Path:
        return self.pids / run_id

    def argv(self, command: str, cwd: Path, env: dict[str, str], pid_file: Path,
             binds: Sequence[tuple[str, str]] = (), extra_keys: tuple[str, ...] = ()) -> list[str]:
        """The client command of one run; the container starts at the first (after the node's files and mounts
        are in place: `binds` puts each absolute file-mount destination at its path)."""
        self.ensure(env, binds)
        env_keys = [k for k in env if ENV_KEY.match(k)] + [SANDBOX_ENV, *extra_keys]
        if self.error:
            return ["/bin/sh", "-c", 'echo "sortie: $1" >&2; exit 125', "sortie", self.error]
        names = [part for key in env_keys for part in ("-e", key)]  # values come from the client's environment
        return [self.engine, "exec", "-i", "-w", str(cwd), *names, self.name, "/bin/sh", "-c", _CONTAINER_WRAP,
                "sortie-run", str(pid_file), command]

    def signal(self, pid_file: Path, sig: str) -> None:
        """Signal a run's shell in the container; its pid file is the run's to write, so it is read without
        following a link, and at most a few bytes of it."""
        with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
            fd = os.open(pid_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                pid = int(os.read(fd, 32).strip())
            finally:
                os.close(fd)
            subprocess.run([self.engine, "exec", self.name, "kill", f"-{sig}", str(pid)], capture_output=True,
                           timeout=60)

    def remove(self) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([self.engine, "rm", "-f", "-t", "1", self.name], capture_output=True, timeout=120)


