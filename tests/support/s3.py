"""An S3 endpoint for tests: moto's real server on loopback (no mocked calls), one per session."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator.config import S3Config

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would point boto3 somewhere else than the test server's dummy credentials.
_OTHER_AWS_VARS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                   "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MotoServer:
    endpoint_url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes] = field(repr=False)

    def reset(self) -> None:
        """Forget every bucket (moto's reset API)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as reply:
            reply.read()


def _answers(host: str, port: int) -> bool:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=1)
        conn.request("GET", "/moto-api/")
        conn.getresponse().read()
        conn.close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    aws_home = Path(log.parent)
    env = {**DUMMY_CREDENTIALS,
           "AWS_CONFIG_FILE": str(aws_home / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(aws_home / "no-aws-credentials"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    server_env = {k: v for k, v in os.environ.items() if k not in _OTHER_AWS_VARS} | env
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=server_env, start_new_session=True)
    server = MotoServer(f"http://127.0.0.1:{port}", env, process)
    try:
        deadline = time.monotonic() + 30
        while not _answers("127.0.0.1", port):
            if process.poll() is not None:
                pytest.fail(f"moto server exited with {process.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"moto server did not answer on port {port} in 30 s: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: MotoServer) -> S3Config:
    """Dummy credentials in the environment, an empty server, and the config of a store that uses it."""
    for name in _OTHER_AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    s3_server.reset()
    return S3Config(endpoint_url=s3_server.endpoint_url)
