"""Issue 28, item 8: slow clients cannot hold the agent's threads. 1,500 slowloris connections held 1,502 threads;
now a connection has a deadline for its headers until it shows the token, the connections are capped, and /health
and the controller's watch keep answering meanwhile."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from orchestrator.node import agent_http


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def _slow(port: int, n: int) -> list[socket.socket]:
    """`n` connections that send half a request and then nothing (a slowloris)."""
    found = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        found.append(sock)
    return found


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.5)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_slow_connections_are_capped_and_cut_and_the_node_keeps_answering(start_agent) -> None:
    agent = start_agent()
    client = agent.client()
    run_id = client.run("sleep 600")
    slow = _slow(agent.port, agent_http.MAX_CONNECTIONS + 40)
    try:
        time.sleep(1)
        assert _threads(agent.proc.pid) < agent_http.MAX_CONNECTIONS + 20  # 1,502 threads for 1,500 before
        started = time.monotonic()
        assert client.health()["status"] == "ok"
        seq = client.watch(0, timeout=0)["seq"]
        assert client.watch(seq, timeout=0.5)["seq"] >= seq
        assert client.status(run_id).state == "running"
        assert time.monotonic() - started < 10
        time.sleep(agent_http.HEADER_TIMEOUT + 2)  # past the header deadline: every slow one was cut
        assert all(_closed_by_server(sock) for sock in slow)
        assert client.health()["status"] == "ok"
    finally:
        for sock in slow:
            sock.close()
    client.cancel(run_id)


def test_a_held_watch_outlives_the_header_deadline(start_agent) -> None:
    """The deadline is for headers from a client without the token: a long watch (the controller's) is not cut."""
    agent = start_agent()
    client = agent.client()
    seq = client.watch(0, timeout=0)["seq"]
    started = time.monotonic()
    answer = client.watch(seq, timeout=agent_http.HEADER_TIMEOUT + 3)
    assert answer["events"] == [] and time.monotonic() - started >= agent_http.HEADER_TIMEOUT + 2
