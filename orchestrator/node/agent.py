"""The node agent: runs commands on one node and keeps their logs and exit codes on disk.

Standard library only, so cloud user-data can ship this file to a VM unchanged:

    python3 agent.py --sandbox DIR [--host 127.0.0.1] [--port 0] [--node-id ID]

The bearer token comes from the first line of stdin (`--token-stdin`, what Sortie uses: it never
shows in /proc/<pid>/environ), `--token-file`, or `$SORTIE_AGENT_TOKEN` (removed from the
environment before anything runs). Every request must carry `Authorization: Bearer <token>`.

HTTP API (JSON):
    GET  /health                    node id, pid, uptime, runs in progress
    POST /runs                      {"command", "env"?, "cwd"?, "run_id"?, "view"?} -> {"run_id"}
                                    view false (--confine only): run in the node's own mount namespace,
                                    without the path view, so that what the run mounts under mounts/
                                    (a FUSE mount of a bucket) is there for the runs after it
    GET  /runs                      every run's status
    GET  /runs/<id>                 {"state": running|exited|cancelled, "exit_code", ...}
    GET  /runs/<id>/log?offset=N    raw log bytes from offset N (header X-Next-Offset)
    POST /runs/<id>/cancel          SIGTERM to the run's process group, SIGKILL after a grace period
    GET  /watch?since=N&timeout=S&epoch=E
                                    long poll: {"epoch", "seq", "events": [...], "reset"} with every change after
                                    seq N (run started, exited or cancelled with its exit code, log grown to an
                                    offset), at once if there is one, else when one happens or after S seconds
                                    (at most 300). reset true (with "runs", every run's status): the events after N
                                    are no longer all kept, or E is not this node's journal; start again from "seq"
    POST /files?dest=PATH           a tar stream, extracted at PATH (relative: under workdir/; `~/x`: under
                                    home/; absolute: as is, or under mounts/ when started with --confine).
                                    400 for a PATH with `..`, NUL or ~user, or that leads out of its root; 409
                                    when PATH holds something the agent did not place (never removed); 507 when
                                    the node's disk is full
    POST /links                     {"dest", "target"} -> {"path"}: a symlink at dest (placed as uploads are)
                                    to `target`, an existing directory on the node, replacing what was there;
                                    target null: only declare dest (a path whose content a later run writes)

Runs get only the environment the controller sends (the task's envs and secrets, SkyPilot's variables), the
agent's own SORTIE_NODE_SANDBOX, and RUN_ENV_PASSTHROUGH of the agent's environment. An ended run's exit code is
kept in memory and written to exit.json, retried while the disk is full; meanwhile its status (and /health) carry
"node_error". With --hide DIR (repeatable; the local cloud passes the Sortie home), confined runs see DIR empty,
but for their own sandbox and the targets of links.

Path view (--confine only): runs see each absolute upload or link destination P at P, showing mounts/P,
and the rest of the machine unchanged (a private mount namespace: node_view.py, needed beside this file
only with --confine). Where mount namespaces fail the probe at start, or SORTIE_NO_MOUNT_NAMESPACE=1,
runs get no view and a first log line saying so. Runs get SORTIE_MOUNTS_ROOT=<sandbox>/mounts either way.

Layout in the sandbox (it survives agent and controller restarts):
    agent.json                      {"pid", "port", "host", "node_id"} once listening
    runs/<id>/meta.json             command, cwd, pid, pgid, started_at
    runs/<id>/output.log            stdout and stderr together
    runs/<id>/exit.json             {"exit_code", "ended_at"} when the run ends (128+N for signal N)
    runs/<id>/cancelled             present if the run was cancelled
    watch.jsonl, watch.json         the change journal (one JSON event a line, its last WATCH_KEEP events kept) and
                                    its epoch: sequence numbers go on across agent restarts
    workdir/                        default cwd of runs
    home/, mounts/                  where `~/...` and (with --confine) absolute upload paths land; with
                                    --confine, home/ is also $HOME of runs
    views.json                      {"views": [P, ...]}: the paths a confined agent's runs see from mounts/
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import hashlib
import hmac
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_BODY = 4 * 1024 * 1024
MAX_UPLOAD = 8 * 1024 * 1024 * 1024
CANCEL_GRACE_SECONDS = 5.0
SANDBOX_ENV = "SORTIE_NODE_SANDBOX"
MOUNTS_ENV = "SORTIE_MOUNTS_ROOT"
EXIT_WRITE_RETRY_SECONDS = 2.0
# What a run inherits from the agent's own environment; the rest of a run's environment is what the controller
# sends (the task's envs and secrets, and SkyPilot's variables). The agent's (and on the local cloud the
# controller's) SORTIE_*, AWS_*, PYTHONPATH and the like never reach a run.
RUN_ENV_PASSTHROUGH = frozenset({"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM",
                                 "TMPDIR", "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH"})
NO_SPACE = "no space left on the node"
RUN_UMASK = 0o022  # a run's own files are as on any machine; the agent's records keep the umask it was given
WATCH_KEEP = 4096  # events a watcher can resume from; the journal file is compacted past twice that
WATCH_BATCH = 1000  # events in one /watch answer at most (the rest in the next)
WATCH_MAX_TIMEOUT = 300.0
LOG_EVENT_SECONDS = 0.5  # log growth of a run is reported at most this often
NO_VIEW_NOTE = "sortie: no mount namespaces here; absolute paths of uploads and mounts are under ${} ({})\n"


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


def _kill_group(pgid: int, grace: float) -> None:
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


class WatchJournal:
    """The node's changes, numbered in order and kept on disk, so that a watcher (GET /watch) that comes back,
    or a restarted agent, goes on from a sequence number without losing a change. One condition: a held
    watch is a thread waiting on it, nothing more."""

    def __init__(self, sandbox: Path) -> None:
        self.path = sandbox / "watch.jsonl"
        self._cond = threading.Condition()
        self._events: collections.deque[dict] = collections.deque(maxlen=WATCH_KEEP)
        self._lines = 0
        if self.path.exists():
            lines = self.path.read_text().splitlines()  # bounded: compacted past 2 * WATCH_KEEP lines
            self._lines = len(lines)
            for line in lines[-WATCH_KEEP:]:
                with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError):
                    event = json.loads(line)
                    if not self._events or event["seq"] == self._events[-1]["seq"] + 1:
                        self._events.append(event)
        self.seq = self._events[-1]["seq"] if self._events else 0
        epoch_file = sandbox / "watch.json"
        try:
            self.epoch = str(json.loads(epoch_file.read_text())["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            self.epoch = uuid.uuid4().hex
            write_json_atomic(epoch_file, {"epoch": self.epoch})

    def record(self, kind: str, run_id: str, **data: object) -> None:
        with self._cond:
            self.seq += 1
            event = {"seq": self.seq, "kind": kind, "run_id": run_id, "time": time.time(), **data}
            self._events.append(event)
            try:  # on disk for a restarted agent; a full disk keeps it in memory (a restart then sends a reset)
                if self._lines >= 2 * WATCH_KEEP:  # compact: keep what a watcher can still resume from
                    tmp = self.path.with_name(".watch.jsonl.tmp")
                    tmp.write_text("".join(json.dumps(e) + "\n" for e in self._events))
                    os.replace(tmp, self.path)
                    self._lines = len(self._events)
                else:
                    with self.path.open("a") as fh:
                        fh.write(json.dumps(event) + "\n")
                    self._lines += 1
            except OSError:
                pass
            finally:
                self._cond.notify_all()

    def since(self, seq: int, timeout: float, epoch: str | None = None) -> tuple[list[dict], int, bool]:
        """The events after `seq` (waiting up to `timeout` seconds for one), the seq to go on from, and whether
        the watcher must reset (take every run's status afresh): events after `seq` were dropped, `seq` is ahead
        of this journal, or `epoch` is another journal's."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                first = self._events[0]["seq"] if self._events else self.seq + 1
                if seq > self.seq or seq < first - 1 or (epoch and epoch != self.epoch):
                    return [], self.seq, True
                if seq < self.seq:
                    start = seq - first + 1
                    events = list(itertools.islice(self._events, start, start + WATCH_BATCH))
                    return events, events[-1]["seq"], False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return [], seq, False
                self._cond.wait(remaining)
# Inside the task's container: record the shell's pid (for cancel), then run the command with bash, else sh.
_CONTAINER_WRAP = ('echo $$ > "$1"; shift; if command -v bash >/dev/null 2>&1; then exec bash -c "$1"; '
                   'else exec sh -c "$1"; fi')


def container_name(node_id: str) -> str:
    return "sortie-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", node_id)[:100]


class Container:
    """SkyPilot's `image_id: docker:<image>`: one long-lived container of the task's image per node (host
    network, the sandbox bound at its own path, GPUs when the node has them), in which every run executes.
    `engine` is docker or podman; `options` are the task's docker.run_options."""

    def __init__(self, engine: str, image: str, options: list[str], node_id: str, sandbox: Path,
                 workdir: Path) -> None:
        self.engine, self.image, self.options = engine, image, options
        self.name, self.sandbox, self.workdir = container_name(node_id), sandbox, workdir
        self._lock = threading.Lock()
        self._started = False
        self.error: str | None = None

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
            argv = [self.engine, "run", "-d", "--name", self.name, "--network", "host",
                    "-v", f"{self.sandbox}:{self.sandbox}", *volumes, "-w", str(self.workdir), *gpus, *self.options,
                    "--entrypoint", "/bin/sh", self.image, "-c", "sleep infinity || while :; do sleep 3600; done"]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                self.error = f"cannot start a container of {self.image}: {lines[-1] if lines else done.returncode}"
            else:
                self._started = True

    def argv(self, command: str, cwd: Path, env: dict[str, str], pid_file: Path,
             binds: Sequence[tuple[str, str]] = (), extra_keys: tuple[str, ...] = ()) -> list[str]:
        """The client command of one run; the container starts at the first (after the node's files and mounts
        are in place: `binds` puts each absolute file-mount destination at its path)."""
        self.ensure(env, binds)
        env_keys = [k for k in env if _ENV_KEY.match(k)] + [SANDBOX_ENV, *extra_keys]
        if self.error:
            return ["/bin/sh", "-c", 'echo "sortie: $1" >&2; exit 125', "sortie", self.error]
        names = [part for key in env_keys for part in ("-e", key)]  # values come from the client's environment
        return [self.engine, "exec", "-i", "-w", str(cwd), *names, self.name, "/bin/sh", "-c", _CONTAINER_WRAP,
                "sortie-run", str(pid_file), command]

    def signal(self, pid_file: Path, sig: str) -> None:
        with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
            pid = int(pid_file.read_text().strip())
            subprocess.run([self.engine, "exec", self.name, "kill", f"-{sig}", str(pid)], capture_output=True,
                           timeout=60)

    def remove(self) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([self.engine, "rm", "-f", "-t", "1", self.name], capture_output=True, timeout=120)


class Agent:
    """The state of one node: its sandbox and the runs it started."""

    def __init__(self, sandbox: Path, token: str, node_id: str, confine: bool = False,
                  hide: list[str] | None = None, container: dict | None = None) -> None:
        self.sandbox = sandbox
        self.node_id = node_id
        self.confine = confine
        self.runs_dir = sandbox / "runs"
        self.workdir = sandbox / "workdir"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        self._token_digest = hashlib.sha256(token.encode()).digest()
        self._procs: dict[str, subprocess.Popen] = {}
        # Exit records not yet on disk (a full disk): served from here, written by the waiter when it can.
        self._exits: dict[str, dict] = {}
        self.write_error: str | None = None
        self._lock = threading.Lock()
        views = sandbox / "views.json"
        recorded = json.loads(views.read_text()) if views.exists() else {}
        self._views: set[str] = set(recorded.get("views", []))
        self._shows: set[str] = set(recorded.get("shows", []))  # link targets, shown to runs though under `hide`
        self._hide = list(hide or [])  # directories runs see empty (the Sortie home; the sandbox shows again)
        self._view_script = probe_path_view(sandbox) if confine else None
        self.watch = WatchJournal(sandbox)
        self.stopping = False  # SIGTERM: the runs killed on the way out are not reported as exits (a lost node)
        self._log_sizes: dict[str, int] = {}
        threading.Thread(target=self._sample_logs, daemon=True, name="log-sampler").start()
        self.container = (Container(container["engine"], container["image"], list(container.get("options") or []),
                                    node_id, sandbox, self.workdir) if container else None)

    def authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        given = hashlib.sha256(header[len("Bearer "):].strip().encode()).digest()
        return hmac.compare_digest(given, self._token_digest)

    def start_run(self, command: str, env: dict[str, str], cwd: str | None, run_id: str | None,
                  view: bool = True) -> str:
        run_id = run_id or uuid.uuid4().hex[:12]
        if not RUN_ID.match(run_id):
            raise ValueError(f"run_id {run_id!r} must match {RUN_ID.pattern}")
        run_dir = self.runs_dir / run_id
        with self._lock:
            if run_dir.exists():
                raise FileExistsError(f"run {run_id} already exists")
            run_dir.mkdir()
        try:
            proc = self._spawn(run_dir, command, env, cwd, view)
        except OSError:  # a full disk, say: leave no half-made run behind, so that the same id can be retried
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        with self._lock:
            self._procs[run_id] = proc
        self.watch.record("started", run_id, pid=proc.pid)
        threading.Thread(target=self._wait, args=(run_id, proc), daemon=True).start()
        return run_id

    def _spawn(self, run_dir: Path, command: str, env: dict[str, str], cwd: str | None,
               view: bool) -> subprocess.Popen:
        run_id = run_dir.name
        workdir = Path(cwd).expanduser() if cwd else self.workdir
        if not workdir.is_absolute():
            workdir = self.workdir / workdir
        workdir.mkdir(parents=True, exist_ok=True)
        child_env = {**run_base_env(dict(os.environ)), **{str(k): str(v) for k, v in env.items()},
                     SANDBOX_ENV: str(self.sandbox)}
        argv = ["/bin/bash", "-c", command]
        if self.confine:
            child_env[MOUNTS_ENV] = str(self.sandbox / "mounts")
            if "HOME" not in env:  # `~/...` uploads land in home/: runs see them at ~ too
                (self.sandbox / "home").mkdir(exist_ok=True)
                child_env["HOME"] = str(self.sandbox / "home")
            if not view:
                pass  # the node's own namespace: a mount made under mounts/ outlives the run
            elif self._view_script is None:
                (run_dir / "output.log").write_text(NO_VIEW_NOTE.format(MOUNTS_ENV, child_env[MOUNTS_ENV]))
            else:
                with self._lock:
                    views = [f"--view={v}" for v in sorted(self._views)]
                    views += [f"--hide={h}" for h in self._hide] + [f"--show={s}" for s in sorted(self._shows)]
                argv = [sys.executable, "-I", "-S", str(self._view_script), "enter", "--sandbox", str(self.sandbox),
                        f"--cwd={workdir}", *views, "--", *argv]
        if self.container is not None and view:  # setup and run; the node's own steps (view=False) stay outside
            with self._lock:
                binds = [(str(self.resolve(view)), view) for view in sorted(self._views)]
            argv = self.container.argv(command, workdir, {str(k): str(v) for k, v in env.items()},
                                       run_dir / "container.pid", binds,
                                       (MOUNTS_ENV, "HOME") if self.confine else ())
        log = (run_dir / "output.log").open("ab")
        try:
            proc = subprocess.Popen(
                argv, cwd=workdir, env=child_env, stdin=subprocess.DEVNULL, umask=RUN_UMASK,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            )
        finally:
            log.close()
        try:
            write_json_atomic(run_dir / "meta.json", {
                "run_id": run_id, "command": command, "cwd": str(workdir), "pid": proc.pid, "pgid": proc.pid,
                "started_at": time.time(), "env_keys": sorted(env),
            })
        except OSError:  # no record of it, so no run: stop it
            _kill_group(proc.pid, 1.0)
            proc.wait()
            raise
        return proc

    def _wait(self, run_id: str, proc: subprocess.Popen) -> None:
        """Record a run's exit code: in memory first (served at once), then on disk, retried until it lands
        (a full disk must not lose it, nor leave the run looking "running")."""
        rc = proc.wait()
        code = rc if rc >= 0 else 128 - rc
        ended_at = time.time()
        record = {"exit_code": code, "ended_at": ended_at}
        with self._lock:
            self._exits[run_id] = record
            self._procs.pop(run_id, None)
        self._note_log(run_id)  # the whole log's size before the exit: a watcher copies it, then judges the exit
        self._log_sizes.pop(run_id, None)
        written = self._write_exit(run_id, record)  # on disk before a watcher hears of it, when the disk allows
        if not self.stopping:  # a run killed because the agent stops is no exit (the node is going)
            kind = "cancelled" if (self.runs_dir / run_id / "cancelled").exists() else "exited"
            self.watch.record(kind, run_id, exit_code=code, ended_at=ended_at)
        while not written:  # a full disk: served from memory meanwhile, written when space returns
            time.sleep(EXIT_WRITE_RETRY_SECONDS)
            written = self._write_exit(run_id, record)

    def _write_exit(self, run_id: str, record: dict) -> bool:
        try:
            write_json_atomic(self.runs_dir / run_id / "exit.json", record)
        except OSError as exc:
            self.write_error = f"{NO_SPACE} ({self.sandbox})" if exc.errno == errno.ENOSPC else \
                f"cannot write {self.runs_dir / run_id / 'exit.json'}: {exc.strerror or exc}"
            return False
        with self._lock:
            self._exits.pop(run_id, None)
            if not self._exits:
                self.write_error = None
        return True

    def _note_log(self, run_id: str) -> None:
        """A `log` event when the run's log grew since the last one."""
        with contextlib.suppress(OSError):
            size = (self.runs_dir / run_id / "output.log").stat().st_size
            if size != self._log_sizes.get(run_id, 0):
                self._log_sizes[run_id] = size
                self.watch.record("log", run_id, offset=size)

    def _sample_logs(self) -> None:
        while True:
            time.sleep(LOG_EVENT_SECONDS)
            with self._lock:
                running = list(self._procs)
            for run_id in running:
                self._note_log(run_id)

    def status(self, run_id: str) -> dict | None:
        run_dir = self.runs_dir / run_id
        meta_path = run_dir / "meta.json"
        if not RUN_ID.match(run_id) or not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        exit_path = run_dir / "exit.json"
        with self._lock:
            ended = self._exits.get(run_id)
        if ended is None and exit_path.exists():
            ended = json.loads(exit_path.read_text())
        cancelled = (run_dir / "cancelled").exists()
        state = "running" if ended is None else ("cancelled" if cancelled else "exited")
        return {
            "run_id": run_id, "state": state, "exit_code": ended["exit_code"] if ended else None,
            "pid": meta["pid"], "started_at": meta["started_at"], "ended_at": ended["ended_at"] if ended else None,
            "log_size": (run_dir / "output.log").stat().st_size if (run_dir / "output.log").exists() else 0,
            **({"node_error": self.write_error} if self.write_error else {}),
        }

    def all_status(self) -> list[dict]:
        return [s for p in sorted(self.runs_dir.iterdir()) if (s := self.status(p.name)) is not None]

    def read_log(self, run_id: str, offset: int, limit: int = 1 << 20) -> bytes | None:
        path = self.runs_dir / run_id / "output.log"
        if not RUN_ID.match(run_id) or not path.exists():
            return None
        with path.open("rb") as fh:
            fh.seek(max(offset, 0))
            return fh.read(limit)

    def cancel(self, run_id: str) -> dict | None:
        status = self.status(run_id)
        if status is None:
            return None
        if status["state"] == "running":
            (self.runs_dir / run_id / "cancelled").touch()
            if self.container is not None and (self.runs_dir / run_id / "container.pid").exists():
                self.container.signal(self.runs_dir / run_id / "container.pid", "TERM")
            _kill_group(status["pid"], CANCEL_GRACE_SECONDS)
            with self._lock:
                proc = self._procs.get(run_id)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=CANCEL_GRACE_SECONDS)
                # The waiter thread records the exit code; give it a moment to land.
                deadline = time.monotonic() + 1.0
                while self.status(run_id)["state"] == "running" and time.monotonic() < deadline:  # type: ignore[index]
                    time.sleep(0.01)
        return self.status(run_id)

    def shutdown_runs(self) -> None:
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            _kill_group(proc.pid, 1.0)
        if self.container is not None:
            self.container.remove()

    def resolve(self, dest: str) -> Path:
        """Where an upload to `dest` lands on this node (ValueError when outside the sandbox's roots)."""
        return place_destination(dest, self.workdir, self.sandbox / "home",
                                 self.sandbox / "mounts" if self.confine else None)

    def _placed_paths(self) -> set[str]:
        placed = self.sandbox / "placed.json"
        return set(json.loads(placed.read_text())["paths"]) if placed.exists() else set()

    def _record_placed(self, path: Path) -> None:
        with self._lock:
            paths = self._placed_paths() | {str(path)}
            write_json_atomic(self.sandbox / "placed.json", {"paths": sorted(paths)})

    def _clear_for(self, dest: str, path: Path) -> None:
        """Make room at `path` for what `dest` places. Only what this agent placed (or its own workdir, or an
        empty directory) is removed; anything else there is refused (FileExistsError: 409)."""
        if path.is_symlink() or path.is_file():
            if str(path) not in self._placed_paths() and not contained(path.parent, self.sandbox):
                raise FileExistsError(f"destination {dest!r}: {path} is on the node already and Sortie did not "
                                      "place it; it is left as it is (choose another destination)")
            path.unlink()
        elif path.is_dir():
            if path == self.workdir or str(path) in self._placed_paths():
                shutil.rmtree(path)
            elif not any(path.iterdir()):
                path.rmdir()
            else:
                raise FileExistsError(f"destination {dest!r}: {path} is a directory on the node that Sortie did "
                                      "not place there; it is left as it is (choose another destination)")

    def _add_view(self, dest: str, target: str | None = None) -> None:
        """Record an absolute destination of a confined agent: runs started from now on see it at its path (and
        a link's target, which they see even where it lies under a hidden directory)."""
        if (self.confine or self.container is not None) and (dest.startswith("/") or target):
            with self._lock:
                if dest.startswith("/"):
                    self._views.add("/" + os.path.normpath(dest).lstrip("/"))
                if target:
                    self._shows.add(os.path.realpath(target))
                write_json_atomic(self.sandbox / "views.json", {"views": sorted(self._views),
                                                                "shows": sorted(self._shows)})

    def link(self, dest: str, target: str | None) -> Path:
        """A symlink at `dest` (placed as an upload to `dest` is) to the node's directory `target`. With no
        target, `dest` is only declared: runs see it at its path once something writes it under mounts/."""
        if target is None:
            self._add_view(dest)
            return self.resolve(dest)
        if not os.path.isabs(target) or not os.path.isdir(target):
            raise ValueError(f"links: target must be the absolute path of an existing directory, not {target!r}")
        path = self.resolve(dest)
        if path in (Path("/"), self.workdir, self.sandbox / "home", self.sandbox / "mounts"):
            raise ValueError(f"links: dest {dest!r} would replace a whole root ({path})")
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.link-tmp")
        staged.unlink(missing_ok=True)
        staged.symlink_to(target)
        try:
            self._clear_for(dest, path)
        except FileExistsError:
            staged.unlink()
            raise
        os.replace(staged, path)
        self._record_placed(path)
        self._add_view(dest, target)
        return path

    def receive_files(self, dest: str, stream: object, length: int, single_file: bool = False) -> Path:
        """Extract a tar stream at `dest`, replacing what was there only once the whole stream arrived."""
        target = self.resolve(dest)
        if target in (Path("/"), self.sandbox / "home", self.sandbox / "mounts"):
            raise ValueError(f"files: dest {dest!r} would replace a whole root ({target})")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".upload-") as tmp:
            archive = Path(tmp) / "upload.tar"
            with archive.open("wb") as fh:
                remaining = length
                while remaining > 0:
                    chunk = stream.read(min(remaining, 1 << 20))  # type: ignore[attr-defined]
                    if not chunk:
                        raise ValueError("upload ended early")
                    fh.write(chunk)
                    remaining -= len(chunk)
            staged = Path(tmp) / "staged"
            with tarfile.open(archive) as tar:
                tar.extractall(staged, filter="data")
            if single_file:
                members = list(staged.iterdir())
                if len(members) != 1 or not members[0].is_file():
                    raise ValueError("files: file=1 needs a tar of exactly one regular file")
                staged = members[0]
            self._clear_for(dest, target)
            os.replace(staged, target)
        self._record_placed(target)
        self._add_view(dest)
        return target

    def health(self) -> dict:
        running = sum(1 for s in self.all_status() if s["state"] == "running")
        return {"status": "ok", "node_id": self.node_id, "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started_at, 3), "runs_running": running,
                **({"node_error": self.write_error} if self.write_error else {})}


class _Handler(BaseHTTPRequestHandler):
    server: _AgentServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.address_string()} {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: object) -> None:
        self._send(status, json.dumps(data).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _authorized(self) -> bool:
        if self.server.agent.authorized(self.headers.get("Authorization")):
            return True
        # Drain the body so the connection stays usable, then refuse.
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= MAX_BODY:
            self.rfile.read(length)
        self._send(HTTPStatus.UNAUTHORIZED, b'{"error": "missing or wrong bearer token"}',
                   headers={"WWW-Authenticate": "Bearer"})
        return False

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("request body too large")
        data = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(data, dict):
            raise ValueError("request body must be a JSON object")
        return data

    def do_GET(self) -> None:
        if not self._authorized():
            return
        agent = self.server.agent
        url = urlparse(self.path)
        parts = [p for p in url.path.split("/") if p]
        if parts == ["health"]:
            self._json(200, agent.health())
        elif parts == ["watch"]:
            self._watch(parse_qs(url.query))
        elif parts == ["runs"]:
            self._json(200, agent.all_status())
        elif len(parts) == 2 and parts[0] == "runs":
            status = agent.status(parts[1])
            self._json(200, status) if status else self._error(404, f"no run {parts[1]}")
        elif len(parts) == 3 and parts[0] == "runs" and parts[2] == "log":
            query = parse_qs(url.query)
            offset = int(query.get("offset", ["0"])[0])
            data = agent.read_log(parts[1], offset)
            if data is None:
                self._error(404, f"no run {parts[1]}")
            else:
                self._send(200, data, "application/octet-stream", {"X-Next-Offset": str(offset + len(data))})
        else:
            self._error(404, f"no route GET {url.path}")

    def _watch(self, query: dict[str, list[str]]) -> None:
        try:
            since = int(query.get("since", ["0"])[0])
            timeout = min(max(float(query.get("timeout", ["0"])[0]), 0.0), WATCH_MAX_TIMEOUT)
        except ValueError:
            self._error(400, "watch: since must be an integer and timeout a number of seconds")
            return
        journal = self.server.agent.watch
        events, seq, reset = journal.since(since, timeout, query.get("epoch", [""])[0] or None)
        body: dict[str, object] = {"epoch": journal.epoch, "reset": reset, "events": events, "seq": seq}
        if reset:  # taken after `seq`: a change in between shows in both, never in neither
            body["runs"] = self.server.agent.all_status()
        self._json(200, body)

    def do_POST(self) -> None:
        if not self._authorized():
            return
        agent = self.server.agent
        parts = [p for p in urlparse(self.path).path.split("/") if p]
        try:
            if parts == ["files"]:
                length = int(self.headers.get("Content-Length") or 0)
                dest = parse_qs(urlparse(self.path).query).get("dest", [""])[0]
                if not dest or length > MAX_UPLOAD:
                    raise ValueError("files: a dest and a tar body under 8 GiB are required")
                single = parse_qs(urlparse(self.path).query).get("file", ["0"])[0] == "1"
                target = agent.receive_files(dest, self.rfile, length, single)
                self._json(201, {"path": str(target)})
                return
            body = self._body()
            if parts == ["runs"]:
                command = body.get("command")
                if not isinstance(command, str) or not command.strip():
                    raise ValueError("command: a non-empty string is required")
                env = body.get("env") or {}
                if not isinstance(env, dict):
                    raise ValueError("env: must be an object of strings")
                view = body.get("view", True)
                if not isinstance(view, bool):
                    raise ValueError("view: must be true or false")
                run_id = agent.start_run(command, env, body.get("cwd"), body.get("run_id"), view)
                self._json(201, {"run_id": run_id})
            elif parts == ["links"]:
                dest, target = body.get("dest"), body.get("target")  # type: ignore[assignment]
                if not isinstance(dest, str) or not dest or not isinstance(target, str | None):
                    raise ValueError("links: dest must be a non-empty string and target a string or null")
                self._json(201, {"path": str(agent.link(dest, target))})
            elif len(parts) == 3 and parts[0] == "runs" and parts[2] == "cancel":
                status = agent.cancel(parts[1])
                self._json(200, status) if status else self._error(404, f"no run {parts[1]}")
            else:
                self._error(404, f"no route POST {self.path}")
        except FileExistsError as exc:
            self._error(409, str(exc))
        except (ValueError, json.JSONDecodeError, tarfile.TarError) as exc:
            self._error(400, str(exc))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._error(HTTPStatus.INSUFFICIENT_STORAGE, f"{NO_SPACE} ({agent.sandbox})")
            else:
                self._error(500, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))


class _AgentServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], agent: Agent) -> None:
        super().__init__(address, _Handler)
        self.agent = agent


def serve(sandbox: Path, token: str, host: str, port: int, node_id: str, confine: bool = False,
           hide: list[str] | None = None, container: dict | None = None) -> None:
    agent = Agent(sandbox, token, node_id, confine, hide, container)
    server = _AgentServer((host, port), agent)

    def stop(_signum: int, _frame: object) -> None:
        agent.stopping = True
        agent.shutdown_runs()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    write_json_atomic(sandbox / "agent.json", {
        "pid": os.getpid(), "host": host, "port": server.server_address[1], "node_id": node_id,
        "started_at": agent.started_at,
    })
    server.serve_forever(poll_interval=0.2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sortie node agent")
    parser.add_argument("--sandbox", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--node-id", default="")
    parser.add_argument("--token-file", type=Path)
    parser.add_argument("--token-stdin", action="store_true", help="read the token from the first line of stdin")
    parser.add_argument("--confine", action="store_true", help="absolute upload paths land under <sandbox>/mounts")
    parser.add_argument("--hide", action="append", default=[],
                        help="with --confine: a directory runs see empty (the Sortie home); repeatable")
    parser.add_argument("--container-image", help="run setup and run in a container of this image")
    parser.add_argument("--container-engine", default="docker", help="docker or podman")
    parser.add_argument("--container-option", action="append", default=[], help="an engine run option")
    args = parser.parse_args(argv)
    token = os.environ.pop("SORTIE_AGENT_TOKEN", "")
    if args.token_file:
        token = args.token_file.read_text().strip()
    if args.token_stdin:
        token = sys.stdin.readline().strip()
    if not token:
        parser.error("a token is required: pass --token-stdin, --token-file or set SORTIE_AGENT_TOKEN")
    args.sandbox.mkdir(parents=True, exist_ok=True)
    container = ({"engine": args.container_engine, "image": args.container_image, "options": args.container_option}
                 if args.container_image else None)
    serve(args.sandbox.resolve(), token, args.host, args.port, args.node_id or args.sandbox.name, args.confine,
          args.hide, container)


if __name__ == "__main__":
    main()
