"""Infra, a fork server for stack workers (issue 26): the Pulumi SDK imported once, each operation a fresh fork.

A stack worker's Python start and imports (the SDK, gRPC, Sortie's programs) cost about 0.5 CPU s per operation,
a third of what a local `up` or `destroy` costs Sortie's side. The controller's driver starts one server
(`python -m orchestrator.infra.fork_server <socket>`, in a session of its own, with the workers' environment) that
imports all that and then only forks: a fork is a fresh process as far as the SDK's process-global state goes
(the server never runs a program), at the cost of a `fork()`.

Each fork is what `python -m orchestrator.infra._stack_worker` was: a session of its own (so a controller killed
meanwhile leaves it running, and the next adopts it by pid and start time, see `detached_ops`), the request on
stdin, the worker's stderr in `worker.log`, the outcome in `result.pickle`. The server answers each request with
the fork's pid and start time, taken before the fork may go on, so a fork that ends at once is never mistaken.
The server reaps its forks (a second at most after each ends; a fork that ended reads as gone at once: a zombie is
not alive to `process_start`), so their CPU counts in the server's and the controller's accounting. It exits when
the process that started it is gone; its forks do not (they are in sessions of their own).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

PRELOAD = ("pulumi.automation", "pulumi.dynamic", "orchestrator.infra._stack_worker", "orchestrator.infra._lean_stack",
           "stacks.cluster_program", "stacks.builders.local")
MAX_REQUEST = 4096  # a folder path


def _start_time(pid: int) -> int | None:
    from orchestrator.infra.detached_ops import process_start

    return process_start(pid)


def _child(folder: Path, go: int) -> None:
    """In the fork: wait for the server's go, become the worker of `folder`, never return."""
    code = 1
    try:
        os.read(go, 1)
        os.close(go)
        os.setsid()
        with (folder / "request.pickle").open("rb") as stdin, (folder / "worker.log").open("ab") as errors:
            os.dup2(stdin.fileno(), 0)
            os.dup2(errors.fileno(), 2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the worker reads it whole
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        sys.argv = [sys.argv[0], str(folder / "result.pickle")]
        from orchestrator.infra import _stack_worker

        _stack_worker.main()
        code = 0
    except BaseException as exc:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"stack worker (forked) failed: {type(exc).__name__}: {exc}\n")
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def _serve_one(conn: socket.socket, listener: socket.socket) -> None:
    with conn:
        data = conn.recv(MAX_REQUEST)
        folder = Path(data.decode().strip())
        if not folder.is_dir():
            conn.sendall(b"error no such folder\n")
            return
        go_read, go_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(go_write)
            listener.close()
            conn.close()
            _child(folder, go_read)
        os.close(go_read)
        start = _start_time(pid)  # the fork waits on `go`: it is alive here
        os.write(go_write, b"g")
        os.close(go_write)
        conn.sendall(f"{pid} {start}\n".encode())


def _reap() -> None:
    """Wait for the forks that ended (their CPU then counts in this server's, and so in the controller's)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(path: str) -> None:
    for module in PRELOAD:
        with contextlib.suppress(Exception):
            __import__(module)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    listener.settimeout(1.0)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while os.getppid() == parent:  # the controller that started it is gone: so is the server
        _reap()
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(10.0)
        with contextlib.suppress(OSError):
            _serve_one(conn, listener)
    with contextlib.suppress(OSError):
        os.unlink(path)
        os.rmdir(os.path.dirname(path))


class ForkServer:
    """The controller's side: start the server once, ask it for a worker per operation."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.socket_path = Path("/nonexistent")  # a fresh private directory per server (a socket path is short)
        self.env = env
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self.socket_path = Path(tempfile.mkdtemp(prefix="sortie-forks-")) / "socket"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as errors:
            self._proc = subprocess.Popen([sys.executable, "-m", "orchestrator.infra.fork_server",
                                           str(self.socket_path)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=errors, env=self.env, start_new_session=True, close_fds=True)
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != b"ready":
            self._proc.wait()
            self._proc = None
            raise OSError(f"the stack worker fork server did not start (see {self.log_path})")

    def spawn(self, folder: Path) -> tuple[int, int]:
        """A worker for the operation in `folder`: (pid, start time)."""
        with self._lock:
            self._ensure()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(30.0)
            conn.connect(str(self.socket_path))
            conn.sendall(f"{folder}\n".encode())
            answer = conn.makefile("rb").readline().decode().split()
        if len(answer) != 2 or not answer[0].isdigit() or not answer[1].isdigit():
            raise OSError(f"the stack worker fork server refused {folder}: {' '.join(answer)}")
        return int(answer[0]), int(answer[1])

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
            if self.socket_path.parent.name.startswith("sortie-forks-"):  # a server stopped by a signal left it
                shutil.rmtree(self.socket_path.parent, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1])
