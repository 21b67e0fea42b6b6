"""The state layer (state/) against both of its backends: SQLite (WAL, the default, at <home>/state.db)
and a real PostgreSQL server (a fresh database per test, see tests/support/pg.py). The store is opened the way
Sortie opens it: from the home, with $SORTIE_DB_URL naming PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, func, inspect, select, text
from sqlalchemy.exc import IntegrityError

import orchestrator.config
import state.db
import state.secrets_box
from orchestrator.errors import SortieError
from state.machine import ACTIVE, JobStatus, Phase, TransitionError
from state.models import AttemptRow, Base, EventRow, JobRow, StackRow, TaskRow
from state.store import StateStore
from tests.support.factory import place, set_attempt, set_job, set_task

pytest_plugins = ["tests.support.pg"]

TABLES = {"jobs", "tasks", "attempts", "stacks", "events", "pools", "workers", "pool_events", "bucket_refs",
          "replicas", "leases", "api_users", "api_tokens", "audit_events", "alembic_version"}
PIPELINE = {"name": "train", "is_pipeline": True,
            "tasks": [{"name": "prep", "run": "echo prep", "envs": {"A": "1"}},
                      {"name": "fit", "run": "echo fit", "envs": {"B": "2"}}]}
SINGLE = {"name": "solo", "tasks": [{"name": "only", "run": "true"}]}
SECRET = "s3cr3t-value-7f2c"

# --- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_url(backend: str, sortie_home: Path, monkeypatch: pytest.MonkeyPatch,
           request: pytest.FixtureRequest) -> str:
    """The state DB's URL: SQLite's default under the home, or a fresh PostgreSQL database named by
    $SORTIE_DB_URL (as a user would configure it)."""
    monkeypatch.delenv("SORTIE_DB_URL", raising=False)
    if backend == "sqlite":
        return f"sqlite:///{sortie_home / 'state.db'}"
    url = request.getfixturevalue("pg_database_url")
    monkeypatch.setenv("SORTIE_DB_URL", url)
    return url


@pytest.fixture
def make_store(db_url: str, sortie_home: Path) -> Iterator[Callable[..., StateStore]]:
    """Open a StateStore (each one its own engine unless given one); all are disposed after the test."""
    made: list[StateStore] = []

    def factory(home: Path | None = None, **kwargs: object) -> StateStore:
        store = StateStore(home or sortie_home, **kwargs)
        made.append(store)
        return store

    yield factory
    for store in made:
        store.engine.dispose()


@pytest.fixture
def store(make_store: Callable[..., StateStore], backend: str) -> StateStore:
    store = make_store()
    assert store.engine.dialect.name == backend
    return store


def scalar(store: StateStore, sql: str, **params: object) -> object:
    with store.engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def count(store: StateStore, model: type, *where: object) -> int:
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def submit_one(store: StateStore, pipeline: dict = SINGLE, **kwargs: object) -> int:
    kwargs.setdefault("user", "alice")
    secrets = kwargs.pop("secrets", [{} for _ in pipeline["tasks"]])
    (job_id,) = store.submit(pipeline, secrets, **kwargs)
    return job_id


def run_threads(*targets: Callable[[], object], timeout: float = 60) -> list[object]:
    """Run each target in its own thread; return their results, re-raising the first error."""
    results: list[object] = [None] * len(targets)
    errors: list[BaseException] = []

    def wrap(i: int, target: Callable[[], object]) -> None:
        try:
            results[i] = target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i, t), name=f"t{i}") for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), f"{thread.name} did not finish in {timeout}s"
    if errors:
        raise errors[0]
    return results


# --- migrations ---------------------------------------------------------------------------------------------

def test_fresh_db_gets_every_table_at_head(store: StateStore) -> None:
    assert set(inspect(store.engine).get_table_names()) == TABLES
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [state.db.HEAD_REVISION]
    indexes = {ix["name"] for table in ("jobs", "events") for ix in inspect(store.engine).get_indexes(table)}
    assert {"ix_jobs_status", "ix_events_job_id_id"} <= indexes


def test_migration_matches_the_models(store: StateStore) -> None:
    """The migrations build exactly the tables state/models.py declares (nothing for autogenerate to add)."""
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_opening_again_is_a_no_op(make_store: Callable[..., StateStore], monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_store()
    job_id = submit_one(first)

    def no_upgrade(*_args: object) -> None:
        raise AssertionError("an up-to-date schema was migrated again")

    monkeypatch.setattr(state.db, "_upgrade", no_upgrade)
    again = make_store()
    assert again.engine is not first.engine
    assert again.job(job_id).name == "solo"
    assert scalar(again, "SELECT count(*) FROM alembic_version") == 1


def test_two_threads_open_a_fresh_db_at_once(make_store: Callable[..., StateStore], sortie_home: Path,
                                             backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both find the DB empty before either has migrated (they meet after their first look, and the
    migration is slowed); the lock (a file lock on SQLite, an advisory lock on PostgreSQL) lets one
    migrate and the other find it done."""
    real_upgrade, real_revision = state.db._upgrade, state.db._current_revision
    upgrades: list[str] = []
    looked: set[str] = set()
    both_looked = threading.Barrier(2, timeout=10)

    def revision_then_meet(engine: object) -> str | None:
        found = real_revision(engine)
        me = threading.current_thread().name
        if me not in looked:
            looked.add(me)
            assert found is None
            both_looked.wait()
        return found

    def slow_upgrade(engine: object) -> None:
        upgrades.append(threading.current_thread().name)
        time.sleep(0.3)
        real_upgrade(engine)

    monkeypatch.setattr(state.db, "_current_revision", revision_then_meet)
    monkeypatch.setattr(state.db, "_upgrade", slow_upgrade)
    a, b = run_threads(make_store, make_store)
    assert looked == {"t0", "t1"} and upgrades
    assert a.job(submit_one(b)) is not None
    assert scalar(a, "SELECT count(*) FROM alembic_version") == 1
    assert set(inspect(a.engine).get_table_names()) >= TABLES
    if backend == "sqlite":
        assert len(upgrades) == 1, f"the file lock let both migrate: {upgrades}"
        assert (sortie_home / "state.migrate.lock").exists()


# --- the connection -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_pragmas(store: StateStore, sortie_home: Path) -> None:
    assert store.engine.url.database == str(sortie_home / "state.db")
    with store.engine.connect() as conn:
        pragma = {name: conn.execute(text(f"PRAGMA {name}")).scalar()
                  for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")}
    assert pragma == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 60000, "synchronous": 1}
    assert (sortie_home / "state.db-wal").exists()


def test_foreign_keys_are_enforced(store: StateStore) -> None:
    with pytest.raises(IntegrityError), store.session() as session, session.begin():
        session.add(TaskRow(job_id=424242, task_index=0, status="PENDING", resources=""))
    assert count(store, TaskRow) == 0


# --- submitting ---------------------------------------------------------------------------------------------

def test_submit_ids_increase(store: StateStore) -> None:
    first = store.submit(SINGLE, [{}], user="alice")
    batch = store.submit(SINGLE, [{}], user="alice", count=5)
    last = store.submit(SINGLE, [{}], user="alice")
    ids = first + batch + last
    assert len(ids) == 7 and ids == sorted(set(ids))
    assert [job.id for job in store.list_jobs()] == ids[::-1]


def test_submit_1000_in_one_transaction(store: StateStore) -> None:
    commits: list[object] = []
    event.listen(store.engine, "commit", commits.append)
    ids = store.submit(PIPELINE, [{}, {}], user="bob", count=1000, task_resources=["cpus=1", "cpus=2"])
    assert len(commits) == 1
    assert len(ids) == len(set(ids)) == 1000 and ids == sorted(ids)
    assert count(store, JobRow) == 1000
    assert count(store, TaskRow) == 2000
    assert count(store, EventRow, EventRow.what == "submitted") == 1000
    assert store.count_by_status() == {"PENDING": 1000}


def test_submit_is_all_or_nothing(store: StateStore) -> None:
    """The 3rd job fails (no envs for it): the two before it are not left behind."""
    with pytest.raises(IndexError):
        store.submit(SINGLE, [{}], user="alice", count=3, per_job_envs=[{"I": "0"}, {"I": "1"}])
    assert count(store, JobRow) == count(store, TaskRow) == count(store, EventRow) == 0


def test_submit_makes_tasks_and_a_submitted_event(store: StateStore) -> None:
    ids = store.submit(PIPELINE, [{}, {}], user="carol", count=2, task_resources=["cpus=4", "H100:8"])
    tasks = store.tasks(ids)
    for job_id in ids:
        job = store.job(job_id)
        assert (job.name, job.user, job.status, job.is_pipeline, job.current_task) == \
            ("train", "carol", "PENDING", True, 0)
        assert job.cancel_requested is False and job.started_at is None and job.spec == PIPELINE
        assert [(t.task_index, t.name, t.status, t.resources) for t in tasks[job_id]] == \
            [(0, "prep", "PENDING", "cpus=4"), (1, "fit", "PENDING", "H100:8")]
        assert [(e.what, e.who, e.why, e.task_index) for e in store.events(job_id)] == \
            [("submitted", "carol", "2 task(s)", None)]
    named = store.submit(SINGLE, [{}], user="", name="renamed")
    assert store.job(named[0]).name == "renamed"
    assert store.events(named[0])[0].who == "user"
    assert store.tasks([named[0]])[named[0]][0].resources == ""


def test_secrets_are_stored_encrypted(store: StateStore, sortie_home: Path) -> None:
    secrets = [{"API_TOKEN": SECRET}, {}]
    job_id = submit_one(store, PIPELINE, secrets=secrets)
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).one()
    assert row.secrets_enc and SECRET not in row.secrets_enc
    assert all(SECRET not in str(value) for value in row)
    assert store.secrets(store.job(job_id)) == secrets
    key = sortie_home / "secrets" / "state.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert SECRET not in key.read_text()


def test_no_secrets_no_ciphertext(store: StateStore) -> None:
    job_id = submit_one(store, PIPELINE)
    job = store.job(job_id)
    assert job.secrets_enc is None
    assert store.secrets(job) == [{}, {}]


def test_per_job_envs(store: StateStore) -> None:
    envs = [{"SEED": str(i), "A": f"override-{i}"} for i in range(3)]
    ids = store.submit(PIPELINE, [{}, {}], user="alice", count=3, per_job_envs=envs)
    for i, job_id in enumerate(ids):
        prep, fit = store.job(job_id).spec["tasks"]
        assert prep["envs"] == {"A": f"override-{i}", "SEED": str(i)}
        assert fit["envs"] == {"B": "2", "SEED": str(i), "A": f"override-{i}"}
        assert prep["run"] == "echo prep"
    assert PIPELINE["tasks"][0]["envs"] == {"A": "1"}, "the caller's pipeline was changed"


# --- cancelling and guarded writes --------------------------------------------------------------------------

def test_request_cancel_active_job(store: StateStore) -> None:
    job_id = submit_one(store)
    assert store.request_cancel(job_id, "alice") is True
    assert store.request_cancel(job_id, "bob") is True
    job = store.job(job_id)
    assert job.cancel_requested is True and job.status == "PENDING"
    cancels = [e for e in store.events(job_id) if e.what == "cancel-requested"]
    assert [e.who for e in cancels] == ["alice"]


def test_request_cancel_ended_or_unknown_job(store: StateStore) -> None:
    job_id = submit_one(store)
    set_job(store, job_id, status=JobStatus.SUCCEEDED)
    assert store.request_cancel(job_id, "alice") is False
    assert store.job(job_id).cancel_requested is False
    assert [e.what for e in store.events(job_id)] == ["submitted"]
    assert store.request_cancel(987654, "alice") is False


def test_concurrent_cancels_log_one_event(store: StateStore, backend: str, request: pytest.FixtureRequest) -> None:
    """A second cancel that comes while the first is paused just before its write: together they log
    exactly one event, on every backend."""
    job_id = submit_one(store)
    first_read = threading.Event()
    second_done = threading.Event()

    @event.listens_for(store.engine, "before_cursor_execute")
    def pause_first(_conn, _cursor, statement, *_args: object) -> None:
        if threading.current_thread().name == "t0" and statement.lstrip().upper().startswith(("INSERT", "UPDATE")):
            first_read.set()
            second_done.wait(1.5)  # on PostgreSQL the second is blocked on the row lock: go on

    def second() -> bool:
        assert first_read.wait(10)
        try:
            return store.request_cancel(job_id, "second")
        finally:
            second_done.set()

    assert run_threads(lambda: store.request_cancel(job_id, "first"), second) == [True, True]
    # One conditional UPDATE decides: whichever lands first logs the only event.
    assert len([e for e in store.events(job_id) if e.what == "cancel-requested"]) == 1


# --- attempts and stacks ------------------------------------------------------------------------------------

def test_place_attempt(store: StateStore) -> None:
    job_id = submit_one(store, PIPELINE)
    first = place(store, job_id, "sortie-1-a", num_nodes=2, use_spot=True, instance_type="small",
                  why="local/region-a")
    assert (first.number, first.task_index, first.phase, first.num_nodes, first.use_spot) == \
        (1, 0, "PROVISIONING", 2, True)
    job = store.job(job_id)
    assert job.status == "STARTING" and job.started_at is not None and job.waiting_reason is None
    task = store.tasks([job_id])[job_id][0]
    assert task.status == "STARTING" and task.started_at is not None
    with store.session() as session:
        stack = session.get(StackRow, "sortie-1-a")
    assert (stack.status, stack.job_id, stack.attempt_id, stack.kind, stack.destroyed_at) == \
        ("CREATING", job_id, first.id, "cluster", None)
    placed = store.events(job_id)[-1]
    assert (placed.what, placed.who, placed.task_index, placed.why) == ("placed", "controller", 0, "local/region-a")
    assert placed.data == {"stack": "sortie-1-a", "infra": "local", "region": "region-a", "attempt": 1,
                           "use_spot": True}

    set_attempt(store, first.id, phase=Phase.DONE, outcome="PREEMPTED")
    set_job(store, job_id, status=JobStatus.RECOVERING)
    second = place(store, job_id, "sortie-1-b", region="region-b", num_nodes=2, use_spot=True, why="preempted")
    assert second.number == 2 and second.id != first.id
    again = store.job(job_id)
    assert again.status == "RECOVERING" and again.started_at == job.started_at
    assert store.tasks([job_id])[job_id][0].started_at == task.started_at
    assert store.events(job_id)[-1].why == "preempted"

    set_attempt(store, second.id, phase=Phase.DONE)
    set_job(store, job_id, current_task=1)
    third = place(store, job_id, "sortie-1-c", region=None)
    assert (third.number, third.task_index) == (1, 1)
    assert [a.stack_name for a in store.attempts(job_id)] == ["sortie-1-a", "sortie-1-b", "sortie-1-c"]


def test_open_attempts_skip_done_ones(store: StateStore) -> None:
    one, two, idle = store.submit(SINGLE, [{}], user="alice", count=3)
    a1 = place(store, one, "s-1")
    a2 = place(store, two, "s-2")
    assert {job_id: a.id for job_id, a in store.open_attempts([one, two, idle]).items()} == {one: a1.id, two: a2.id}
    for phase in (Phase.RUNNING, Phase.TEARDOWN):
        set_attempt(store, a1.id, phase=phase)
        assert store.open_attempts([one])[one].phase == phase
    set_attempt(store, a1.id, phase=Phase.DONE)
    assert store.open_attempts([one, two, idle]).keys() == {two}
    assert store.open_attempts([]) == {}


def test_stack_transitions_and_live_stacks(store: StateStore) -> None:
    job_id = submit_one(store)
    for name in ("s-a", "s-b", "s-c"):
        attempt = place(store, job_id, name)
        set_attempt(store, attempt.id, phase=Phase.DONE)
    store.stack_up("s-a")
    store.stack_failed("s-b", "quota exceeded")
    store.stack_destroyed("s-c")
    with store.session() as session:
        stacks = {s.name: s for s in session.scalars(select(StackRow))}
    assert stacks["s-c"].destroyed_at is not None
    assert stacks["s-a"].destroyed_at is None and stacks["s-b"].destroyed_at is None
    assert (stacks["s-b"].status, stacks["s-b"].last_error) == ("FAILED", "quota exceeded")
    assert sorted(s.name for s in store.live_stacks()) == ["s-a", "s-b"]
    with pytest.raises(TransitionError):
        store.stack_up("s-c")  # a destroyed stack does not come back up


# --- reading jobs -------------------------------------------------------------------------------------------

def test_list_jobs_filters_and_order(store: StateStore) -> None:
    a1, a2 = store.submit(SINGLE, [{}], user="alice", name="train", count=2)
    (b1,) = store.submit(SINGLE, [{}], user="bob", name="eval")
    (a3,) = store.submit(SINGLE, [{}], user="alice", name="train")
    set_job(store, a1, status=JobStatus.SUCCEEDED)
    set_job(store, b1, status=JobStatus.RUNNING)
    set_job(store, a3, status=JobStatus.FAILED_SETUP)

    def ids(**kwargs: object) -> list[int]:
        return [job.id for job in store.list_jobs(**kwargs)]

    assert ids() == [a3, b1, a2, a1]
    assert ids(statuses=["SUCCEEDED", "FAILED_SETUP"]) == [a3, a1]
    assert ids(statuses=[JobStatus.RUNNING]) == [b1]
    assert ids(active_only=True) == [b1, a2]
    assert ids(user="alice") == [a3, a2, a1]
    assert ids(user="alice", active_only=True) == [a2]
    assert ids(user="nobody") == []
    assert ids(limit=2) == [a3, b1]
    assert ids(user="alice", limit=1) == [a3]
    assert [job.id for job in store.active_jobs()] == [a2, b1]
    assert store.count_by_status() == {"SUCCEEDED": 1, "PENDING": 1, "RUNNING": 1, "FAILED_SETUP": 1}
    assert [job.id for job in store.jobs_by_name("train")] == [a3, a2, a1]
    assert [job.id for job in store.jobs_by_name("eval")] == [b1]
    assert store.jobs_by_name("missing") == []
    assert store.job(999999) is None
    assert {s.value for s in ACTIVE} >= {"PENDING", "RUNNING"}


def test_events_append_only_and_ordered(store: StateStore) -> None:
    job_id, other = store.submit(PIPELINE, [{}, {}], user="alice", count=2)
    store.add_event(job_id, "note", "first", data={"n": 1, "nested": {"ok": [1, 2]}})
    store.add_event(other, "note", "elsewhere")
    store.add_event(job_id, "note", "second", who="alice", task_index=1)
    before = [(e.id, e.what, e.why, e.at, e.data) for e in store.events(job_id)]
    assert [row[1:3] for row in before] == [("submitted", "2 task(s)"), ("note", "first"), ("note", "second")]
    assert before[1][4] == {"n": 1, "nested": {"ok": [1, 2]}}
    store.add_event(job_id, "note", "third")
    store.request_cancel(job_id, "alice")
    after = store.events(job_id)
    assert [(e.id, e.what, e.why, e.at, e.data) for e in after[:3]] == before
    assert [e.why for e in after[3:]] == ["third", None] and after[-1].what == "cancel-requested"
    assert [e.id for e in after] == sorted(e.id for e in after)
    assert (after[2].who, after[2].task_index) == ("alice", 1)
    assert [e.why for e in store.events(other)] == ["2 task(s)", "elsewhere"]


# --- secrets ------------------------------------------------------------------------------------------------

def test_secrets_box_of_another_home_cannot_decrypt(store: StateStore, make_store: Callable[..., StateStore],
                                                    tmp_path: Path) -> None:
    job_id = submit_one(store, secrets=[{"TOKEN": SECRET}])
    stranger = make_store(tmp_path / "other-home", engine=store.engine)
    with pytest.raises(SortieError) as caught:
        stranger.secrets(stranger.job(job_id))
    message = str(caught.value)
    assert "cannot be decrypted" in message and str(tmp_path / "other-home" / "secrets" / "state.key") in message
    assert "\n" not in message and SECRET not in message
    assert caught.value.__suppress_context__


def test_first_use_of_a_home_by_two_stores_makes_one_key(make_store: Callable[..., StateStore]) -> None:
    """Two stores seal their first secrets at once: both find no key. The first writes its key and seals
    with it; only then does the second write its own (interleaving forced; a lock would just serialize)."""
    first, second = make_store(), make_store()
    both_looked = threading.Barrier(2, timeout=2)
    first_sealed = threading.Event()
    real_generate, real_write = state.secrets_box.Fernet.generate_key, orchestrator.config.write_private

    def generate_key() -> bytes:
        with contextlib.suppress(threading.BrokenBarrierError):  # a fixed box made the other wait: fine
            both_looked.wait()
        return real_generate()

    def write_private(path: Path, content: str) -> None:
        if threading.current_thread().name == "t1":
            first_sealed.wait(2)
        real_write(path, content)

    def submit_first() -> int:
        try:
            return submit_one(first, secrets=[{"TOKEN": "first"}])
        finally:
            first_sealed.set()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(state.secrets_box.Fernet, "generate_key", staticmethod(generate_key))
        patch.setattr(orchestrator.config, "write_private", write_private)
        one, two = run_threads(submit_first, lambda: submit_one(second, secrets=[{"TOKEN": "second"}]))
    reader = make_store()
    assert reader.secrets(reader.job(two)) == [{"TOKEN": "second"}]
    assert reader.secrets(reader.job(one)) == [{"TOKEN": "first"}]


# --- concurrency --------------------------------------------------------------------------------------------

def test_concurrent_submits_from_two_stores(make_store: Callable[..., StateStore]) -> None:
    """Two StateStores (two engines, as two processes would have) on one DB; 4 threads x 50 submits."""
    stores = [make_store(), make_store()]
    assert stores[0].engine is not stores[1].engine
    # Make the key first: two stores' first seals race to create it, which is a test of its own
    # (test_first_use_of_a_home_by_two_stores_makes_one_key, above); this one is about ids.
    stores[0].box  # noqa: B018

    def submitter(n: int) -> Callable[[], list[int]]:
        def run() -> list[int]:
            found: list[int] = []
            for i in range(50):
                found += stores[n % 2].submit(SINGLE, [{"K": f"{n}-{i}"}], user=f"user{n}")
            return found
        return run

    results = run_threads(*(submitter(n) for n in range(4)), timeout=300)
    ids = [job_id for found in results for job_id in found]
    assert len(ids) == len(set(ids)) == 200
    for found in results:
        assert found == sorted(found), "ids of one submitter must increase"
    assert count(stores[0], JobRow) == 200 and count(stores[1], TaskRow) == 200
    assert count(stores[0], EventRow, EventRow.what == "submitted") == 200
    with stores[1].session() as session:
        per_user = dict(session.execute(select(JobRow.user, func.count()).group_by(JobRow.user)).all())
    assert per_user == {f"user{n}": 50 for n in range(4)}
    job = stores[1].job(results[2][7])
    assert stores[1].secrets(job) == [{"K": "2-7"}]


# --- errors -------------------------------------------------------------------------------------------------

BAD_URLS = [
    pytest.param("postgresql://nobody@127.0.0.1:1/x", "postgresql://nobody@127.0.0.1:1/x", id="pg-refused"),
    pytest.param("postgresql://nobody:hunter2@127.0.0.1:1/x", "postgresql://nobody:***@127.0.0.1:1/x",
                 id="pg-refused-password"),
    pytest.param("sqlite:////nonexistent-dir/sub/state.db", "sqlite:////nonexistent-dir/sub/state.db",
                 id="sqlite-no-dir"),
    pytest.param("postgres://nobody:hunter2@127.0.0.1:1/x", "127.0.0.1:1/x", id="postgres-scheme"),
    pytest.param("not a url", "not a url", id="unparseable"),
]


@pytest.mark.parametrize(("url", "shown"), BAD_URLS)
def test_bad_url_is_a_one_line_error(url: str, shown: str, sortie_home: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SORTIE_DB_URL", url)
    with pytest.raises(SortieError) as caught:
        StateStore(sortie_home)
    message = str(caught.value)
    assert message.startswith("state DB ") and shown in message, message
    assert "\n" not in message and "hunter2" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_bad_url_in_the_cli_is_one_line_without_traceback(sortie_home: Path) -> None:
    env = {**os.environ, "SORTIE_HOME": str(sortie_home), "SORTIE_DB_URL": "postgresql://nobody:hunter2@127.0.0.1:1/x",
           "COLUMNS": "500"}
    env.pop("SORTIE_DEBUG", None)
    run = subprocess.run([sys.executable, "-m", "cli.main", "jobs", "queue"], capture_output=True, text=True,
                         env=env, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and "hunter2" not in run.stderr + run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: state DB postgresql://nobody:***@127.0.0.1:1/x"), lines


def test_attempt_rows_roundtrip_json(store: StateStore) -> None:
    job_id = submit_one(store)
    attempt = place(store, job_id, "s-json", region="r", num_nodes=2)
    nodes = [{"name": "n0", "ip": "10.0.0.1", "gpus": {"H100": 8}}, {"name": "n1", "ip": None}]
    set_attempt(store, attempt.id, nodes=nodes, exit_codes=[0, 137], price_per_hour=1.25)
    set_task(store, job_id, 0, exit_codes=[0, 137], recoveries=1)
    (row,) = store.attempts(job_id)
    assert (row.nodes, row.exit_codes, row.price_per_hour) == (nodes, [0, 137], 1.25)
    task = store.tasks([job_id])[job_id][0]
    assert (task.exit_codes, task.recoveries) == ([0, 137], 1)
    assert count(store, AttemptRow) == 1


def test_a_database_at_revision_0001_is_upgraded_in_place(sortie_home: Path) -> None:
    """An existing home from before the recovery columns keeps its jobs and gains the new columns."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, inspect

    url = f"sqlite:///{sortie_home / 'state.db'}"
    engine = create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(state.db.MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("INSERT INTO jobs (id, user, status, is_pipeline, spec, current_task, cancel_requested, "
                          "controller_failures, submitted_at, updated_at) VALUES "
                          "(7, 'u', 'PENDING', 0, '{\"tasks\": []}', 0, 0, 0, 1.0, 1.0)"))
    store = StateStore(sortie_home)
    columns = {c["name"] for c in inspect(store.engine).get_columns("jobs")}
    assert {"backoff_rounds", "waiting_since", "round_started_at", "placement_hint"} <= columns
    job = store.job(7)
    assert job is not None and job.backoff_rounds == 0 and job.status == "PENDING"


def test_paged_and_filtered_jobs_with_totals(store: StateStore) -> None:
    """What the dashboard lists, on both backends: filters, case-insensitive search with literal wildcards."""
    alice = store.submit({"name": "train", "tasks": [{"name": "t", "run": "x"}]}, [{}], user="alice", count=30)
    store.submit({"name": "eval_100%", "tasks": [{"name": "t", "run": "x"}]}, [{}], user="bob", count=12, pool="gpus")
    set_job(store, alice[0], status="SUCCEEDED")
    rows, total = store.page_jobs(limit=10)
    assert total == 42 and [r.id for r in rows] == list(range(42, 32, -1))
    assert store.page_jobs(user="alice", offset=25, limit=10)[1] == 30
    assert len(store.page_jobs(user="alice", offset=25, limit=10)[0]) == 5
    assert store.page_jobs(pool="gpus")[1] == 12
    assert store.page_jobs(statuses=["SUCCEEDED"])[1] == 1
    assert store.page_jobs(search="TRA")[1] == 30
    assert store.page_jobs(search="100%")[1] == 12 and store.page_jobs(search="0%x")[1] == 0
    assert store.page_jobs(search="e_a")[1] == 0  # _ is literal: "eva" does not match
    assert store.page_jobs(search=str(alice[3]))[0][0].id == alice[3]
