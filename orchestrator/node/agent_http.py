"""Node side, the agent's HTTP API (token-checked JSON over one port) and its server loop; the API is
described in `orchestrator.node.agent`. Standard library only."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import socket
import sys
import tarfile
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from orchestrator.node.agent_files import MAX_BODY, MAX_UPLOAD, NO_SPACE, write_json_atomic
from orchestrator.node.runs import Agent
from orchestrator.node.watch import WATCH_MAX_TIMEOUT

# Issue 28: slow clients (slowloris) hold no thread for long. A connection has HEADER_TIMEOUT seconds for each request
# line and its headers until it has shown the token; a connection that has may idle IDLE_TIMEOUT seconds between
# requests (keep-alive); one read of a body waits READ_TIMEOUT at most. At MAX_CONNECTIONS, a new connection evicts
# the oldest one waiting for a request (token-less ones first), so /health and the controller's watch get in.
HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0
READ_TIMEOUT = 60.0
MAX_CONNECTIONS = 128  # one node's clients: the controller's watch, probes and file transfers


class _Handler(BaseHTTPRequestHandler):
    server: _AgentServer
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT  # the socket's, per read (StreamRequestHandler.setup)
    trusted = False  # this connection has made a request with the token

    def log_message(self, format: str, *args: object) -> None:
        """A request's log line; never fails the request (issue 28: a full disk under the agent's log made every
        request fail, and the controller took the node for lost)."""
        try:
            sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.address_string()} {format % args}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def handle_one_request(self) -> None:
        self.server.waiting(self.connection, self.trusted)
        super().handle_one_request()

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: object) -> None:
        self._send(status, json.dumps(data).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _authorized(self) -> bool:
        """The token is right and the node is not going away; else the body is drained (the connection stays
        usable) and the request refused: 401, or 503 once the agent is stopping (the node shuts down: what its
        runs say now, killed on the way out, is no exit of theirs)."""
        agent = self.server.agent
        if agent.authorized(self.headers.get("Authorization")) and not agent.stopping:
            self.trusted = True
            self.server.serving(self.connection)
            return True
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= MAX_BODY:
            self.rfile.read(length)
        if agent.stopping:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b'{"error": "the node is shutting down"}')
        else:
            self._send(HTTPStatus.UNAUTHORIZED, b'{"error": "missing or wrong bearer token"}',
                       headers={"WWW-Authenticate": "Bearer"})
        return False

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("request body too large")
        data = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(data, dict):
            raise ValueError("request body must be a JSON object")
        return data

    def do_GET(self) -> None:
        if not self._authorized():
            return
        agent = self.server.agent
        url = urlparse(self.path)
        parts = [p for p in url.path.split("/") if p]
        if parts == ["health"]:
            self._json(200, agent.health())
        elif parts == ["watch"]:
            self._watch(parse_qs(url.query))
        elif parts == ["runs"]:
            self._json(200, agent.all_status())
        elif len(parts) == 2 and parts[0] == "runs":
            status = agent.status(parts[1])
            self._json(200, status) if status else self._error(404, f"no run {parts[1]}")
        elif len(parts) == 3 and parts[0] == "runs" and parts[2] == "log":
            query = parse_qs(url.query)
            offset = int(query.get("offset", ["0"])[0])
            data = agent.read_log(parts[1], offset)
            if data is None:
                self._error(404, f"no run {parts[1]}")
            else:
                self._send(200, data, "application/octet-stream", {"X-Next-Offset": str(offset + len(data))})
        else:
            self._error(404, f"no route GET {url.path}")

    def _watch(self, query: dict[str, list[str]]) -> None:
        try:
            since = int(query.get("since", ["0"])[0])
            timeout = float(query.get("timeout", ["0"])[0])
            if not math.isfinite(timeout) or timeout < 0:  # issue 28: NaN made `since` return at once, spinning
                raise ValueError(timeout)
        except ValueError:
            self._error(400, "watch: since must be an integer and timeout a finite number of seconds, 0 or more")
            return
        timeout = min(timeout, WATCH_MAX_TIMEOUT)
        journal = self.server.agent.watch
        events, seq, reset = journal.since(since, timeout, query.get("epoch", [""])[0] or None)
        body: dict[str, object] = {"epoch": journal.epoch, "reset": reset, "events": events, "seq": seq}
        if reset:  # taken after `seq`: a change in between shows in both, never in neither
            body["runs"] = self.server.agent.all_status()
        self._json(200, body)

    def do_POST(self) -> None:
        if not self._authorized():
            return
        agent = self.server.agent
        parts = [p for p in urlparse(self.path).path.split("/") if p]
        try:
            if parts == ["files"]:
                length = int(self.headers.get("Content-Length") or 0)
                dest = parse_qs(urlparse(self.path).query).get("dest", [""])[0]
                if not dest or length > MAX_UPLOAD:
                    raise ValueError("files: a dest and a tar body under 8 GiB are required")
                single = parse_qs(urlparse(self.path).query).get("file", ["0"])[0] == "1"
                target = agent.receive_files(dest, self.rfile, length, single)
                self._json(201, {"path": str(target)})
                return
            body = self._body()
            if parts == ["runs"]:
                command = body.get("command")
                if not isinstance(command, str) or not command.strip():
                    raise ValueError("command: a non-empty string is required")
                env = body.get("env") or {}
                if not isinstance(env, dict):
                    raise ValueError("env: must be an object of strings")
                view = body.get("view", True)
                if not isinstance(view, bool):
                    raise ValueError("view: must be true or false")
                user = body.get("user")
                if not isinstance(user, str | None):
                    raise ValueError("user: must be a string (a pool job's key) or null")
                run_id = agent.start_run(command, env, body.get("cwd"), body.get("run_id"), view, user)
                self._json(201, {"run_id": run_id})
            elif parts == ["links"]:
                dest, target = body.get("dest"), body.get("target")  # type: ignore[assignment]
                if not isinstance(dest, str) or not dest or not isinstance(target, str | None):
                    raise ValueError("links: dest must be a non-empty string and target a string or null")
                self._json(201, {"path": str(agent.link(dest, target))})
            elif len(parts) == 3 and parts[0] == "users" and parts[2] == "remove":
                self._json(200, agent.remove_user(parts[1]))
            elif len(parts) == 3 and parts[0] == "runs" and parts[2] == "cancel":
                status = agent.cancel(parts[1])
                self._json(200, status) if status else self._error(404, f"no run {parts[1]}")
            else:
                self._error(404, f"no route POST {self.path}")
        except FileExistsError as exc:
            self._error(409, str(exc))
        except (ValueError, json.JSONDecodeError, tarfile.TarError) as exc:
            self._error(400, str(exc))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._error(HTTPStatus.INSUFFICIENT_STORAGE, f"{NO_SPACE} ({agent.sandbox})")
            else:
                self._error(500, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))


class _AgentServer(ThreadingHTTPServer):
    """One thread per connection, at most MAX_CONNECTIONS of them; a reaper closes connections past their
    deadline (see HEADER_TIMEOUT)."""

    daemon_threads = True
    request_queue_size = 64  # the listen backlog: a burst of connections waits for accept, not for SYN retries

    def __init__(self, address: tuple[str, int], agent: Agent) -> None:
        super().__init__(address, _Handler)
        self.agent = agent
        self._lock = threading.Lock()
        # every open connection: (deadline or None while a request with the token is served, trusted, since)
        self._open: dict[socket.socket, tuple[float | None, bool, float]] = {}
        threading.Thread(target=self._reap, name="reaper", daemon=True).start()

    def waiting(self, conn: socket.socket, trusted: bool) -> None:
        """`conn` waits for its next request line and headers."""
        now = time.monotonic()
        with self._lock:
            if conn in self._open:
                self._open[conn] = (now + (IDLE_TIMEOUT if trusted else HEADER_TIMEOUT), trusted, now)

    def serving(self, conn: socket.socket) -> None:
        """`conn` showed the token: its request runs as long as it needs (a held watch, an upload)."""
        with self._lock:
            if conn in self._open:
                self._open[conn] = (None, True, time.monotonic())

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        now = time.monotonic()
        with self._lock:
            if len(self._open) >= MAX_CONNECTIONS and not self._evict_one():
                refused = True
            else:
                refused = False
                self._open[request] = (now + HEADER_TIMEOUT, False, now)
        if refused:  # every connection is serving a request with the token: this one waits for none
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for a request, token-less ones first (under the lock)."""
        waiting = [(trusted, since, conn) for conn, (deadline, trusted, since) in self._open.items()
                   if deadline is not None]
        if not waiting:
            return False
        _trusted, _since, conn = min(waiting, key=lambda item: (item[0], item[1]))
        del self._open[conn]
        _cut(conn)
        return True

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def _reap(self) -> None:
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self._lock:
                late = [conn for conn, (deadline, _, _) in self._open.items()
                        if deadline is not None and deadline < now]
                for conn in late:
                    del self._open[conn]
            for conn in late:
                _cut(conn)


def _cut(conn: socket.socket) -> None:
    """Wake the thread blocked reading `conn`: its read ends, and the thread closes the socket on its way out."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def serve(sandbox: Path, token: str, host: str, port: int, node_id: str, confine: bool = False,
           hide: list[str] | None = None, container: dict | None = None, link_roots: list[str] | None = None,
           notices: dict | None = None) -> None:
    agent = Agent(sandbox, token, node_id, confine, hide, container, link_roots)
    server = _AgentServer((host, port), agent)

    def stop(_signum: int, _frame: object) -> None:
        agent.stopping = True
        agent.shutdown_runs()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if notices and notices["source"] != "none":
        from orchestrator.node.notices import start as start_notices

        start_notices(agent, stop=lambda: stop(signal.SIGTERM, None), **notices)
    write_json_atomic(sandbox / "agent.json", {
        "pid": os.getpid(), "host": host, "port": server.server_address[1], "node_id": node_id,
        "started_at": agent.started_at,
    })
    server.serve_forever(poll_interval=0.2)


