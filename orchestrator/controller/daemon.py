"""The controller daemon: one per Sortie home, started by the first `jobs launch`.

One instance is guaranteed by an exclusive lock on `<home>/controller/controller.lock`, held for the
daemon's life (the kernel drops it when the process dies, however it dies). `controller.json`
beside it says who holds it. APScheduler 3.x (in-memory job store) is only the ticker.

`Controller` composes the reconcilers over one `ControllerContext`: pools and their workers first (so a job
finds a worker made READY this tick), then jobs, then the stacks janitor and the storage janitor. Each loads
its rows, decides with pure functions and applies through the named transitions of `state`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import __version__
from orchestrator.config import SortieConfig, load_config, sortie_home
from orchestrator.errors import SortieError

if TYPE_CHECKING:
    from orchestrator.controller.context import Connect, ControllerContext
    from orchestrator.infra.stack_driver import StackDriver
    from state.leases import Leases
    from state.store import StateStore

START_TIMEOUT = 90.0  # start-up checks included: the state key, the backend, the passphrase, stale locks


def _dir(home: Path) -> Path:
    path = home / "controller"
    path.mkdir(parents=True, exist_ok=True)
    return path


def controller_log_path(home: Path) -> Path:
    return home / "logs" / "controller.log"


@dataclass(frozen=True)
class ControllerInfo:
    running: bool
    pid: int | None = None
    started_at: float | None = None
    version: str | None = None

    @property
    def uptime(self) -> float:
        return time.time() - self.started_at if self.started_at else 0.0


def controller_info(home: Path | None = None) -> ControllerInfo:
    """Whether a live controller holds this home (by flock, pid and process start time: `lock.holder`). With the
    home's `controller/` directory deleted from under it (issue 28), the daemon is still found: by its lock beside a
    SQLite state DB, else by this home's replica row naming a live daemon process on this host."""
    from orchestrator.controller import lock

    home = home or sortie_home()
    found = lock.holder(_dir(home))
    if found is None:
        shared = _sqlite_lock_dir(home, load_config(home))
        found = lock.holder(shared) if shared is not None and shared.is_dir() else None
    if found is None:
        return _replica_daemon(home)
    return ControllerInfo(True, found.pid or None, found.started_at or None, found.version)


def _is_daemon(pid: int) -> bool:
    try:
        return b"orchestrator.controller.daemon" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _replica_daemon(home: Path) -> ControllerInfo:
    """This home's replica, when its row says it runs here and its pid is a live controller daemon."""
    import socket

    from state.leases import replicas
    from state.store import StateStore

    config = load_config(home)
    from state.db import database_url

    if database_url(home, config).startswith("sqlite"):
        return ControllerInfo(False)  # on SQLite the lock beside the DB already said (and nothing is opened here)
    me = config.controller.replica_id(home)
    store = StateStore(home, config)
    try:
        rows = [r for r in replicas(store) if r.id == me and r.stopped_at is None]
    finally:
        store.engine.dispose()
    for row in rows:
        if row.host == socket.gethostname() and row.pid != os.getpid() and _is_daemon(row.pid):
            return ControllerInfo(True, row.pid, row.started_at, row.version)
    return ControllerInfo(False)


def check_controller(config: SortieConfig) -> None:
    """What a submit checks before it writes anything: a controller on a cloud VM must be up (it cannot be started
    from here); a local one is started afterwards by `ensure_controller`."""
    if config.jobs.controller.infra != "local":
        from orchestrator.deploy.remote import check_remote

        check_remote(config)


def ensure_controller(home: Path | None = None) -> ControllerInfo:
    """Start the controller if it is not running; wait until it holds its lock."""
    home = home or sortie_home()
    from orchestrator.config import load_config

    config = load_config(home)
    if config.jobs.controller.infra != "local":  # the controller is a VM of its own: it must be up, not started
        check_controller(config)
        return ControllerInfo(running=True)
    info = controller_info(home)
    if info.running:
        if info.pid and _is_daemon(info.pid):  # issue 15: something to do: the controller ticks now, not in a second
            with contextlib.suppress(OSError):
                os.kill(info.pid, signal.SIGUSR1)
        return info
    log = controller_log_path(home)
    log.parent.mkdir(parents=True, exist_ok=True)
    began = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.controller.daemon"],
                                env={**os.environ, "SORTIE_HOME": str(home)}, stdin=subprocess.DEVNULL, umask=0o077,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    from orchestrator.controller import lock

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        info = controller_info(home)
        # a pid only once its record is written and names a live process; the one we started is waited for until
        # its start-up checks (state key, passphrase, replica id) passed, so a refusal is said here, not lost
        if info.running and info.pid and (info.pid != proc.pid or lock.read_record(_dir(home)).get("ready")):
            return info
        if proc.poll() is not None:
            info = controller_info(home)
            if info.running:  # another launch started it first
                return info
            raise SortieError(_start_failure(home, log, began, proc.returncode))
        time.sleep(0.05)
    raise SortieError(f"the controller did not start within {START_TIMEOUT:.0f}s (log: {log})")


def _start_failure(home: Path, log: Path, began: int, code: int) -> str:
    """One line for a controller that exited at start (issue 28: never a traceback's last line): a full home, else
    the daemon's own `error:` line from this start, else where its log is."""
    from orchestrator.disk import home_space_problem

    full = home_space_problem(home)
    if full is not None:
        return f"the controller cannot start: {full} (log: {log})"
    try:
        with log.open("rb") as fh:
            fh.seek(began)
            said = [line for line in fh.read(1 << 20).decode(errors="replace").splitlines()
                    if line.startswith("error: ")]
    except OSError:
        said = []
    if said:
        return f"the controller exited at start with {code}: {said[-1].removeprefix('error: ')} (log: {log})"
    return f"the controller exited at start with {code}; its log says why: {log}"


def stop_controller(home: Path | None = None, timeout: float = 600.0) -> ControllerInfo:
    """Ask the controller to stop (SIGTERM) and wait until its process has exited: its in-flight stack operations
    finish first, and it holds its lock until then. Jobs stay in the state; the next start resumes them."""
    from orchestrator.controller import lock

    home = home or sortie_home()
    info = controller_info(home)
    if not info.running or not info.pid:
        return info
    proc_start = lock.process_start_time(info.pid)
    os.kill(info.pid, signal.SIGTERM)
    if proc_start is not None and not lock.wait_for_exit(info.pid, proc_start, timeout):
        raise SortieError(f"the controller (pid {info.pid}) did not exit within {timeout:.0f}s (it finishes its "
                          "stack operations first); run `sortie controller stop` again to keep waiting")
    return info


class Controller:
    """Every reconciler of one controller, ticked in order."""

    def __init__(self, store: StateStore, driver: StackDriver, config: SortieConfig, home: Path,
                 wake: Callable[[], None] | None = None, *, inline: bool = False,
                 connect: Connect | None = None, leases: Leases | None = None) -> None:
        from orchestrator.controller.context import ControllerContext, connect_agent
        from orchestrator.controller.janitors import StackJanitor, StorageJanitor
        from orchestrator.controller.jobs import JobReconciler
        from orchestrator.controller.pools import PoolReconciler

        self.ctx: ControllerContext = ControllerContext.create(store, driver, config, home, wake, inline=inline,
                                                               connect=connect or connect_agent, leases=leases)
        self.pools = PoolReconciler(self.ctx)
        self.jobs = JobReconciler(self.ctx, self.pools)
        self.stack_janitor = StackJanitor(self.ctx)
        self.storage_janitor = StorageJanitor(self.ctx)

    def tick(self) -> int:
        """One pass of every reconciler. Returns how many pools and jobs are in progress (the controller does not
        stop itself while a pool exists: its workers need watching); with leases, in the whole shared state, so
        that no replica stops while another's work could come to it."""
        if self.ctx.leases is not None:
            self.ctx.leases.renew()
        active = self.pools.tick() + self.jobs.tick()
        self.stack_janitor.tick()
        self.storage_janitor.tick()
        if self.ctx.leases is not None:
            active = self.ctx.store.work_in_progress()
        return active

    def busy(self) -> bool:
        return self.ctx.busy()

    def shutdown(self) -> None:
        self.ctx.shutdown()


def _sqlite_lock_dir(home: Path, config: SortieConfig) -> Path | None:
    """SQLite allows one controller per state DB, whichever homes name it: a lock beside the DB file."""
    from state.db import database_url

    url = database_url(home, config)
    if not url.startswith("sqlite:///"):
        return None
    db = Path(url.removeprefix("sqlite:///")).expanduser().resolve()
    return db.parent / f".{db.name}.controller"


def _refuse(message: str) -> None:
    print(f"error: {message}", flush=True)
    sys.exit(1)


def run_daemon(home: Path) -> None:
    """The daemon's main: hold the lock, register as a replica, tick until stopped or idle past the autostop time."""
    import socket

    from apscheduler.schedulers.background import BackgroundScheduler

    from orchestrator.controller import lock
    from orchestrator.infra.pulumi_driver import PulumiStackDriver
    from state.leases import Leases, ReplicaConflict
    from state.store import StateStore

    started = time.time()
    config = load_config(home)
    try:  # issue 17: held until this process exits; controller.json is written before the lock counts as taken
        lock.acquire(_dir(home), __version__, started)
    except lock.LockHeld as held:
        _refuse(f"{held}: one controller per Sortie home (`sortie controller status`)")
    shared = _sqlite_lock_dir(home, config)
    if shared is not None:  # issue 14: a second home on the same SQLite DB is another controller on it
        try:
            lock.acquire(shared, __version__, started)
        except lock.LockHeld as held:
            _refuse(f"another controller (pid {held.pid}) drives the SQLite state DB of this home; SQLite allows one "
                    "controller: several replicas need PostgreSQL (state.url)")
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # issue 15: a wake before the ticker exists is a no-op
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    log = logging.getLogger("sortie.controller")
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # not a line per tick, nor per coalesced wake
    store = StateStore(home, config)
    from state.key_check import state_key_problem

    key_trouble = state_key_problem(store)  # issue 17: said once at start, not as one failure per job
    if key_trouble is not None:
        log.error("%s", key_trouble)
        raise SortieError(key_trouble)
    driver = PulumiStackDriver(home, config, fork_server=True)  # issue 26: workers forked, the SDK imported once
    phrase_trouble = driver.passphrase_problem()  # issue 14: a replica that could not open the shared stacks
    if phrase_trouble is not None:
        log.error("%s", phrase_trouble)
        raise SortieError(phrase_trouble)
    replica = config.controller.replica_id(home)
    leases = Leases(store, replica, config.controller.lease_seconds, config.controller.max_jobs_per_replica)
    try:
        leases.register(host=socket.gethostname(), pid=os.getpid(), home=str(home), version=__version__,
                        pid_alive=lambda pid: lock.process_start_time(pid) is not None)
    except ReplicaConflict as exc:
        _refuse(str(exc))
    store.lease_owner = replica  # from here on, every transition of this process is guarded by its leases
    from state.leases import live_hosts

    unlocked = driver.cancel_stale_locks(live_hosts(store) - {socket.gethostname()})
    if unlocked:
        log.info("cancelled stale locks of crashed operations on: %s", ", ".join(unlocked))
    scheduler = BackgroundScheduler()
    woken = threading.Event()

    def wake() -> None:
        """An operation finished: tick now rather than at the next interval (a tick already running
        sees `woken` and makes one more pass)."""
        woken.set()
        with contextlib.suppress(Exception):  # the scheduler may be shutting down
            scheduler.modify_job("tick", next_run_time=datetime.now())

    controller = Controller(store, driver, config, home, wake, leases=leases)
    stop = threading.Event()
    idle_since = [time.monotonic()]

    def tick() -> None:
        active = 0
        for _ in range(10):  # passes while operations keep finishing or transitions keep landing, bounded
            woken.clear()
            moved = store.transitions_committed
            try:
                active = controller.tick()
            except Exception:
                log.exception("tick failed")
                return
            if not woken.is_set() and store.transitions_committed == moved:
                break
        if active or controller.busy():
            idle_since[0] = time.monotonic()
        elif time.monotonic() - idle_since[0] > config.controller.autostop_idle_minutes * 60:
            log.info("no job in progress for %.1f minutes: stopping", config.controller.autostop_idle_minutes)
            stop.set()

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=wake, daemon=True).start())  # issue 15
    def heartbeat() -> None:
        """Issue 14: leases are renewed while this process lives, also during a tick that runs long (a loaded
        machine, a slow database); a paused or dead replica stops renewing and its work is taken over."""
        while not stop.wait(config.controller.lease_seconds / 3):
            try:
                leases.renew(force=True)
            except Exception:
                log.exception("lease renewal failed")

    threading.Thread(target=heartbeat, name="lease-heartbeat", daemon=True).start()
    scheduler.add_job(tick, "interval", id="tick", seconds=config.controller.tick_seconds, max_instances=1,
                      coalesce=True, next_run_time=datetime.now())
    scheduler.start()
    lock.mark_ready(_dir(home))  # start-up checks passed: `ensure_controller` stops waiting
    log.info("controller %s started (pid %s) on %s as replica %s", __version__, os.getpid(), home, replica)
    stop.wait()
    scheduler.shutdown(wait=True)
    controller.shutdown()
    driver.close()  # the fork server; the operations it forked go on
    leases.release()  # issue 14: another replica takes the work at once, not after the lease runs out
    log.info("controller stopped; stack operations in flight go on detached, for the next controller to adopt")


def main() -> None:
    os.umask(0o077)  # issue 17: logs, stack state and sandboxes are this user's alone (also under systemd)
    try:
        run_daemon(sortie_home())
    except SortieError as exc:
        print(f"error: {exc}", flush=True)
        sys.exit(1)
    except OSError as exc:
        from orchestrator.disk import is_no_space

        if not is_no_space(exc):
            raise
        with contextlib.suppress(OSError):  # the log is on that disk too: whoever started us says it
            print(f"error: no space left to write {exc.filename or 'the home'}; free some space", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
