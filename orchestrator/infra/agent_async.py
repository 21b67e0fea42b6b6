"""Infra, the node agent's HTTP API for the controller's event loop (issue 15): polls, run starts, log copies and
health checks as coroutines on the watch hub's loop (`orchestrator.controller.node_events`), over one shared
aiohttp session with a bounded pool of keep-alive connections, so thousands of nodes cost no thread each.

`AsyncAgentClient` speaks to a real agent; `SyncAgentOnLoop` puts any synchronous client (a test's fake agent)
behind the same coroutine face. The answers and errors are those of `orchestrator.infra.agent_client`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Protocol

from orchestrator.infra.agent_client import AgentClient, AgentError, RunStatus, refusal, run_request


class NodeAgent(Protocol):
    """What the controller's loop asks of a node's agent."""

    async def health(self) -> dict: ...
    async def start(self, command: str, run_id: str, env: dict[str, str] | None = None,
                    user: str | None = None) -> bool: ...
    async def status(self, run_id: str) -> RunStatus: ...
    async def log(self, run_id: str, offset: int = 0) -> tuple[bytes, int]: ...
    async def cancel(self, run_id: str) -> RunStatus: ...


class AsyncAgentClient:
    """One node's agent, through the loop's shared session. `url` is like http://127.0.0.1:40123."""

    def __init__(self, session: Any, url: str, token: str, timeout: float = 10.0) -> None:
        import aiohttp

        self.session, self.url = session, url
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._errors = (aiohttp.ClientError, asyncio.TimeoutError, OSError)

    async def _request(self, method: str, path: str, body: dict | None = None) -> tuple[bytes, dict[str, str]]:
        try:
            async with self.session.request(method, f"{self.url}{path}", json=body, headers=self._headers,
                                            timeout=self._timeout) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise refusal(self.url, method, path, resp.status, raw)
                return raw, dict(resp.headers)
        except self._errors as exc:
            raise AgentError(f"agent at {self.url} is unreachable: {exc or type(exc).__name__}") from None

    async def _json(self, method: str, path: str, body: dict | None = None) -> Any:
        raw, _ = await self._request(method, path, body)
        return json.loads(raw)

    async def health(self) -> dict:
        return await self._json("GET", "/health")

    async def start(self, command: str, run_id: str, env: dict[str, str] | None = None,
                    user: str | None = None) -> bool:
        """As `AgentClient.start`: True when this call started the run, False when it had been started before."""
        try:
            await self._json("POST", "/runs", run_request(command, run_id, env, user=user))
        except AgentError as exc:
            if exc.status != 409:
                raise
            return False
        return True

    async def status(self, run_id: str) -> RunStatus:
        return RunStatus.from_json(await self._json("GET", f"/runs/{run_id}"))

    async def log(self, run_id: str, offset: int = 0) -> tuple[bytes, int]:
        raw, headers = await self._request("GET", f"/runs/{run_id}/log?offset={offset}")
        return raw, int(headers.get("X-Next-Offset", offset + len(raw)))

    async def cancel(self, run_id: str) -> RunStatus:
        return RunStatus.from_json(await self._json("POST", f"/runs/{run_id}/cancel", {}))


class SyncAgentOnLoop:
    """A synchronous client behind the coroutine face: called in a worker thread (`threaded`, on the controller's
    loop, which must not block), or in place (the unit tests' inline controller, one step at a time)."""

    def __init__(self, client: AgentClient, *, threaded: bool) -> None:
        self.client, self.threaded = client, threaded

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args) if self.threaded else fn(*args)

    async def health(self) -> dict:
        return await self._call(self.client.health)

    async def start(self, command: str, run_id: str, env: dict[str, str] | None = None,
                    user: str | None = None) -> bool:
        return await self._call(self.client.start, command, run_id, env, True, user)

    async def status(self, run_id: str) -> RunStatus:
        return await self._call(self.client.status, run_id)

    async def log(self, run_id: str, offset: int = 0) -> tuple[bytes, int]:
        return await self._call(self.client.log, run_id, offset)

    async def cancel(self, run_id: str) -> RunStatus:
        return await self._call(self.client.cancel, run_id)
