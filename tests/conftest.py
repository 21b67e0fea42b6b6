"""Shared fixtures for tests/unit and tests/e2e (helpers live in tests/support). Each test gets its own Sortie
home; end-to-end tests get a real Pulumi driver and fail if a stack, a lock, an agent process or a sandbox
outlives them, and a session-wide check fails the run if a process started in a test sandbox outlives it."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.node.agent_files import SANDBOX_ENV
from tests.support.agents import RunningAgent, leftovers
from tests.support.s3 import s3_env, s3_server  # noqa: F401

# Local nodes run their jobs as their own unprivileged users when Sortie runs as root (issue 17): such a run cannot
# write into pytest's 0700 temp dirs, where many end-to-end tests have their runs leave marks. The suite opts out;
# tests/e2e/test_node_users_e2e.py opts back in and proves the isolation.
os.environ.setdefault("SORTIE_NO_RUN_USERS", "1")


# The tiers (pyproject.toml registers the markers; `make test-unit`, `-integration`, `-e2e` run one each): every
# test under tests/unit is `unit`; under tests/e2e, these modules, which each exercise one real part on its own (a
# database, the agent, the watch hub, the stores, the engine's detached operations) are `integration`, the rest, the
# CLI and controller driving real stacks and nodes end to end, `e2e`.
INTEGRATION = {"test_agent", "test_agent_paths", "test_agent_refusal", "test_agent_view", "test_agent_watch",
               "test_bucket_refs_pg", "test_detached_ops", "test_enospc", "test_leases", "test_node_events",
               "test_node_events_scale", "test_node_mounts", "test_state", "test_stores"}
# `slow`: modules whose tests take a minute or more on 2 cores (`-m "not slow"` leaves them out while editing;
# `make test` runs them). bench/suite.py prints the measured times, and names any test over a minute not here.
# `make test-unit` leaves them out (the crash-point harness and the dashboard's 10,000-job API tests are more than
# half of tests/unit's time); `make test` runs them.
SLOW = {"test_node_events_scale", "test_kubernetes_e2e", "test_kubernetes_node_e2e", "test_replicas_e2e",
        "test_chaos_e2e", "test_skypilot_yamls_e2e", "test_crash_points", "test_dashboard_api"}
TESTS = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    from tests.support import timing

    timing.register(config)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.path)).resolve()
        if TESTS / "unit" in path.parents:
            item.add_marker(pytest.mark.unit)
        elif TESTS / "e2e" in path.parents:
            item.add_marker(pytest.mark.integration if path.stem in INTEGRATION else pytest.mark.e2e)
        if path.stem in SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def sortie_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "sortie-home"
    home.mkdir()
    monkeypatch.setenv("SORTIE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def engine():
    """The real engine; installed (built from the Go module proxy if need be) when missing."""
    from orchestrator.infra.engine import install_engine

    info, _how = install_engine()
    return info


@pytest.fixture
def make_driver(sortie_home: Path, engine) -> Iterator[Callable[..., object]]:
    """Build a PulumiStackDriver for this test's home (optionally with a config.yaml first); after
    the test, fail if anything it made is left."""
    from orchestrator.infra.pulumi_driver import PulumiStackDriver

    made: list[PulumiStackDriver] = []

    def factory(config_yaml: str | None = None, **kwargs: object) -> PulumiStackDriver:
        if config_yaml is not None:
            (sortie_home / "config.yaml").write_text(config_yaml)
        driver = PulumiStackDriver(sortie_home, **kwargs)
        made.append(driver)
        return driver

    yield factory
    if made:
        driver = made[-1]
        left = leftovers(driver, sortie_home)
        if left:
            for name in driver.list_stacks():
                driver.destroy(name)
            pytest.fail(f"left behind after the test: {left}")


@pytest.fixture
def driver(make_driver):
    return make_driver()


def _sandbox_processes(under: str) -> list[int]:
    pids = []
    prefix = f"{SANDBOX_ENV}={under}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(item.startswith(prefix) for item in env):
                pids.append(int(entry.name))
    return pids


@pytest.fixture(autouse=True)
def own_etc(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Issue 17: node users get /etc/passwd and /etc/group entries (orchestrator/node/node_accounts.py). In this
    process (unit tests calling node_user), those files are a directory of the test's; agents started as processes
    (the e2e tests that opt back in to node users) write the machine's."""
    from orchestrator.node import node_accounts

    etc = tmp_path_factory.mktemp("etc")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\n")
    monkeypatch.setattr(node_accounts, "ETC", etc)
    return etc


@pytest.fixture(scope="session", autouse=True)
def no_stray_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Session-wide: no process started inside any test's sandbox may outlive the run."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    stray = _sandbox_processes(base)
    for pid in stray:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not stray, f"processes started in test sandboxes outlived the run: {stray}"


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., RunningAgent]]:
    started: list[RunningAgent] = []

    def factory(sandbox: Path | None = None, token: str = "test-token-123", confine: bool = False,
                env: dict[str, str] | None = None, link_roots: list[Path] | None = None,
                log: Path | None = None) -> RunningAgent:
        agent = RunningAgent(sandbox or tmp_path / "sandbox", token, confine, env, link_roots, log)
        started.append(agent)
        return agent

    yield factory
    for agent in started:
        agent.stop()


@pytest.fixture
def sortie_cli(sortie_home: Path, make_driver) -> Iterator[Callable[..., object]]:
    """The real CLI on this test's home (optionally with a config.yaml first). After the test: the
    controller is stopped, every stack row must be destroyed, and `make_driver`'s leak check runs."""
    from tests.support.e2e import Sortie

    made: list[Sortie] = []

    def factory(config_yaml: str | None = None) -> Sortie:
        if config_yaml is not None:
            (sortie_home / "config.yaml").write_text(config_yaml)
        made.append(Sortie(sortie_home))
        return made[-1]

    yield factory
    if made:
        made[0].run("controller", "stop", check=False, timeout=180)
        from state.store import StateStore

        live = [s.name for s in StateStore(sortie_home).live_stacks()]
        make_driver()  # the leak check of `make_driver` runs at its own teardown, after this one
        assert live == [], f"stacks not destroyed: {live}"
