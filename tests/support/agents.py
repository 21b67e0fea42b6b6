"""Helpers behind the shared fixtures of tests/conftest.py: an agent process on a sandbox (`RunningAgent`, the
`start_agent` fixture) and what an operation could leave behind in a Sortie home (`leftovers`, the leak check)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from orchestrator.infra.agent_bundle import local_agent_command, local_agent_env
from orchestrator.node import agent as agent_module


def leftovers(driver, home: Path) -> list[str]:
    """Everything an operation could leave behind in a Sortie home."""
    from orchestrator.infra.local_cloud import LocalCloud

    found = [f"stack {s}" for s in driver.list_stacks()]
    locks = home / "pulumi-backend" / ".pulumi" / "locks"
    if locks.exists():
        found += [f"lock {p.relative_to(locks)}" for p in locks.rglob("*.json")]
    stacks_dir = home / "stacks"
    if stacks_dir.exists():
        found += [f"work dir {p.name}" for p in stacks_dir.iterdir() if p.name != "_workspace"]
    found += LocalCloud(home / "local").leftovers()
    return found


class RunningAgent:
    """An agent process started directly on a sandbox (no engine)."""

    def __init__(self, sandbox: Path, token: str, confine: bool = False, env: dict[str, str] | None = None,
                 link_roots: list[Path] | None = None, log: Path | None = None) -> None:
        """`log`: where the agent's output goes (as the local cloud's `agent.log`); nowhere by default."""
        self.sandbox = sandbox
        self.token = token
        env = {**os.environ, **(env or {}), "SORTIE_AGENT_TOKEN": token, agent_module.SANDBOX_ENV: str(sandbox)}
        sandbox.mkdir(parents=True, exist_ok=True)
        (sandbox / "agent.json").unlink(missing_ok=True)
        argv = [*local_agent_command(), "--sandbox", str(sandbox), *(["--confine"] if confine else []),
                *[f"--link-root={r}" for r in link_roots or []]]
        out = log.open("ab") if log is not None else None
        try:
            self.proc = subprocess.Popen(argv, env=local_agent_env(env), stdout=out or subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if out is not None:
                out.close()
        deadline = time.monotonic() + 15
        while not (sandbox / "agent.json").exists():
            assert self.proc.poll() is None, "agent exited at start"
            assert time.monotonic() < deadline, "agent did not start"
            time.sleep(0.02)
        self.port = json.loads((sandbox / "agent.json").read_text())["port"]
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = None):
        from orchestrator.infra.agent_client import AgentClient

        return AgentClient(self.url, self.token if token is None else token)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
