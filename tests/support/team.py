"""Issue 23's end-to-end setting: one server home running the API server (and its controller), and client homes
logged in to it (alice and bob in workspace `ml`, carol in `vision`, an admin)."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.e2e import Sortie

SERVER_CONFIG = """controller:
  poll_interval_seconds: 0.3
  tick_seconds: 0.2
  autostop_idle_minutes: 5
workspaces:
  ml: {users: [alice, bob]}
  vision: {users: [carol], allowed_infra: [local/region-b]}
"""


@dataclass
class Team:
    server: Sortie
    root: Path
    url: str = ""
    clients: dict[str, Sortie] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        self.server.run("api", "start", "--port", str(getattr(self, "port", 0)), timeout=120)
        info = json.loads((self.server.home / "api" / "server.json").read_text())
        self.url, self.port = info["url"], info["port"]

    def kill(self) -> None:
        """SIGKILL the server: what a crash does."""
        info = json.loads((self.server.home / "api" / "server.json").read_text())
        os.kill(int(info["pid"]), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def add(self, name: str, *extra: str) -> str:
        out = self.server.run("users", "add", name, "-o", "json", *extra).stdout
        self.tokens[name] = json.loads(out)["token"]
        return self.tokens[name]

    def client(self, name: str) -> Sortie:
        home = self.root / f"client-{name}"
        home.mkdir(exist_ok=True)
        client = Sortie(home)
        client.run("api", "login", "--endpoint", self.url, "--token", self.tokens[name])
        self.clients[name] = client
        return client

    def http(self, method: str, path: str, token: str | None, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {token}"} if token else {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
