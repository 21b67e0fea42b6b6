"""Several controllers, one fleet (issue 14), end to end on a real PostgreSQL: two Sortie homes stand in for two
machines. Each home's config.yaml names the same `state.url` and `pulumi.backend_url` (the engine's DIY backend in
PostgreSQL), a shared local cloud (`local.root`) and shared job logs (`controller.logs_dir`); the second home gets
the first one's `secrets/` (the same Pulumi passphrase and state key). `sortie controller start` in each home starts
one replica, a separate daemon with its own work dirs and PULUMI_HOME.

- Both replicas drive a mix of 22 jobs (single tasks, failures, pipelines, a preemption, a cancel, a pool).
- One replica is SIGKILLed mid-flight; the other takes every job over within the lease, and nothing runs twice.
- One replica is paused (SIGSTOP) past its lease; after SIGCONT it writes nothing more.
- A second controller on one SQLite DB is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from orchestrator.controller import lock
from tests.support.e2e import ROOT, Sortie, write

pytestmark = pytest.mark.e2e
pytest_plugins = ["tests.support.pg"]
LEASE = 8.0
EXPECTED = {"ok": "SUCCEEDED", "fail": "FAILED", "setup_fail": "FAILED_SETUP", "pipeline": "SUCCEEDED",
            "preempt": "SUCCEEDED", "cancel": "CANCELLED", "pool": "SUCCEEDED"}
SCRIPTS = {
    "ok": "run: echo start; sleep {s}; echo end\n",
    "fail": "run: echo start; sleep {s}; exit 3\n",
    "setup_fail": "setup: exit 4\nrun: echo never\n",
    "pipeline": "---\nname: a\nrun: echo start; sleep {s}; echo end\n---\nname: b\nrun: echo start; echo end\n",
    # Runs until it is preempted (its mark made: a recovered run ends at once), not for a fixed time.
    "preempt": "run: echo start; if [ -e {mark} ]; then echo end; exit 0; fi; touch {mark}; "
               "for i in $(seq 3000); do sleep 0.1; done; echo end\n",
    "cancel": "run: echo start; sleep 300; echo end\n",
    "pool": "run: echo start; sleep {s}; echo end\n",
}


@dataclass
class Fleet:
    homes: list[Sortie]
    db_url: str
    backend_url: str
    shared: Path

    def sql(self, query: str, **params: object) -> list[tuple]:
        engine = create_engine(self.db_url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(text(query), params)]
        finally:
            engine.dispose()

    def start(self, index: int) -> int:
        out = self.homes[index].run("controller", "start", timeout=120).stdout
        status = self.homes[index].run("controller", "status").stdout
        assert "running, pid" in status, status
        return int(out.split("pid")[-1].strip())

    def pid(self, index: int) -> int | None:
        try:
            return json.loads((self.homes[index].home / "controller" / "controller.json").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return None

    def launch(self, tmp_path: Path, kind: str, i: int, sleep: int = 2, home: int = 0) -> int:
        script = SCRIPTS[kind].format(s=sleep, mark=tmp_path / f"{kind}-{i}.mark")
        path = write(tmp_path, f"{kind}-{i}.yaml", f"name: {kind}-{i}\n" + script)
        return self.homes[home].launch(path)

    def jobs(self) -> dict[int, tuple[str, str | None]]:
        return {j: (s, o) for j, s, o in self.sql("SELECT id, status, lock_owner FROM jobs")}

    def wait_all(self, ids: list[int], timeout: float = 600) -> dict[int, str]:
        deadline = time.monotonic() + timeout
        while True:
            found = {j: s for j, (s, _) in self.jobs().items() if j in ids}
            if all(s in EXPECTED.values() or s.startswith("FAILED") for s in found.values()):
                return found
            assert time.monotonic() < deadline, f"jobs not done after {timeout}s: {found}"
            time.sleep(1)

    def run_lines(self, job_id: int, word: str) -> int:
        """How many times the job's runs printed `word` (its logs, in the shared logs dir)."""
        return sum(log.read_text(errors="replace").splitlines().count(word)
                   for log in (self.shared / "logs" / str(job_id)).glob("task-*/a*-run-rank*.log"))


@pytest.fixture
def fleet(tmp_path: Path, pg_database_url: str, engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    monkeypatch.delenv("SORTIE_DB_URL", raising=False)
    shared = tmp_path / "shared"
    for sub in ("logs", "local", "buckets"):
        (shared / sub).mkdir(parents=True)
    backend = pg_database_url.replace("postgresql://", "postgres://", 1) + "?table=pulumi_state&sslmode=disable"
    homes = []
    for n in (1, 2):
        home = tmp_path / f"home-{n}"
        home.mkdir()
        (home / "config.yaml").write_text(
            f"state:\n  url: {pg_database_url}\npulumi:\n  backend_url: '{backend}'\n"
            f"controller:\n  id: replica-{n}\n  lease_seconds: {LEASE}\n  tick_seconds: 0.2\n"
            f"  poll_interval_seconds: 0.5\n  grace_misses: 2\n  autostop_idle_minutes: 60\n"
            f"  max_jobs_per_replica: 12\n  logs_dir: {shared / 'logs'}\n"
            f"local:\n  root: {shared / 'local'}\n  regions:\n    - {{name: region-a}}\n    - {{name: region-b}}\n"
            f"storage:\n  local_root: {shared / 'buckets'}\n")
        homes.append(Sortie(home))
    for sortie in homes:
        sortie.env.pop("SORTIE_DB_URL", None)
    subprocess.run([sys.executable, "-c", "from orchestrator.config import passphrase_file; "
                    "from state.secrets_box import SecretsBox; import pathlib, os; "
                    "h = pathlib.Path(os.environ['SORTIE_HOME']); passphrase_file(h); SecretsBox(h)"],
                   env=homes[0].env, cwd=ROOT, check=True)
    shutil.copytree(homes[0].home / "secrets", homes[1].home / "secrets")
    fleet = Fleet(homes, pg_database_url, backend, shared)
    yield fleet
    for sortie in homes:
        sortie.run("controller", "stop", check=False, timeout=300)
    from orchestrator.infra.local_cloud import LocalCloud
    from orchestrator.infra.pulumi_driver import PulumiStackDriver

    driver = PulumiStackDriver(homes[0].home)
    live = [name for (name,) in fleet.sql("SELECT name FROM stacks WHERE status != 'DESTROYED'")]
    stacks = driver.list_stacks()
    locks = [key for (key,) in fleet.sql("SELECT key FROM pulumi_state WHERE key LIKE '%/.pulumi/locks/%.json'")]
    nodes = LocalCloud(shared / "local").leftovers()
    for name in stacks:
        driver.destroy(name)
    assert (live, stacks, locks, nodes) == ([], [], [], []), "left behind"


def _expect_done(fleet: Fleet, plan: dict[int, str], final: dict[int, str]) -> None:
    wrong = {j: (k, final[j]) for j, k in plan.items() if final[j] != EXPECTED[k]}
    assert not wrong, f"jobs in the wrong status: {wrong}"
    for job_id, kind in plan.items():
        placed = fleet.sql("SELECT count(*) FROM events WHERE job_id = :j AND what = 'placed'", j=job_id)[0][0]
        attempts = fleet.sql("SELECT count(*), count(DISTINCT stack_name) FROM attempts WHERE job_id = :j", j=job_id)
        assert placed == attempts[0][0], (job_id, kind, placed, attempts)  # one cluster per attempt
        if kind in ("ok", "pipeline", "pool"):  # no task ran twice
            tasks = 2 if kind == "pipeline" else 1
            assert attempts[0][0] == tasks, (job_id, kind, attempts)
            assert fleet.run_lines(job_id, "start") == tasks and fleet.run_lines(job_id, "end") == tasks, job_id


def test_two_replicas_share_the_work(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start(0)
    fleet.start(1)
    kinds = ["ok"] * 12 + ["fail"] * 3 + ["setup_fail"] * 2 + ["pipeline"] * 2 + ["preempt", "cancel"]
    plan = {fleet.launch(tmp_path, kind, i, sleep=1 + i % 3, home=i % 2): kind for i, kind in enumerate(kinds)}
    pool_yaml = write(tmp_path, "pool.yaml", "pool:\n  workers: 1\nresources:\n  cpus: 1+\nrun: echo ignored\n")
    fleet.homes[0].run("jobs", "pool", "apply", "-y", "-p", "shared-pool", pool_yaml, timeout=180)
    out = fleet.homes[1].run("jobs", "launch", "-y", "-d", "-p", "shared-pool", "--num-jobs", "2",
                             write(tmp_path, "pj.yaml", SCRIPTS["pool"].format(s=1))).stdout
    first = int(out.split("ID ")[1].split("-")[0].split()[0])
    plan.update({first: "pool", first + 1: "pool"})
    victim = next(j for j, k in plan.items() if k == "preempt")
    cancel = next(j for j, k in plan.items() if k == "cancel")
    fleet.homes[0].wait(victim, {"RUNNING"}, timeout=300)
    fleet.homes[1].run("local", "preempt", "--job", str(victim))
    fleet.homes[1].wait(cancel, {"RUNNING"}, timeout=300)
    fleet.homes[0].run("jobs", "cancel", "-y", str(cancel))
    final = fleet.wait_all(list(plan))
    _expect_done(fleet, plan, final)
    assert fleet.sql("SELECT recoveries FROM tasks WHERE job_id = :j", j=victim) == [(1,)]
    drivers = {j: {r for (r,) in fleet.sql("SELECT DISTINCT replica FROM events WHERE job_id = :j AND what IN "
                                           "('placed', 'finished')", j=j)} for j in plan}
    assert all(d and d <= {"replica-1", "replica-2"} for d in drivers.values()), drivers
    both = set().union(*drivers.values())
    assert both == {"replica-1", "replica-2"}, f"only {both} drove jobs"  # max_jobs_per_replica 12 of 23
    status = fleet.homes[0].run("controller", "status").stdout
    assert "replica-1" in status and "replica-2" in status, status
    fleet.homes[0].run("jobs", "pool", "down", "-y", "shared-pool")
    deadline = time.monotonic() + 180
    while fleet.sql("SELECT count(*) FROM pools WHERE status != 'TERMINATED'")[0][0]:
        assert time.monotonic() < deadline, "the pool never went down"
        time.sleep(1)
    print(f"\nreplicas: {len(plan)} jobs; by replica: "
          f"{ {r: sum(1 for d in drivers.values() if r in d) for r in sorted(both)} }")


def _held_by(fleet: Fleet, owner: str) -> list[int]:
    return [j for j, (s, o) in fleet.jobs().items() if o == owner and s not in EXPECTED.values()
            and not s.startswith("FAILED")]


def test_a_killed_replica_s_jobs_are_taken_over(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start(0)
    plan = {fleet.launch(tmp_path, "ok", i, sleep=3 + 2 * i): "ok" for i in range(6)}
    plan.update({fleet.launch(tmp_path, "pipeline", 9, sleep=4): "pipeline"})
    deadline = time.monotonic() + 300
    while True:  # some running, some still being placed or torn down
        phases = {p for (p,) in fleet.sql("SELECT phase FROM attempts WHERE phase != 'DONE'")}
        if "RUNNING" in phases and phases - {"RUNNING"}:
            break
        assert time.monotonic() < deadline, f"never a mix of phases: {phases}"
        time.sleep(0.2)
    fleet.start(1)
    held = _held_by(fleet, "replica-1")
    assert held, "replica-1 held nothing"
    pid = fleet.pid(0)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while _held_by(fleet, "replica-1"):
        assert time.monotonic() - killed_at < LEASE + 15, f"not taken over: {_held_by(fleet, 'replica-1')}"
        time.sleep(0.2)
    takeover = time.monotonic() - killed_at
    final = fleet.wait_all(list(plan))
    _expect_done(fleet, plan, final)
    taken = fleet.sql("SELECT count(DISTINCT job_id) FROM events WHERE what = 'taken-over' AND replica = 'replica-2'")
    assert taken[0][0] >= 1
    print(f"\ntakeover: {len(held)} job(s) of the killed replica taken over in {takeover:.1f}s (lease {LEASE}s)")
    fleet.start(0)  # the fixture stops it cleanly (its home's lock and record)


def test_a_paused_replica_writes_nothing_after_its_lease_is_taken(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start(0)
    plan = {fleet.launch(tmp_path, "ok", i, sleep=12): "ok" for i in range(3)}
    deadline = time.monotonic() + 240
    while len(_held_by(fleet, "replica-1")) < len(plan):
        assert time.monotonic() < deadline, fleet.jobs()
        time.sleep(0.2)
    fleet.homes[0].wait(next(iter(plan)), {"RUNNING"}, timeout=240)
    fleet.start(1)
    pid = fleet.pid(0)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + LEASE + 30
        while _held_by(fleet, "replica-1"):
            assert time.monotonic() < deadline, "replica-2 never took over"
            time.sleep(0.2)
        taken_at = max(at for (at,) in fleet.sql("SELECT at FROM events WHERE what = 'taken-over'"))
    finally:
        os.kill(pid, signal.SIGCONT)
    final = fleet.wait_all(list(plan))
    _expect_done(fleet, plan, final)
    late = fleet.sql("SELECT job_id, what FROM events WHERE replica = 'replica-1' AND at > :t", t=taken_at)
    assert late == [], f"the paused replica wrote after losing its leases: {late}"
    assert not fleet.sql("SELECT id FROM jobs WHERE lock_owner = 'replica-1' AND status IN ('RUNNING', 'PENDING')")


def test_a_second_controller_on_one_sqlite_db_is_refused(tmp_path: Path, engine,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SORTIE_DB_URL", raising=False)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (second / "config.yaml").write_text(f"state:\n  url: sqlite:///{first / 'state.db'}\n")
    one = Sortie(first)
    one.env.pop("SORTIE_DB_URL", None)
    one.run("controller", "start")
    try:
        daemon = [sys.executable, "-m", "orchestrator.controller.daemon"]
        again = subprocess.run(daemon, env=one.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "one controller per Sortie home" in again.stdout, again
        other = {**one.env, "SORTIE_HOME": str(second)}
        shutil.copytree(first / "secrets", second / "secrets")
        refused = subprocess.run(daemon, env=other, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1, refused
        assert "drives the SQLite state DB" in refused.stdout and "PostgreSQL" in refused.stdout, refused.stdout
        assert "running" in one.run("controller", "status").stdout
    finally:
        one.run("controller", "stop")


def test_a_second_home_on_one_sqlite_db_launches_with_exit_0_and_a_deleted_controller_dir_is_no_loss(
        tmp_path: Path, engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 28: a launch from a second home sharing the SQLite DB printed `the controller exited at start` and
    exited 1, though the first home's controller ran the job (a retrying script made duplicates); and with the
    home's `controller/` directory deleted, `controller status` said "not running" while the daemon ran."""
    monkeypatch.delenv("SORTIE_DB_URL", raising=False)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (second / "config.yaml").write_text(f"state:\n  url: sqlite:///{first / 'state.db'}\n")
    one = Sortie(first)
    one.env.pop("SORTIE_DB_URL", None)
    one.run("controller", "start")
    pid = json.loads((first / "controller" / "controller.json").read_text())["pid"]
    try:
        shutil.copytree(first / "secrets", second / "secrets")
        two = Sortie(second)
        two.env.pop("SORTIE_DB_URL", None)
        done = two.run("jobs", "launch", "-y", "-d", "echo from-second", check=False)
        assert done.returncode == 0 and "submitted: ID" in done.stdout, done
        job_id = int(done.stdout.split("submitted: ID")[1].split()[0])
        assert one.wait(job_id)["status"] == "SUCCEEDED"
        assert f"pid {pid}" in two.run("controller", "status").stdout  # the controller that drives its jobs
        shutil.rmtree(first / "controller")  # `rm -rf <home>/controller` under a live daemon
        status = one.run("controller", "status").stdout
        assert "running" in status and "not running" not in status and f"pid {pid}" in status, status
    finally:
        one.run("controller", "stop")
    assert not lock.alive(pid, lock.process_start_time(pid))
    assert "not running" in one.run("controller", "status").stdout


def test_the_shared_backend_lists_collects_and_checks_passphrases(fleet: Fleet, tmp_path: Path, engine) -> None:
    """`stacks ls` and `stacks gc` on the PostgreSQL backend; a replica with another passphrase is refused."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "Pulumi.yaml").write_text("name: sortie\nruntime: yaml\n")
    env = {**os.environ, "PULUMI_HOME": str(tmp_path / "pulumi-home"), "PULUMI_SKIP_UPDATE_CHECK": "true",
           "PULUMI_CONFIG_PASSPHRASE_FILE": str(fleet.homes[0].home / "secrets" / "pulumi-passphrase"),
           "PULUMI_BACKEND_URL": fleet.backend_url, "PULUMI_DIY_BACKEND_PARALLEL": "1"}
    subprocess.run([str(engine.bin_dir / "pulumi"), "stack", "init", "sortie-orphan-1", "--non-interactive"],
                   cwd=project, env=env, check=True, capture_output=True, timeout=60)
    # An update writes the stack's checkpoint with its secrets provider (the passphrase's salt); this one fails at
    # once (no YAML language host here), after writing it.
    subprocess.run([str(engine.bin_dir / "pulumi"), "up", "-y", "--non-interactive"], cwd=project, env=env,
                   capture_output=True, timeout=60)
    listed = json.loads(fleet.homes[1].run("stacks", "ls", "--json").stdout)
    assert listed == [{"stack": "sortie-orphan-1", "owner": None}], listed
    (fleet.homes[1].home / "secrets" / "pulumi-passphrase").write_text("not-the-same-passphrase")
    refused = fleet.homes[1].run("controller", "start", check=False, timeout=120)
    assert refused.returncode != 0, refused.stdout
    said = refused.stdout + refused.stderr
    assert "cannot open stack sortie-orphan-1" in said and "same passphrase" in said, said
    assert "Traceback" not in said
    gc = fleet.homes[0].run("stacks", "gc", "-y").stdout
    assert "destroyed sortie-orphan-1" in gc, gc
    assert json.loads(fleet.homes[0].run("stacks", "ls", "--json").stdout) == []


def test_an_unreachable_or_unusable_backend_is_one_line(tmp_path: Path, pg_database_url: str, engine) -> None:
    from sqlalchemy import create_engine as make

    home = tmp_path / "home"
    home.mkdir()
    sortie = Sortie(home)
    sortie.env.pop("SORTIE_DB_URL", None)
    (home / "config.yaml").write_text("pulumi:\n  backend_url: postgres://nobody@127.0.0.1:1/none?sslmode=disable\n")
    down = sortie.run("stacks", "ls", check=False)
    assert down.returncode == 1 and "Traceback" not in down.stderr, down
    assert "pulumi.backend_url postgres://nobody@127.0.0.1:1/none" in down.stderr and "cannot connect" in down.stderr
    admin = make(pg_database_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # a role that may connect but not create tables
        conn.execute(text("DROP ROLE IF EXISTS sortie_reader"))
        conn.execute(text("CREATE ROLE sortie_reader LOGIN"))
        conn.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
    try:
        db = pg_database_url.rsplit("/", 1)[1]
        (home / "config.yaml").write_text(
            f"pulumi:\n  backend_url: postgres://sortie_reader@127.0.0.1:{pg_database_url.split(':')[-1].split('/')[0]}"
            f"/{db}?table=pulumi_state&sslmode=disable\n")
        denied = sortie.run("stacks", "ls", check=False)
        assert denied.returncode == 1 and "Traceback" not in denied.stderr, denied
        assert "cannot create or use the table pulumi_state" in denied.stderr, denied.stderr
        assert len(denied.stderr.strip().splitlines()) == 1, denied.stderr
    finally:
        with admin.connect() as conn:
            conn.execute(text("DROP ROLE IF EXISTS sortie_reader"))
        admin.dispose()
