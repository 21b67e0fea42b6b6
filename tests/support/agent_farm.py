"""A test agent server: many node identities from one asyncio process, on loopback.

Node N lives under `http://127.0.0.1:PORT/n/N` and answers the agent's `GET /watch` and `GET /health` the way the
real agent does (numbered events, a held long poll, bearer token). It is for tests and benchmarks of the controller's
watch hub at a scale where one real agent per node is too many processes:

    python -m tests.support.agent_farm --nodes 10000 [--token T]      prints {"port": P} on its first line

Control (no token): `POST /control/exit?first=A&count=C&code=K` makes run `run-0` of nodes A..A+C-1 exit with K now
(answer: {"at": time}); `POST /control/pause?first=A&count=C` holds every request of those nodes unanswered (a
stopped agent) until `POST /control/resume?...`; `POST /control/kill?...` closes their connections and refuses
them from then on (a dead node, until resume). `POST /control/stats?first=A&count=C` answers {"at", "held": watches
of those nodes held now, "beats": the fewest quiet watches (heartbeats) any of them has answered}: what a test waits
on instead of sleeping. Nodes under `/old/N` have no /watch (404), as an older agent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from urllib.parse import parse_qs, urlparse

MAX_HEADER = 16 * 1024


class Node:
    __slots__ = ("beats", "changed", "dead", "events", "held", "paused", "seq")

    def __init__(self) -> None:
        self.seq = 0
        self.events: list[dict] = []
        self.changed: asyncio.Event | None = None
        self.paused: asyncio.Event | None = None
        self.dead = False
        self.held = 0  # watches held open now
        self.beats = 0  # held watches answered with no news: heartbeats

    def record(self, event: dict) -> None:
        self.seq += 1
        self.events.append({"seq": self.seq, **event})
        del self.events[:-64]
        if self.changed is not None:
            self.changed.set()
            self.changed = None


class Farm:
    def __init__(self, nodes: int, token: str) -> None:
        self.nodes = [Node() for _ in range(nodes)]
        self.auth = f"Bearer {token}"
        self.epoch = "farm"
        for node in self.nodes:
            node.record({"kind": "started", "run_id": "run-0", "time": time.time()})

    def _range(self, query: dict[str, list[str]]) -> range:
        first = int(query.get("first", ["0"])[0])
        count = int(query.get("count", [str(len(self.nodes))])[0])
        return range(first, min(first + count, len(self.nodes)))

    def control(self, action: str, query: dict[str, list[str]]) -> dict:
        now = time.time()
        if action == "stats":
            nodes = [self.nodes[index] for index in self._range(query)]
            return {"at": now, "held": sum(n.held for n in nodes), "beats": min((n.beats for n in nodes), default=0)}
        for index in self._range(query):
            node = self.nodes[index]
            if action == "exit":
                code = int(query.get("code", ["0"])[0])
                node.record({"kind": "exited", "run_id": "run-0", "exit_code": code, "ended_at": now, "time": now})
            elif action in ("pause", "kill"):
                node.paused = node.paused or asyncio.Event()
                node.dead = action == "kill"
                if node.dead and node.changed is not None:
                    node.changed.set()  # wakes held watches, which then see the node dead and drop the connection
            elif action == "resume":
                node.dead = False
                if node.paused is not None:
                    node.paused.set()
                    node.paused = None
        return {"at": now}

    async def watch(self, node: Node, query: dict[str, list[str]]) -> dict:
        since = int(query.get("since", ["0"])[0])
        timeout = min(float(query.get("timeout", ["0"])[0]), 300.0)
        if since > node.seq or (query.get("epoch") and query["epoch"][0] != self.epoch):
            runs = [{"run_id": "run-0", "state": "running", "exit_code": None, "log_size": 0, "ended_at": None}]
            return {"epoch": self.epoch, "reset": True, "events": [], "seq": node.seq, "runs": runs}
        if since == node.seq and timeout > 0:
            node.changed = node.changed or asyncio.Event()
            waiter = node.changed
            node.held += 1
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), timeout)
            finally:
                node.held -= 1
        events = [e for e in node.events if e["seq"] > since]
        if not events and timeout > 0:
            node.beats += 1
        return {"epoch": self.epoch, "reset": False, "events": events, "seq": events[-1]["seq"] if events else since}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if len(head) > MAX_HEADER:
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                length = int(headers.get("content-length") or 0)
                if length:
                    await reader.readexactly(length)
                status, body = await self.route(method, target, headers)
                if status == 0:  # a dead node: drop the connection
                    return
                data = json.dumps(body).encode()
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
                             "\r\n\r\n".encode() + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            return
        finally:
            writer.close()

    async def route(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, dict]:
        url = urlparse(target)
        parts = [p for p in url.path.split("/") if p]
        query = parse_qs(url.query)
        if method == "POST" and len(parts) == 2 and parts[0] == "control":
            return 200, self.control(parts[1], query)
        if len(parts) != 3 or parts[0] not in ("n", "old") or not parts[1].isdigit():
            return 404, {"error": f"no route {url.path}"}
        if headers.get("authorization") != self.auth:
            return 401, {"error": "missing or wrong bearer token"}
        index = int(parts[1])
        if index >= len(self.nodes):
            return 404, {"error": "no such node"}
        node = self.nodes[index]
        while node.paused is not None and not node.dead:
            await node.paused.wait()
        if node.dead:
            return 0, {}
        if parts[2] == "health":
            return 200, {"status": "ok", "node_id": str(index)}
        if parts[2] == "watch" and parts[0] == "n":
            answer = await self.watch(node, query)
            while node.paused is not None and not node.dead:  # stopped while the watch was held: no answer
                await node.paused.wait()
            return (0, {}) if node.dead else (200, answer)
        return 404, {"error": f"no route {url.path}"}


async def serve(nodes: int, token: str, port: int) -> None:
    farm = Farm(nodes, token)
    server = await asyncio.start_server(farm.handle, "127.0.0.1", port, backlog=4096, limit=MAX_HEADER)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="many simulated node agents in one process")
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--token", default="farm-token")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.nodes, args.token, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
