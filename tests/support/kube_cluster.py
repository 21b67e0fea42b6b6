"""A real Kubernetes control plane on loopback for the tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (simulated nodes), with generated certificates and a service-account key.

The binaries are built from the Go module proxy once per machine (`orchestrator/infra/kube_binaries.py`, cached under
`~/.cache/sortie`); a build failure fails the tests that need the cluster, never skips them. Everything started here
is stopped (and its directory removed) when the fixture ends.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

SERVICE_CIDR = "10.96.0.0/24"
POD_CIDR = "10.244.0.0/16"
# kwok's pods get loopback addresses: nothing listens there, so an agent call is refused at once. (An address
# off this machine is not safe: this VM's egress proxy answers any TCP connection, e.g. 404 to an agent call.)
KWOK_POD_CIDR = "127.244.0.0/16"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: Any, issuer: tuple[x509.Certificate, Any] | None, *, org: str | None = None,
          sans: list[x509.GeneralName] | None = None, ca: bool = False) -> x509.Certificate:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, subject)]
    if org:
        names.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    name = x509.Name(names)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer[0].subject if issuer else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def write_pki(pki: Path) -> None:
    """A CA, the API server's serving certificate, an admin client (system:masters) and the service-account key."""
    pki.mkdir(parents=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("sortie-test-ca", ca_key, None, ca=True)
    files: dict[str, bytes] = {"ca.crt": ca.public_bytes(serialization.Encoding.PEM), "ca.key": _pem_key(ca_key)}
    sans: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName("kubernetes.default.svc"),
                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                    x509.IPAddress(ipaddress.ip_address("10.96.0.1"))]
    for name, subject, org, san in (("apiserver", "kube-apiserver", None, sans),
                                    ("admin", "sortie-test-admin", "system:masters", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{name}.crt"] = _cert(subject, key, (ca, ca_key), org=org, sans=san).public_bytes(
            serialization.Encoding.PEM)
        files[f"{name}.key"] = _pem_key(key)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files["sa.key"] = _pem_key(sa_key)
    files["sa.pub"] = sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    for name, data in files.items():
        (pki / name).write_bytes(data)
        (pki / name).chmod(0o600)


def kubeconfig_yaml(server: str, pki: Path, *, user: str = "admin", token: str | None = None,
                    namespace: str | None = None, context: str = "sortie-test") -> str:
    """A kubeconfig naming one cluster and one user (a client certificate, or a bearer token)."""
    user_entry: dict[str, Any] = ({"token": token} if token else
                                  {"client-certificate": str(pki / "admin.crt"), "client-key": str(pki / "admin.key")})
    ctx: dict[str, Any] = {"cluster": "sortie-test", "user": user}
    if namespace:
        ctx["namespace"] = namespace
    config = {"apiVersion": "v1", "kind": "Config", "current-context": context,
              "clusters": [{"name": "sortie-test", "cluster": {"server": server,
                                                               "certificate-authority": str(pki / "ca.crt")}}],
              "users": [{"name": user, "user": user_entry}],
              "contexts": [{"name": context, "context": ctx}]}
    return json.dumps(config, indent=2)


def _decode(payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload or b"{}")
    except ValueError:
        return {"message": payload.decode(errors="replace")}
    return body if isinstance(body, dict) else {"value": body}


@dataclass
class KubeCluster:
    """A running control plane: its API server URL, kubeconfig and the processes behind it."""

    root: Path
    server: str
    kubeconfig: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, *,
            content_type: str = "application/json", token: str | None = None) -> tuple[int, dict[str, Any]]:
        """One API call as the admin (or with a bearer token); returns (HTTP status, decoded body)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method,
                                         headers={"Content-Type": content_type, "Accept": "application/json"})
        ctx = self._context()
        if token:
            request.add_header("Authorization", f"Bearer {token}")
            ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        try:
            with urllib.request.urlopen(request, context=ctx, timeout=30) as response:
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read())

    def get(self, path: str) -> dict[str, Any]:
        status, body = self.api("GET", path)
        assert status == 200, f"GET {path}: {status} {body.get('message')}"
        return body

    def items(self, path: str) -> list[dict[str, Any]]:
        return self.get(path)["items"]

    def wait(self, what: str, predicate: Any, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.5)

    def add_node(self, name: str, *, cpu: str = "8", memory: str = "32Gi", pods: str = "110",
                 gpus: int = 0, labels: dict[str, str] | None = None,
                 taints: list[dict[str, str]] | None = None) -> None:
        """A simulated node (kwok manages it: it becomes Ready and runs the pods bound to it, without executing)."""
        capacity = {"cpu": cpu, "memory": memory, "pods": pods, "ephemeral-storage": "100Gi"}
        if gpus:
            capacity["nvidia.com/gpu"] = str(gpus)
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                             "labels": {"kubernetes.io/hostname": name, "type": "kwok",
                                        "kubernetes.io/os": "linux", **(labels or {})}},
                "spec": {"taints": taints or []},
                "status": {"capacity": capacity, "allocatable": capacity}}
        status, body = self.api("POST", "/api/v1/nodes", node)
        assert status == 201, f"creating node {name}: {status} {body.get('message')}"
        self.wait(f"node {name} Ready", lambda: any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in self.get(f"/api/v1/nodes/{name}").get("status", {}).get("conditions", [])))

    def delete_node(self, name: str) -> None:
        self.api("DELETE", f"/api/v1/nodes/{name}")

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            proc = self.processes.pop(name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _start(cluster: KubeCluster, name: str, argv: list[str]) -> None:
    log = (cluster.root / f"{name}.log").open("ab")
    cluster.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               start_new_session=True)
    log.close()


def _check_alive(cluster: KubeCluster) -> None:
    for name, proc in cluster.processes.items():
        if proc.poll() is not None:
            tail = (cluster.root / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n" + "\n".join(tail))


@contextlib.contextmanager
def kube_cluster(root: Path, timeout: float = 180.0) -> Iterator[KubeCluster]:
    """Start the control plane and kwok under `root`; stop everything on exit."""
    from orchestrator.infra.kube_binaries import install_kube_binaries

    binaries, _built = install_kube_binaries()
    root.mkdir(parents=True, exist_ok=True)
    write_pki(root / "pki")
    pki = root / "pki"
    api_port, etcd_port, peer_port = free_port(), free_port(), free_port()
    cluster = KubeCluster(root=root, server=f"https://127.0.0.1:{api_port}", kubeconfig=root / "kubeconfig")
    cluster.kubeconfig.write_text(kubeconfig_yaml(cluster.server, pki))
    cluster.kubeconfig.chmod(0o600)
    try:
        _start(cluster, "etcd", [str(binaries.etcd), "--name", "sortie-test", "--data-dir", str(root / "etcd"),
                                 "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                                 "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                                 "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                                 "--initial-cluster", f"sortie-test=http://127.0.0.1:{peer_port}",
                                 "--log-level", "warn"])
        _start(cluster, "kube-apiserver", [
            str(binaries.path("kube-apiserver")), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}", f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc", "--authorization-mode=Node,RBAC",
            "--endpoint-reconciler-type=none",  # a loopback advertise address is refused by the reconciler
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            # A real node's kubelet (tests/kube_node.py) at its InternalIP, as the admin client: pod logs, exec.
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--kubelet-client-certificate={pki / 'admin.crt'}", f"--kubelet-client-key={pki / 'admin.key'}", "--v=1"])
        admin = str(cluster.kubeconfig)
        cluster.wait("the API server to answer /readyz", lambda: (_check_alive(cluster), _ready(cluster))[1],
                     timeout)
        _start(cluster, "kube-controller-manager", [
            str(binaries.path("kube-controller-manager")), f"--kubeconfig={admin}",
            f"--authentication-kubeconfig={admin}", f"--authorization-kubeconfig={admin}",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--cluster-cidr={POD_CIDR}", f"--service-cluster-ip-range={SERVICE_CIDR}", "--v=1"])
        _start(cluster, "kube-scheduler", [
            str(binaries.path("kube-scheduler")), f"--kubeconfig={admin}", f"--authentication-kubeconfig={admin}",
            f"--authorization-kubeconfig={admin}", "--leader-elect=false", "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}", "--v=1"])
        _start(cluster, "kwok", [
            str(binaries.kwok), f"--kubeconfig={admin}", f"--config={binaries.kwok_stages}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake", f"--cidr={KWOK_POD_CIDR}",
            "--node-ip=127.244.0.1", f"--server-address=127.0.0.1:{free_port()}"])
        # The controller manager makes each namespace's `default` service account: pods need it.
        cluster.wait("the default service account", lambda: (
            _check_alive(cluster), cluster.api("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200
        )[1], timeout)
        yield cluster
    finally:
        cluster.stop()


def _ready(cluster: KubeCluster) -> bool:
    try:
        status, _ = cluster.api("GET", "/readyz")
    except (OSError, ValueError):
        return False
    return status == 200
