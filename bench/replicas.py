"""Benchmark: several controller replicas on one PostgreSQL (issue 14).

    .venv/bin/python bench/replicas.py [--jobs 12] [--rounds 3]

Prints, on the real engine and the local cloud, with Sortie's state and Pulumi's both in PostgreSQL:
- jobs a minute (launch of the first to the end of the last, `run: echo`) with one replica, then with two;
- the takeover time after a SIGKILL: from the kill until the other replica holds every job of the dead one
  (median of `--rounds`), with `controller.lease_seconds` 8.

PostgreSQL: $SORTIE_TEST_PG_URL, else the throwaway server `.ci/postgres.sh` starts. Each run gets its own
database, dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LEASE = 8.0


def server_url() -> str:
    url = os.environ.get("SORTIE_TEST_PG_URL")
    if url:
        return url
    run = subprocess.run([str(ROOT / ".ci" / "postgres.sh")], capture_output=True, text=True, check=True)
    return run.stdout.strip().splitlines()[-1]


class Fleet:
    """Two Sortie homes on one fresh database, as two machines would share it."""

    def __init__(self, server: str) -> None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url
        from sqlalchemy.pool import NullPool

        self.admin = create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        self.db = f"sortie_bench_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db}"'))
        self.url = make_url(server).set(database=self.db).render_as_string(hide_password=False)
        self.engine = create_engine(self.url, poolclass=NullPool)
        self.base = Path(tempfile.mkdtemp(prefix="sortie-bench-replicas-"))
        backend = self.url.replace("postgresql://", "postgres://", 1) + "?table=pulumi_state&sslmode=disable"
        shared = self.base / "shared"
        self.homes = []
        for n in (1, 2):
            home = self.base / f"home-{n}"
            home.mkdir(parents=True)
            (home / "config.yaml").write_text(
                f"state:\n  url: {self.url}\npulumi:\n  backend_url: '{backend}'\ncontroller:\n  id: replica-{n}\n"
                f"  lease_seconds: {LEASE}\n  tick_seconds: 0.2\n  poll_interval_seconds: 0.5\n"
                f"  autostop_idle_minutes: 60\n  logs_dir: {shared / 'logs'}\nlocal:\n  root: {shared / 'local'}\n"
                f"storage:\n  local_root: {shared / 'buckets'}\n")
            self.homes.append(home)
        self.cli(0, "-c", "from orchestrator.config import passphrase_file; from state.secrets_box import SecretsBox;"
                 " import os, pathlib; h = pathlib.Path(os.environ['SORTIE_HOME']); passphrase_file(h); SecretsBox(h)",
                 module=False)
        shutil.copytree(self.homes[0] / "secrets", self.homes[1] / "secrets")

    def cli(self, index: int, *args: str, module: bool = True) -> str:
        env = {k: v for k, v in os.environ.items() if k != "SORTIE_DB_URL"}
        env["SORTIE_HOME"] = str(self.homes[index])
        command = [sys.executable, "-m", "cli.main", *args] if module else [sys.executable, *args]
        return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=True,
                              timeout=600).stdout

    def sql(self, query: str) -> list[tuple]:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query))]

    def launch(self, index: int, run: str, count: int) -> None:
        path = self.base / f"job-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(f"run: {run}\n")
        for _ in range(count):  # as users do: one `jobs launch` each
            self.cli(index, "jobs", "launch", "-y", "-d", str(path))

    def active(self) -> list[tuple[int, str | None]]:
        return self.sql("SELECT id, lock_owner FROM jobs WHERE status IN "
                        "('PENDING', 'STARTING', 'RUNNING', 'RECOVERING', 'CANCELLING')")

    def wait_done(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while self.active():
            if time.monotonic() > deadline:
                raise RuntimeError(f"jobs not done: {self.active()}")
            time.sleep(0.5)

    def pid(self, index: int) -> int:
        return json.loads((self.homes[index] / "controller" / "controller.json").read_text())["pid"]

    def close(self) -> None:
        from sqlalchemy import text

        for index in (0, 1):
            subprocess.run([sys.executable, "-m", "cli.main", "controller", "stop"], cwd=ROOT, capture_output=True,
                           env={**os.environ, "SORTIE_HOME": str(self.homes[index])}, timeout=600)
        self.engine.dispose()
        with self.admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d "
                              "AND pid <> pg_backend_pid()"), {"d": self.db})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db}"'))
        shutil.rmtree(self.base, ignore_errors=True)


def throughput(server: str, replicas: int, jobs: int) -> float:
    fleet = Fleet(server)
    try:
        for index in range(replicas):
            fleet.cli(index, "controller", "start")
        t0 = time.monotonic()
        fleet.launch(0, "echo hi", jobs)
        fleet.wait_done()
        elapsed = time.monotonic() - t0
        ok = fleet.sql("SELECT count(*) FROM jobs WHERE status = 'SUCCEEDED'")[0][0]
        by = dict(fleet.sql("SELECT replica, count(DISTINCT job_id) FROM events WHERE what = 'placed' "
                            "GROUP BY replica"))
        print(f"  {replicas} replica(s): {jobs} jobs ({ok} SUCCEEDED) in {elapsed:.1f}s = "
              f"{jobs * 60 / elapsed:.1f} jobs/min; placed by {by}", flush=True)
        return jobs * 60 / elapsed
    finally:
        fleet.close()


def takeover(server: str) -> float:
    fleet = Fleet(server)
    try:
        fleet.cli(0, "controller", "start")
        fleet.launch(0, "echo start; sleep 40", 2)
        while len([o for _, o in fleet.active() if o == "replica-1"]) < 2:
            time.sleep(0.2)
        while fleet.sql("SELECT count(*) FROM attempts WHERE phase = 'RUNNING'")[0][0] < 2:
            time.sleep(0.2)
        fleet.cli(1, "controller", "start")
        os.kill(fleet.pid(0), signal.SIGKILL)
        t0 = time.monotonic()
        while any(o == "replica-1" for _, o in fleet.active()):
            time.sleep(0.1)
        took = time.monotonic() - t0
        print(f"  takeover of 2 RUNNING jobs after a SIGKILL: {took:.1f}s (lease {LEASE:.0f}s)", flush=True)
        fleet.wait_done()
        return took
    finally:
        fleet.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = server_url()
    print(f"replicas: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    one = throughput(server, 1, args.jobs)
    two = throughput(server, 2, args.jobs)
    print(f"jobs a minute: 1 replica {one:.1f}, 2 replicas {two:.1f} (ratio {two / one:.2f})")
    times = [takeover(server) for _ in range(args.rounds)]
    print(f"takeover after SIGKILL: median {statistics.median(times):.1f}s of {args.rounds} "
          f"({', '.join(f'{t:.1f}' for t in times)}), lease {LEASE:.0f}s")


if __name__ == "__main__":
    main()
