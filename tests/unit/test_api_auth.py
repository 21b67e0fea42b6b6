"""Issue 23, the API server's pieces without a server process: tokens stored only as hashes, expiry and revocation,
roles and workspaces, the client's refusal of plain HTTP, uploads that leave nothing when bad, and the guard's limits
(body, rate, the proxy's headers) through FastAPI's test client."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.auth.identity import ForbiddenError, Identity, UnauthorizedError
from orchestrator.auth.users import Users, token_hash
from orchestrator.config import SortieConfig
from orchestrator.errors import UsageError
from state.models import ApiTokenRow
from state.store import StateStore
from state.user_transitions import Audit

AUDIT = Audit("test", "req-1")


@pytest.fixture
def users(sortie_home: Path) -> Users:
    (sortie_home / "config.yaml").write_text("workspaces:\n  ml: {users: [bob]}\n  vision: {}\n")
    store = StateStore(sortie_home)
    return Users(store, store.config)


def test_tokens_are_stored_only_as_hashes_and_die_when_revoked_or_expired(users: Users) -> None:
    token = users.add("alice", workspaces=["ml"], audit=AUDIT)
    assert token.startswith("sortie_") and len(token) >= 40
    with users.store.session() as session:
        stored = [row.token_hash for row in session.scalars(select(ApiTokenRow))]
    assert stored == [token_hash(token)] and token not in stored
    me = users.authenticate(token, "r")
    assert (me.user, me.role, me.workspaces) == ("alice", "user", ("ml",))
    rotated = users.rotate("alice", AUDIT)
    with pytest.raises(UnauthorizedError):
        users.authenticate(token, "r")  # revoked at once
    assert users.authenticate(rotated, "r").user == "alice"
    short = users.add("ci", service_account=True, expires_in=0.2, audit=AUDIT)
    assert users.authenticate(short, "r").user == "ci"
    time.sleep(0.3)
    with pytest.raises(UnauthorizedError, match="expired"):
        users.authenticate(short, "r")
    users.remove("alice", AUDIT)
    with pytest.raises(UnauthorizedError):
        users.authenticate(rotated, "r")
    for bad in (None, "", "x" * 5000, "sortie_nope"):
        with pytest.raises(UnauthorizedError):
            users.authenticate(bad, "r")
    assert [a.action for a in users.store.audit_events()] == ["user added", "token rotated", "user added",
                                                               "user removed"]


def test_users_and_workspaces_are_checked(users: Users) -> None:
    with pytest.raises(UsageError, match="not a workspace"):
        users.add("x", workspaces=["nope"], audit=AUDIT)
    with pytest.raises(UsageError, match="role"):
        users.add("x", role="root", audit=AUDIT)
    with pytest.raises(UsageError, match="user name"):
        users.add("Bad Name", audit=AUDIT)
    token = users.add("bob", audit=AUDIT)  # in ml through the config's users list
    assert users.authenticate(token, "r").workspaces == ("ml",)
    with pytest.raises(UsageError, match="exists"):
        users.add("bob", audit=AUDIT)


def test_identity_rules() -> None:
    config = SortieConfig.model_validate({"workspaces": {"ml": {}, "vision": {}}})
    bob = Identity("bob", "user", ("ml",))
    job = type("Job", (), {"workspace": "ml", "user": "alice"})()
    other = type("Job", (), {"workspace": "vision", "user": "carol"})()
    assert bob.can_see(job) and not bob.owns(job) and not bob.can_see(other)
    assert Identity("root", "admin").owns(other)
    assert bob.workspace_for(None, config) == "ml"
    with pytest.raises(ForbiddenError, match="not in workspace vision"):
        bob.workspace_for("vision", config)
    with pytest.raises(Exception, match="no such workspace"):
        bob.workspace_for("nope", config)


def test_the_client_refuses_a_token_over_plain_http_to_another_host() -> None:
    from orchestrator.api_client import check_endpoint

    with pytest.raises(UsageError, match="in the clear"):
        check_endpoint("http://sortie.example.com", insecure=False)
    assert check_endpoint("http://sortie.example.com/", insecure=True) == "http://sortie.example.com"
    assert check_endpoint("https://sortie.example.com", insecure=False)
    assert check_endpoint("http://127.0.0.1:46580", insecure=False)
    assert check_endpoint("http://[::1]:46580", insecure=False)
    with pytest.raises(UsageError):
        check_endpoint("ftp://x", insecure=True)


def _tar(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_a_bad_or_cut_upload_leaves_nothing(tmp_path: Path) -> None:
    from orchestrator.server.uploads import unpack

    archive = tmp_path / "a.tgz"
    good = _tar({"content/a.txt": b"hello"})
    for bad in (good[: len(good) // 2], _tar({"content/../../escape": b"x"}), _tar({"/etc/evil": b"x"}),
                _tar({"other": b"x"})):
        archive.write_bytes(bad)
        with pytest.raises(UsageError):
            unpack(archive, tmp_path / "target")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tgz"]
    archive.write_bytes(good)
    unpack(archive, tmp_path / "target")
    assert (tmp_path / "target" / "content" / "a.txt").read_text() == "hello"


def test_a_pipeline_from_a_client_names_no_server_path(sortie_home: Path) -> None:
    from orchestrator.server.uploads import server_paths
    from orchestrator.spec import Overrides, load_entrypoint

    pipeline = load_entrypoint("echo hi", Overrides(workdir=str(sortie_home)))
    with pytest.raises(UsageError, match="server path may not be named"):
        server_paths(pipeline, sortie_home, Identity("bob", "user", ("ml",)))


def test_the_guard_bounds_bodies_rates_and_trusts_only_its_proxy(users: Users) -> None:
    from fastapi.testclient import TestClient

    from orchestrator.server.app import create_app

    token = users.add("alice", workspaces=["ml"], audit=AUDIT)
    app = create_app(store=users.store, behind_proxy=True)
    client = TestClient(app)
    auth = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/info").status_code == 401
    answer = client.get("/api/v1/info", headers=auth)
    assert answer.status_code == 200 and answer.json()["user"] == "alice"
    assert answer.headers["X-Sortie-Version"] and answer.headers["X-Request-Id"]
    big = client.post("/api/v1/jobs/plan", headers={**auth, "Content-Length": str(2**40)}, content=b"{}")
    assert big.status_code == 413 and "limit" in big.json()["detail"]
    bad = client.post("/api/v1/jobs/cancel", headers=auth, json={"ids": "nope"})
    assert bad.status_code == 400 and "\n" not in bad.json()["detail"] and bad.json()["exit_code"] == 2
    guard = app.state.guard
    assert guard.client_address(_request("127.0.0.1", "203.0.113.9")) == "203.0.113.9"  # a trusted proxy
    assert guard.client_address(_request("198.51.100.7", "203.0.113.9")) == "198.51.100.7"  # anyone else: ignored
    guard.limiter.per_minute = 3
    guard.limiter.buckets.clear()
    codes = [client.get("/api/v1/info", headers=auth).status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[-1] == 429


def _request(peer: str, forwarded: str):
    from starlette.requests import Request

    return Request({"type": "http", "client": (peer, 1234), "headers": [(b"x-forwarded-for", forwarded.encode())],
                    "method": "GET", "path": "/", "query_string": b""})


def test_the_dashboard_is_folded_into_the_server_for_admins(users: Users) -> None:
    from fastapi.testclient import TestClient

    from orchestrator.server.app import create_app

    admin = users.add("root", role="admin", audit=AUDIT)
    user = users.add("alice", workspaces=["ml"], audit=AUDIT)
    client = TestClient(create_app(store=users.store))
    assert client.get("/jobs").status_code == 401
    assert client.get("/jobs", headers={"Authorization": f"Bearer {user}"}).status_code == 403
    assert client.get("/api/jobs", headers={"Authorization": f"Bearer {admin}"}).json()["total"] == 0
    linked = client.get(f"/jobs?token={admin}", follow_redirects=False)
    assert linked.status_code == 303 and "token=" not in linked.headers["location"]
    assert client.get("/jobs").status_code == 200  # the cookie the link set
    assert client.post("/api/jobs/1/cancel", content=b"").status_code == 403  # a page's POST needs the CSRF token
    assert "openapi" in client.get("/api/v1/openapi.json").text


def test_health_and_the_schema_need_no_token(users: Users) -> None:
    from fastapi.testclient import TestClient

    from orchestrator.server.app import create_app

    client = TestClient(create_app(store=users.store))
    assert client.get("/api/v1/health").json()["api"] == 1
    assert client.get("/api/v1/openapi.json").status_code == 200
    assert client.get("/api/v1/jobs/queue").status_code == 401


def test_who_may_see_and_change_a_job_through_the_api(users: Users) -> None:
    """Without a server process or a controller: the service's rules as the routes apply them."""
    from fastapi.testclient import TestClient

    from orchestrator.server.app import create_app

    (users.store.home / "config.yaml").write_text("workspaces:\n  ml: {users: [alice, bob]}\n  vision: {}\n")
    store = StateStore(users.store.home)
    users = Users(store, store.config)
    tokens = {n: users.add(n, workspaces=w, audit=AUDIT) for n, w in (("alice", []), ("bob", []),
                                                                       ("carol", ["vision"]))}
    tokens["root"] = users.add("root", role="admin", audit=AUDIT)
    (job,) = store.submit({"name": "train", "tasks": [{"name": "train", "run": "true"}]}, [{"K": "v"}],
                          user="alice", workspace="ml")
    client = TestClient(create_app(store=store))

    def get(who: str, path: str) -> int:
        return client.get(path, headers={"Authorization": f"Bearer {tokens[who]}"}).status_code

    assert [get(w, f"/api/v1/jobs/{job}/events") for w in ("alice", "bob", "carol", "root")] == [200, 403, 404, 200]
    assert [get(w, f"/api/v1/jobs/{job}/logs") for w in ("bob", "carol")] == [403, 404]
    seen = {w: [r["id"] for r in client.get("/api/v1/jobs/queue?all_users=true&all_jobs=true", headers={
        "Authorization": f"Bearer {tokens[w]}"}).json()] for w in ("bob", "carol", "root")}
    assert seen == {"bob": [job], "carol": [], "root": [job]}
    cancel = client.post("/api/v1/jobs/cancel", json={"ids": [job]},
                         headers={"Authorization": f"Bearer {tokens['bob']}"})
    assert cancel.status_code == 403 and cancel.json()["exit_code"] == 2
    assert store.job(job).status == "PENDING"


def test_an_oidc_token_is_a_user_with_its_groups_role_and_workspaces(sortie_home: Path, tmp_path: Path) -> None:
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig"}]}))
    (sortie_home / "config.yaml").write_text(
        "workspaces: {ml: {}, vision: {}}\napi:\n  oidc:\n    issuer: https://idp.example\n    audience: sortie\n"
        f"    jwks_file: {tmp_path / 'jwks.json'}\n    user_claim: preferred_username\n"
        "    group_roles: {ops: admin}\n    group_workspaces: {ml-team: [ml]}\n")
    store = StateStore(sortie_home)
    users = Users(store, store.config)

    def token(**claims: object) -> str:
        body = {"iss": "https://idp.example", "aud": "sortie", "exp": time.time() + 60,
                "preferred_username": "erin", "groups": ["ml-team"], **claims}
        return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})

    me = users.authenticate(token(), "r")
    assert (me.user, me.role, me.workspaces) == ("erin", "user", ("ml",))
    assert users.authenticate(token(groups=["ops"]), "r").role == "admin"
    for bad in (token(exp=time.time() - 3600), token(aud="other"), token(iss="https://evil.example")):
        with pytest.raises(UnauthorizedError, match="OIDC"):
            users.authenticate(bad, "r")


def test_the_first_admin_adopts_the_platforms_token_file(users: Users, sortie_home: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """In a pod the home does not last: `$SORTIE_ADMIN_TOKEN_FILE` (a mounted Secret) gives the first admin's token,
    which is adopted (only its hash kept) instead of a new one written into the home."""
    given = tmp_path / "admin-token"
    monkeypatch.setenv("SORTIE_ADMIN_TOKEN_FILE", str(given))
    given.write_text("too-short\n")
    with pytest.raises(UsageError, match=r"SORTIE_ADMIN_TOKEN_FILE: .* must hold one token"):
        users.ensure_first_admin(sortie_home)
    assert users.store.api_users() == []  # nothing half-written
    token = "platform-" + "k" * 40
    given.write_text(token + "\n")
    assert users.ensure_first_admin(sortie_home) == given
    assert users.authenticate(token, "r").role == "admin"
    assert not (sortie_home / "secrets" / "admin.token").exists()
    assert users.ensure_first_admin(sortie_home) is None  # an admin exists: nothing more
