"""Issue 24, section 6: each cloud's preemption-notice watcher against a local HTTP fake of its metadata endpoint,
the delivery to the job (notice file, SIGTERM, watch event), and the controller's hub taking the event."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from orchestrator.controller.node_events import NodeEvents, NodeSeen, _Node
from orchestrator.node import notices
from orchestrator.node.runs import Agent
from stacks.spec import ClusterSpec


class Metadata:
    """A fake metadata server: path -> (status, body, required header)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes, tuple[str, str] | None]] = {}
        self.seen: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                fake.seen.append((self.command, self.path))
                status, body, header = fake.routes.get(f"{self.command} {self.path}", (404, b"", None))
                if header and self.headers.get(header[0]) != header[1]:
                    status, body = 401, b""
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = answer

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def metadata() -> Iterator[Metadata]:
    fake = Metadata()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def test_aws_watcher_uses_an_imdsv2_token_and_reads_the_instance_action(metadata: Metadata) -> None:
    metadata.routes["PUT /latest/api/token"] = (200, b"tok-1", ("X-aws-ec2-metadata-token-ttl-seconds", "60"))
    assert notices.check("aws", metadata.url, Path("/nonexistent")) is None  # 404: no notice yet
    metadata.routes["GET /latest/meta-data/spot/instance-action"] = (
        200, b'{"action": "terminate", "time": "2026-12-07T03:40:00Z"}', ("X-aws-ec2-metadata-token", "tok-1"))
    notice = notices.check("aws", metadata.url, Path("/nonexistent"))
    assert notice is not None and notice["source"] == "aws"
    assert notice["deadline"] == 1796614800.0  # 2026-12-07T03:40:00Z


def test_gcp_watcher_reads_preempted_true(metadata: Metadata) -> None:
    route = "GET /computeMetadata/v1/instance/preempted"
    metadata.routes[route] = (200, b"FALSE", ("Metadata-Flavor", "Google"))
    assert notices.check("gcp", metadata.url, Path("/nonexistent")) is None
    metadata.routes[route] = (200, b"TRUE", ("Metadata-Flavor", "Google"))
    notice = notices.check("gcp", metadata.url, Path("/nonexistent"))
    assert notice is not None and 25 < notice["deadline"] - time.time() <= 30.01


def test_azure_watcher_finds_a_preempt_scheduled_event(metadata: Metadata) -> None:
    route = "GET /metadata/scheduledevents?api-version=2020-07-01"
    reboot = {"EventType": "Reboot", "NotBefore": "Mon, 07 Dec 2026 03:50:00 GMT"}
    metadata.routes[route] = (200, json.dumps({"Events": [reboot]}).encode(), ("Metadata", "true"))
    assert notices.check("azure", metadata.url, Path("/nonexistent")) is None
    preempt = {"EventType": "Preempt", "NotBefore": "Mon, 07 Dec 2026 03:40:00 GMT"}
    metadata.routes[route] = (200, json.dumps({"Events": [reboot, preempt]}).encode(), ("Metadata", "true"))
    notice = notices.check("azure", metadata.url, Path("/nonexistent"))
    assert notice is not None and notice["source"] == "azure" and notice["deadline"] == 1796614800.0


def test_an_unreachable_or_garbled_endpoint_is_no_notice(metadata: Metadata) -> None:
    metadata.routes["GET /latest/meta-data/spot/instance-action"] = (200, b"not json", None)
    assert notices.check("aws", metadata.url, Path("/nonexistent")) is None
    assert notices.check("gcp", "http://127.0.0.1:9", Path("/nonexistent")) is None


def test_a_notice_reaches_the_run_and_the_watch(tmp_path: Path) -> None:
    agent = Agent(tmp_path, "token", "node-1")
    script = ('trap \'cp "$SORTIE_PREEMPTION_NOTICE_FILE" got.env; echo checkpointed; exit 7\' TERM; '
              'echo up; while true; do sleep 0.1; done')
    run_id = agent.start_run(script, {}, None, None)
    deadline = time.monotonic() + 10
    while b"up" not in (agent.read_log(run_id, 0) or b"") and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / notices.LOCAL_NOTICE).write_text(json.dumps({"deadline": time.time() + 30}))
    notices.start(agent, "local", every=0.05)
    while agent.status(run_id)["state"] == "running" and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(0.05)
    status = agent.status(run_id)
    assert status is not None and status["state"] == "exited" and status["exit_code"] == 7
    text = (tmp_path / "workdir" / "got.env").read_text()
    assert "SORTIE_PREEMPTION_SOURCE=local" in text and "SKYPILOT_PREEMPTION_NOTICE=" in text
    events, _seq, _reset = agent.watch.since(0, 0)
    kinds = [e["kind"] for e in events]
    assert "notice" in kinds and kinds.index("notice") < kinds.index("exited")
    assert not notices.deliver(agent, {"source": "local", "deadline": 1.0, "detected_at": 1.0})  # once only


def test_the_hub_keeps_a_nodes_notice() -> None:
    hub = NodeEvents()
    node = _Node(NodeSeen("http://n"), "t", time.monotonic())
    hub._nodes["http://n"] = node
    assert hub.notice("http://n") is None
    hub._apply(node, {"seq": 1, "epoch": "e", "events": [
        {"seq": 1, "kind": "notice", "run_id": "", "source": "aws", "deadline": 5.0, "detected_at": 1.0}]})
    assert hub.notice("http://n") == {"source": "aws", "deadline": 5.0, "detected_at": 1.0}
    assert "" not in node.seen.runs and node.seen.version == 1


def test_agent_command_watches_notices_on_spot_vms_and_pods(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.infra import agent_bundle
    from stacks.builders import notice_flags

    assert notice_flags(ClusterSpec(name="c", infra="aws/us-east-1", use_spot=True)) == []  # not shipped yet
    monkeypatch.setattr(agent_bundle, "AGENT_MODULES", (*agent_bundle.AGENT_MODULES, "notices"))
    assert notice_flags(ClusterSpec(name="c", infra="aws/us-east-1", use_spot=True)) == ["--notices", "aws"]
    assert notice_flags(ClusterSpec(name="c", infra="aws/us-east-1")) == []
    assert notice_flags(ClusterSpec(name="c", infra="kubernetes/ctx"))[:2] == ["--notices", "kubernetes"]


def test_kubernetes_sigterm_is_the_notice(tmp_path: Path) -> None:
    """The agent as a pod's process: SIGTERM gives the notice, and the agent stops once its runs ended."""
    from orchestrator.infra.agent_bundle import local_agent_command, local_agent_env

    proc = subprocess.Popen([*local_agent_command(), "--sandbox", str(tmp_path), "--notices", "kubernetes",
                             "--notice-grace", "20"], env=local_agent_env({**os.environ, "SORTIE_AGENT_TOKEN": "t"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "agent.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)  # no run going: it stops at once, not after the 20 s grace
        text = (tmp_path / notices.NOTICE_FILE).read_text()
        assert "SORTIE_PREEMPTION_SOURCE=kubernetes" in text
        assert any(json.loads(line)["kind"] == "notice" for line in (tmp_path / "watch.jsonl").read_text().splitlines())
    finally:
        proc.kill()
        proc.wait()
