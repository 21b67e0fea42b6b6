"""Infra, a small client for the node agent's HTTP API (see `orchestrator/node/agent.py`)."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import SortieError


class AgentError(SortieError):
    """The agent refused a request or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def refusal(url: str, method: str, path: str, status: int, body: bytes) -> AgentError:
    """The agent's answer of `status` >= 400, in one line: its `error` when it sent one."""
    detail = body.decode(errors="replace")
    with contextlib.suppress(json.JSONDecodeError, AttributeError):
        detail = json.loads(detail).get("error", detail)
    return AgentError(f"agent at {url}: {method} {path} -> {status}: {detail}", status)


def run_request(command: str, run_id: str | None, env: dict[str, str] | None, cwd: str | None = None,
                view: bool = True, user: str | None = None) -> dict[str, Any]:
    """The body of POST /runs."""
    body: dict[str, Any] = {"command": command, "env": env or {}}
    if not view:
        body["view"] = False
    if user:
        body["user"] = user
    if cwd:
        body["cwd"] = cwd
    if run_id:
        body["run_id"] = run_id
    return body


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    state: str  # running | exited | cancelled
    exit_code: int | None
    pid: int
    started_at: float
    ended_at: float | None
    log_size: int
    node_error: str | None = None  # the node cannot write its records (a full disk): the agent's words

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunStatus:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def done(self) -> bool:
        return self.state != "running"


@dataclass(frozen=True)
class AgentClient:
    """Talks to one node's agent. `url` is like http://127.0.0.1:40123."""

    url: str
    token: str
    timeout: float = 10.0

    def _request(self, method: str, path: str, body: dict | None = None, raw: bytes | None = None,
                 timeout: float | None = None) -> tuple[bytes, dict[str, str]]:
        data = json.dumps(body).encode() if body is not None else raw
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            raise refusal(self.url, method, path, exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AgentError(f"agent at {self.url} is unreachable: {reason}") from None

    def _json(self, method: str, path: str, body: dict | None = None) -> Any:
        raw, _ = self._request(method, path, body)
        return json.loads(raw)

    def health(self) -> dict:
        return self._json("GET", "/health")

    def run(self, command: str, env: dict[str, str] | None = None, cwd: str | None = None,
            run_id: str | None = None, view: bool = True, user: str | None = None) -> str:
        """Start `command` on the node. `view=False`: outside the path view of a local-cloud node, in its own
        mount namespace (what the run mounts stays for the runs after it). `user`: a pool job's key, the run is
        that job's own user's on a node with node users (issue 17)."""
        return self._json("POST", "/runs", run_request(command, run_id, env, cwd, view, user))["run_id"]

    def start(self, command: str, run_id: str, env: dict[str, str] | None = None, view: bool = True,
              user: str | None = None) -> bool:
        """Start the run `run_id` unless it was started before (a restarted controller asks again: the agent
        answers 409). True when this call started it."""
        try:
            self.run(command, env=env, run_id=run_id, view=view, user=user)
        except AgentError as exc:
            if exc.status != 409:
                raise
            return False
        return True

    def status(self, run_id: str) -> RunStatus:
        return RunStatus.from_json(self._json("GET", f"/runs/{run_id}"))

    def log(self, run_id: str, offset: int = 0) -> tuple[bytes, int]:
        """Log bytes from `offset`, and the offset to ask for next."""
        raw, headers = self._request("GET", f"/runs/{run_id}/log?offset={offset}")
        return raw, int(headers.get("X-Next-Offset", offset + len(raw)))

    def upload(self, source: str, dest: str) -> str:
        """Send a local file or directory to `dest` on the node (see the agent's POST /files)."""
        import io
        import tarfile
        from pathlib import Path
        from urllib.parse import quote

        buf = io.BytesIO()
        src = Path(source)
        with tarfile.open(fileobj=buf, mode="w") as tar:
            if src.is_dir():
                for child in sorted(src.iterdir()):
                    tar.add(child, arcname=child.name)
            else:
                tar.add(src, arcname=src.name)
        kind = "" if src.is_dir() else "&file=1"
        raw, _ = self._request("POST", f"/files?dest={quote(dest)}{kind}", raw=buf.getvalue(), timeout=600)
        return json.loads(raw)["path"]

    def link(self, dest: str, target: str | None) -> str:
        """Make `dest` on the node a symlink to the node's directory `target`; with no target, only declare
        `dest` as a path that later runs see (see the agent's POST /links)."""
        return self._json("POST", "/links", {"dest": dest, "target": target})["path"]

    def remove_user(self, key: str) -> dict:
        """A pool job's end: its user on the node, its files and account removed (the agent's POST /users/.../remove;
        an agent without node users answers {})."""
        return self._json("POST", f"/users/{key}/remove", {})

    def cancel(self, run_id: str) -> RunStatus:
        return RunStatus.from_json(self._json("POST", f"/runs/{run_id}/cancel", {}))

    def watch(self, since: int = 0, timeout: float = 0.0, epoch: str | None = None) -> dict:
        """The node's changes after `since` (the agent's GET /watch), waiting up to `timeout` seconds for one."""
        query = f"/watch?since={since}&timeout={timeout}" + (f"&epoch={epoch}" if epoch else "")
        raw, _ = self._request("GET", query, timeout=timeout + self.timeout)
        return json.loads(raw)

    def wait(self, run_id: str, timeout: float = 60.0, interval: float = 0.1) -> RunStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(run_id)
            if status.done:
                return status
            if time.monotonic() > deadline:
                raise AgentError(f"run {run_id} on {self.url} still running after {timeout:.0f}s")
            time.sleep(interval)
