"""Issue 23, the client side against real servers: TLS with the server's own certificate (`--tls-cert/--tls-key`), and
version skew said in one line naming both versions."""

from __future__ import annotations

import datetime
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.api_client import RemoteJobService
from orchestrator.config import ApiConfig
from orchestrator.errors import SortieError


def _self_signed(where: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = where / "cert.pem", where / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_server(sortie_home: Path, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    from orchestrator.server import daemon

    (sortie_home / "config.yaml").write_text("api: {start_controller: false}\n")
    cert, key = _self_signed(tmp_path)
    info, admin = daemon.start(sortie_home, port=0, tls_cert=str(cert), tls_key=str(key))
    assert admin is not None
    try:
        yield info["url"], admin.read_text().strip(), cert
    finally:
        daemon.stop(sortie_home)


def test_tls_with_the_servers_certificate(tls_server: tuple[str, str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    url, token, cert = tls_server
    assert url.startswith("https://127.0.0.1:")
    with pytest.raises(SortieError, match="does not answer"):  # an unknown certificate is refused
        RemoteJobService(ApiConfig(endpoint=url, token=token)).identity  # noqa: B018
    monkeypatch.setenv("SORTIE_API_CA", str(cert))
    me = RemoteJobService(ApiConfig(endpoint=url, token=token)).identity
    assert (me.user, me.role) == ("admin", "admin")
    with pytest.raises(SortieError):  # plain HTTP to a TLS port gets no answer it can use
        RemoteJobService(ApiConfig(endpoint=url.replace("https", "http"), token=token)).identity  # noqa: B018


class _Future(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"version": "9.0.0", "api": 2, "user": "x", "role": "user", "workspaces": []}).encode()
        self.send_response(200)
        self.send_header("X-Sortie-Version", "9.0.0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_version_skew_is_one_line_naming_both_versions() -> None:
    from orchestrator import __version__

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Future)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        api = ApiConfig(endpoint=f"http://127.0.0.1:{server.server_address[1]}", token="sortie_x")
        with pytest.raises(SortieError) as caught:
            RemoteJobService(api).queue_rows()
    finally:
        server.shutdown()
        server.server_close()
    line = str(caught.value)
    assert "\n" not in line and "9.0.0" in line and __version__ in line and "cannot talk" in line
