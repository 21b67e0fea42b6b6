"""Node side, the agent's state: one node's sandbox and the runs it started (start, status, logs, cancel,
uploads, links, exit records that survive restarts). Served over HTTP by `agent_http`; standard library only."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from orchestrator.node.agent_files import (
    CANCEL_GRACE_SECONDS,
    DISK_FULL_BYTES,
    EXIT_WRITE_RETRY_SECONDS,
    LOG_EVENT_SECONDS,
    MOUNTS_ENV,
    NO_SPACE,
    NO_VIEW_NOTE,
    NOT_A_LOG,
    NOTICE_FILE,
    NOTICE_FILE_ENV,
    RUN_ID,
    RUN_UMASK,
    SANDBOX_ENV,
    contained,
    kill_group,
    log_size,
    open_log,
    place_destination,
    probe_path_view,
    run_base_env,
    write_json_atomic,
)
from orchestrator.node.container import Container
from orchestrator.node.watch import WatchJournal


class Agent:
    """The state of one node: its sandbox and the runs it started."""

    def __init__(self, sandbox: Path, token: str, node_id: str, confine: bool = False,
                  hide: list[str] | None = None, container: dict | None = None,
                  link_roots: list[str] | None = None) -> None:
        self.sandbox = sandbox
        # Where a link's target may be (issue 28): the node's own roots, and those the cloud names (the local
        # store's directory, on the local cloud).
        self.link_roots = [sandbox / "workdir", sandbox / "home", sandbox / "mounts",
                           *(Path(r) for r in link_roots or [])]
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
        self.user: Any = None  # node_user.RunUser (local nodes only: not in the zipapp)
        if confine and os.geteuid() == 0:
            self.user = importlib.import_module("orchestrator.node.node_user").for_agent(
                sandbox, node_id, confine, container, self._view_script is not None)
            if self.user:
                self.user.targets |= self._shows
                self.user.link_roots = self.link_roots
        if self.container is not None:
            self._prepare_container()

    def _prepare_container(self) -> None:
        """The container's pid directory (the node user's, as its run directories are) and its user: the node's
        user when there is one; the agent's own user when it is not root and the engine is docker (whose daemon
        is root); else the engine's default (rootless podman maps the container's root to the agent's user)."""
        assert self.container is not None
        self.container.pids.mkdir(mode=0o700, exist_ok=True)
        if self.user:
            uid, gid = self.user.user.uid, self.user.user.gid
            os.chown(self.container.pids, uid, gid, follow_symlinks=False)
            self.container.user = (uid, gid)
        elif os.geteuid() != 0 and Path(self.container.engine).name == "docker":
            self.container.user = (os.geteuid(), os.getegid())

    def authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        given = hashlib.sha256(header[len("Bearer "):].strip().encode()).digest()
        return hmac.compare_digest(given, self._token_digest)

    def start_run(self, command: str, env: dict[str, str], cwd: str | None, run_id: str | None,
                  view: bool = True, user: str | None = None) -> str:
        run_id = run_id or uuid.uuid4().hex[:12]
        if not RUN_ID.match(run_id):
            raise ValueError(f"run_id {run_id!r} must match {RUN_ID.pattern}")
        run_dir = self.runs_dir / run_id
        with self._lock:
            if run_dir.exists():
                raise FileExistsError(f"run {run_id} already exists")
            run_dir.mkdir()
        try:
            proc = self._spawn(run_dir, command, env, cwd, view, user if self.user and not self.container else None)
        except (OSError, ValueError):  # a full disk, say: leave no half-made run behind, so the id can be retried
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        with self._lock:
            self._procs[run_id] = proc
            if self.user and not view:
                self.user.root_runs.add(run_id)
        self.watch.record("started", run_id, pid=proc.pid)
        threading.Thread(target=self._wait, args=(run_id, proc), daemon=True).start()
        return run_id

    def _spawn(self, run_dir: Path, command: str, env: dict[str, str], cwd: str | None,
               view: bool, job: str | None = None) -> subprocess.Popen:
        run_id = run_dir.name
        workdir = Path(cwd).expanduser() if cwd else self.workdir
        if not workdir.is_absolute():
            workdir = self.workdir / workdir
        with self._at(workdir, not view or not contained(workdir, self.sandbox)) as at:
            at.mkdir(parents=True, exist_ok=True)
        child_env = {**run_base_env(dict(os.environ)), **{str(k): str(v) for k, v in env.items()},
                     SANDBOX_ENV: str(self.sandbox), NOTICE_FILE_ENV: str(self.sandbox / NOTICE_FILE)}
        argv = ["/bin/bash", "-c", command]
        if self.confine:
            child_env[MOUNTS_ENV] = str(self.sandbox / "mounts")
            if "HOME" not in env:  # `~/...` uploads land in home/: runs see them at ~ too
                (self.sandbox / "home").mkdir(exist_ok=True)
                child_env["HOME"] = str(self.sandbox / "home")
            as_user = self.user.run_env(child_env, env, view, job) if self.user else []
            if not view:
                pass  # the node's own namespace: a mount made under mounts/ outlives the run
            elif self._view_script is None:
                (run_dir / "output.log").write_text(NO_VIEW_NOTE.format(MOUNTS_ENV, child_env[MOUNTS_ENV]))
            else:
                with self._lock:
                    views = [f"--view={v}" for v in sorted(self._views)]
                    views += [f"--hide={h}" for h in self._hide] + [f"--show={s}" for s in sorted(self._shows)]
                views += as_user
                argv = [sys.executable, "-I", "-S", str(self._view_script), "enter", "--sandbox", str(self.sandbox),
                        f"--cwd={workdir}", *views, "--", *argv]
        if self.container is not None and view:  # setup and run; the node's own steps (view=False) stay outside
            with self._lock:
                binds = [(str(self.resolve(view)), view) for view in sorted(self._views)]
            argv = self.container.argv(command, workdir, {str(k): str(v) for k, v in env.items()},
                                       self.container.pid_file(run_id), binds,
                                       (MOUNTS_ENV, "HOME") if self.confine else ())
        log = os.fdopen(open_log(run_dir / "output.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab")
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
            kill_group(proc.pid, 1.0)
            proc.wait()
            raise
        return proc

    def _wait(self, run_id: str, proc: subprocess.Popen) -> None:
        """Record a run's exit code: in memory first (served at once), then on disk, retried until it lands
        (a full disk must not lose it, nor leave the run looking "running")."""
        rc = proc.wait()
        code = rc if rc >= 0 else 128 - rc
        if self.user:
            self.user.ended(run_id)
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
            size = log_size(self.runs_dir / run_id / "output.log")
            if size != self._log_sizes.get(run_id, 0):
                self._log_sizes[run_id] = size
                self.watch.record("log", run_id, offset=size)

    def _sample_logs(self) -> None:
        said: str | None = None
        while True:
            time.sleep(LOG_EVENT_SECONDS)
            with self._lock:
                running = list(self._procs)
            for run_id in running:
                self._note_log(run_id)
            now = self.node_error()
            if now != said:  # issue 28: a disk that fills (or frees) is news for a watcher, as an exit is
                said = now
                self.watch.record("node", "", node_error=now)

    def node_error(self) -> str | None:
        """What keeps this node from writing: its records could not be written, or its disk is full now."""
        if self.write_error:
            return self.write_error
        try:
            fs = os.statvfs(self.sandbox)
        except OSError:
            return None
        if fs.f_bavail * fs.f_frsize < DISK_FULL_BYTES or (fs.f_files and fs.f_favail == 0):
            return f"{NO_SPACE} ({self.sandbox})"
        return None

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
            "log_size": log_size(run_dir / "output.log"),
            **({"node_error": error} if (error := self.node_error()) else {}),
        }

    def all_status(self) -> list[dict]:
        return [s for p in sorted(self.runs_dir.iterdir()) if (s := self.status(p.name)) is not None]

    def read_log(self, run_id: str, offset: int, limit: int = 1 << 20) -> bytes | None:
        """Up to `limit` bytes of a run's log from `offset`; None when there is no such log. The log is opened
        without following a link (O_NOFOLLOW): a run that swapped its log for a link to another file gets an
        error, never that file (issue 28)."""
        path = self.runs_dir / run_id / "output.log"
        if not RUN_ID.match(run_id) or not os.path.lexists(path):
            return None
        try:
            fd = open_log(path, os.O_RDONLY)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EINVAL, errno.ENXIO):
                raise
            return NOT_A_LOG[max(offset, 0):][:limit]
        with os.fdopen(fd, "rb") as fh:
            fh.seek(max(offset, 0))
            return fh.read(limit)

    def cancel(self, run_id: str) -> dict | None:
        status = self.status(run_id)
        if status is None:
            return None
        if status["state"] == "running":
            (self.runs_dir / run_id / "cancelled").touch()
            if self.container is not None:
                self.container.signal(self.container.pid_file(run_id), "TERM")
            kill_group(status["pid"], CANCEL_GRACE_SECONDS)
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
            kill_group(proc.pid, 1.0)
        if self.user:
            self.user.kill()
        if self.container is not None:
            self.container.remove()

    def remove_user(self, key: str) -> dict:
        """A pool job's end: its user, its files and account go (node users only; else nothing to do)."""
        return self.user.remove_job(key) if self.user else {}

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

    def _clear_for(self, dest: str, path: Path, placed: set[str], inside: bool, at: Path | None = None) -> None:
        """Make room at `path` for what `dest` places. Only what this agent placed (or its own workdir, or an
        empty directory) is removed; anything else there is refused (FileExistsError: 409)."""
        at = at or path
        if at.is_symlink() or at.is_file():
            if str(path) not in placed and not inside:
                raise FileExistsError(f"destination {dest!r}: {path} is on the node already and Sortie did not "
                                      "place it; it is left as it is (choose another destination)")
            at.unlink()
        elif at.is_dir():
            if path == self.workdir or str(path) in placed:
                shutil.rmtree(at)
            elif not any(at.iterdir()):
                at.rmdir()
            else:
                raise FileExistsError(f"destination {dest!r}: {path} is a directory on the node that Sortie did "
                                      "not place there; it is left as it is (choose another destination)")

    def _at(self, path: Path, as_root: bool = False) -> Any:
        """`path` as this thread reaches it (as the node's user, if any)."""
        return self.user.reach(path) if self.user and not as_root else contextlib.nullcontext(path)

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
        if "\0" in target or not os.path.isabs(target):
            raise ValueError(f"links: target must be the absolute path of an existing directory, not {target!r}")
        try:  # not in the zipapp: a cloud node has no directory of this machine's (a local-store bucket) to link to
            nofollow = importlib.import_module("orchestrator.node.nofollow")
        except ImportError:
            raise ValueError("links: a target is only for local-cloud nodes (a local-store MOUNT)") from None
        try:  # issue 28: inside the node's own roots, no symlink followed on the way
            os.close(nofollow.open_under(target, self.link_roots))
        except OSError as exc:
            roots = ", ".join(str(r) for r in self.link_roots)
            raise ValueError(f"links: target {target!r} must be an existing directory inside the node's roots "
                             f"({roots}), reached through no symlink ({exc.strerror})") from None
        path = self.resolve(dest)
        if path in (Path("/"), self.workdir, self.sandbox / "home", self.sandbox / "mounts"):
            raise ValueError(f"links: dest {dest!r} would replace a whole root ({path})")
        if self.user:
            self.user.grant(target)
        placed, inside = self._placed_paths(), contained(path.parent, self.sandbox)
        with self._at(path) as at:
            at.parent.mkdir(parents=True, exist_ok=True)
            staged = at.with_name(f".{at.name}.link-tmp")
            staged.unlink(missing_ok=True)
            staged.symlink_to(target)
            try:
                self._clear_for(dest, path, placed, inside, at)
            except FileExistsError:
                staged.unlink()
                raise
            os.replace(staged, at)
        self._record_placed(path)
        self._add_view(dest, target)
        return path

    def receive_files(self, dest: str, stream: object, length: int, single_file: bool = False) -> Path:
        """Extract a tar stream at `dest`, replacing what was there only once the whole stream arrived."""
        target = self.resolve(dest)
        if target in (Path("/"), self.sandbox / "home", self.sandbox / "mounts"):
            raise ValueError(f"files: dest {dest!r} would replace a whole root ({target})")
        whole_workdir = target == self.workdir
        placed, inside = self._placed_paths(), contained(target.parent, self.sandbox)
        with self._at(target, whole_workdir) as at:
            at.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=at.parent, prefix=".upload-") as tmp:
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
                if whole_workdir and self.user:
                    self.user.give(staged)
                self._clear_for(dest, target, placed, inside, at)
                os.replace(staged, at)
        self._record_placed(target)
        self._add_view(dest)
        return target

    def health(self) -> dict:
        running = sum(1 for s in self.all_status() if s["state"] == "running")
        return {"status": "ok", "node_id": self.node_id, "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started_at, 3), "runs_running": running,
                **({"node_error": error} if (error := self.node_error()) else {})}


