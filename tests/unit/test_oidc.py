"""OIDC tokens of a platform's identity provider (issue 23): real keys this test makes (RSA and P-256), a JWKS file
and a JWKS served by a real HTTP server on loopback, real signatures (PyJWT on `cryptography`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from orchestrator.auth import oidc
from orchestrator.auth.oidc import (
    JWKS,
    LEEWAY_SECONDS,
    MAX_JWKS_BYTES,
    OidcConfig,
    OidcError,
    OidcIdentity,
    looks_like_jwt,
    verify_oidc_token,
)
from orchestrator.errors import SortieError

ISSUER = "https://idp.example.com/realms/ml"
AUDIENCE = "sortie"
NOW = 1_900_000_000.0


@dataclass
class Signer:
    """A key pair of the test's identity provider."""

    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        out: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**out, "kid": self.kid, "use": "sig"}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid, **header})


def rsa_signer(kid: str = "rsa-1") -> Signer:
    return Signer(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_signer(kid: str = "ec-1") -> Signer:
    return Signer(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def rsa_key() -> Signer:
    return rsa_signer()


@pytest.fixture(scope="module")
def ec_key() -> Signer:
    return ec_signer()


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    JWKS.clear()
    yield
    JWKS.clear()


def jwks(*signers: Signer) -> bytes:
    return json.dumps({"keys": [s.jwk() for s in signers]}).encode()


@pytest.fixture
def jwks_file(tmp_path: Path, rsa_key: Signer, ec_key: Signer) -> Path:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(rsa_key, ec_key))
    return path


def config(jwks_file: Path | None = None, **extra: Any) -> OidcConfig:
    data: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "user_claim": "preferred_username",
                            "group_roles": {"platform-admins": "admin", "ml-team": "user"},
                            "group_workspaces": {"ml-team": ["ml"], "vision-team": ["vision", "shared"],
                                                 "platform-admins": ["shared"]}, **extra}
    if jwks_file is not None:
        data["jwks_file"] = str(jwks_file)
    return OidcConfig.from_mapping(data)


def claims(**over: Any) -> dict[str, Any]:
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "0b5e-42", "preferred_username": "alice",
            "groups": ["ml-team"], "iat": int(NOW) - 10, "exp": int(NOW) + 300}
    return {k: v for k, v in {**base, **over}.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def refused(token: str, cfg: OidcConfig, match: str, now: float = NOW) -> str:
    with pytest.raises(OidcError, match=match) as caught:
        verify_oidc_token(token, cfg, now=now)
    line = str(caught.value)
    assert "\n" not in line and token not in line
    return line


# --- what passes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["rsa", "ec"])
def test_a_valid_token_names_its_user(jwks_file: Path, rsa_key: Signer, ec_key: Signer, which: str) -> None:
    signer = rsa_key if which == "rsa" else ec_key
    identity = verify_oidc_token(signer.sign(claims()), config(jwks_file), now=NOW)
    assert identity == OidcIdentity(user="alice", groups=["ml-team"], role="user", workspaces=["ml"])


def test_the_audience_may_be_a_list_and_the_clock_has_leeway(jwks_file: Path, rsa_key: Signer) -> None:
    token = rsa_key.sign(claims(aud=["other-app", AUDIENCE], exp=int(NOW) - LEEWAY_SECONDS + 5,
                                iat=int(NOW) + LEEWAY_SECONDS - 5, nbf=int(NOW) + 30))
    assert verify_oidc_token(token, config(jwks_file), now=NOW).user == "alice"


def test_groups_map_to_a_role_and_workspaces(jwks_file: Path, rsa_key: Signer) -> None:
    cfg = config(jwks_file)
    admin = verify_oidc_token(rsa_key.sign(claims(groups=["vision-team", "platform-admins", "unmapped"])), cfg,
                              now=NOW)
    assert admin.role == "admin" and admin.workspaces == ["shared", "vision"]
    assert admin.groups == ["vision-team", "platform-admins", "unmapped"]
    one = verify_oidc_token(rsa_key.sign(claims(groups="vision-team")), cfg, now=NOW)  # one group, as a string
    assert (one.role, one.workspaces) == ("user", ["shared", "vision"])
    none = verify_oidc_token(rsa_key.sign(claims(groups=None)), cfg, now=NOW)
    assert (none.role, none.groups, none.workspaces) == ("user", [], [])
    custom = config(jwks_file, groups_claim="roles", user_claim="sub")
    who = verify_oidc_token(rsa_key.sign(claims(roles=["platform-admins"])), custom, now=NOW)
    assert (who.user, who.role, who.workspaces) == ("0b5e-42", "admin", ["shared"])


def test_a_token_without_kid_uses_the_only_key(tmp_path: Path, rsa_key: Signer) -> None:
    path = tmp_path / "one.json"
    key = {k: v for k, v in rsa_key.jwk().items() if k != "kid"}
    path.write_text(json.dumps({"keys": [key]}))
    token = jwt.encode(claims(), rsa_key.private, algorithm="RS256")
    assert verify_oidc_token(token, config(path), now=NOW).user == "alice"


# --- what is refused ------------------------------------------------------------------------------------------


def test_an_expired_token(jwks_file: Path, rsa_key: Signer) -> None:
    refused(rsa_key.sign(claims(exp=int(NOW) - LEEWAY_SECONDS - 1)), config(jwks_file), "expired")
    token = rsa_key.sign(claims(exp=int(time.time()) - 3600))  # and against the real clock
    with pytest.raises(OidcError, match="expired"):
        verify_oidc_token(token, config(jwks_file))


def test_times_in_the_future_and_a_token_that_never_expires(jwks_file: Path, rsa_key: Signer) -> None:
    cfg = config(jwks_file)
    refused(rsa_key.sign(claims(nbf=int(NOW) + LEEWAY_SECONDS + 60)), cfg, "not valid yet")
    refused(rsa_key.sign(claims(iat=int(NOW) + LEEWAY_SECONDS + 60)), cfg, "issued in the future")
    refused(rsa_key.sign(claims(exp=None)), cfg, "no 'exp' claim")
    refused(rsa_key.sign(claims(exp="tomorrow")), cfg, "'exp' claim is not a number")


def test_a_wrong_audience(jwks_file: Path, rsa_key: Signer) -> None:
    cfg = config(jwks_file)
    refused(rsa_key.sign(claims(aud="another-app")), cfg, "audience is not 'sortie'")
    refused(rsa_key.sign(claims(aud=["a", "b"])), cfg, "audience")
    refused(rsa_key.sign(claims(aud=None)), cfg, "no 'aud' claim")


def test_a_wrong_issuer(jwks_file: Path, rsa_key: Signer) -> None:
    cfg = config(jwks_file)
    refused(rsa_key.sign(claims(iss="https://evil.example.com/realms/ml")), cfg, "another issuer")
    refused(rsa_key.sign(claims(iss=None)), cfg, "no 'iss' claim")


def test_an_unsigned_token(jwks_file: Path, rsa_key: Signer) -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": rsa_key.kid}).encode())
    body = b64(json.dumps(claims()).encode())
    for token in (f"{header}.{body}.", f"{header}.{body}.c2ln"):
        refused(token, config(jwks_file), "algorithm 'none' is refused")


def test_an_hmac_token_keyed_with_the_public_key(jwks_file: Path, rsa_key: Signer) -> None:
    """The classic confusion: HS256 with the provider's public key (which anyone has) as the shared secret."""
    public_pem = rsa_key.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}).encode())
    body = b64(json.dumps(claims()).encode())
    mac = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    refused(f"{header}.{body}.{b64(mac)}", config(jwks_file), "algorithm 'HS256' is refused")


def test_a_token_signed_by_another_key(jwks_file: Path, rsa_key: Signer) -> None:
    cfg = config(jwks_file)
    impostor = Signer(rsa_key.kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    refused(impostor.sign(claims()), cfg, "signature does not verify")
    refused(rsa_signer("rsa-unknown").sign(claims()), cfg, "kid.* not in the provider's JWKS")
    ec_as_rsa = Signer(rsa_key.kid, "ES256", ec.generate_private_key(ec.SECP256R1()))  # the RSA key's kid
    refused(ec_as_rsa.sign(claims()), cfg, "says ES256 but its key is an RSA key")


def test_a_tampered_token(jwks_file: Path, rsa_key: Signer) -> None:
    header, _body, signature = rsa_key.sign(claims()).split(".")
    forged = b64(json.dumps(claims(preferred_username="admin", groups=["platform-admins"])).encode())
    refused(f"{header}.{forged}.{signature}", config(jwks_file), "signature does not verify")


def test_a_missing_or_bad_user_claim(jwks_file: Path, rsa_key: Signer) -> None:
    cfg = config(jwks_file)
    refused(rsa_key.sign(claims(preferred_username=None)), cfg, "claim 'preferred_username'.* missing")
    for bad in ("", "al\nice", " alice", "x" * 300, 42, ["alice"]):
        refused(rsa_key.sign(claims(preferred_username=bad)), cfg, "preferred_username")
    refused(rsa_key.sign(claims(groups={"ml-team": True})), cfg, "groups_claim")
    refused(rsa_key.sign(claims(groups=["g"] * 1000)), cfg, "at most 256 groups")


def test_not_a_jwt_at_all(jwks_file: Path) -> None:
    cfg = config(jwks_file)
    for token in ("sortie_abcdef0123456789", "a.b.c", "x" * (oidc.MAX_TOKEN_BYTES + 1)):
        refused(token, cfg, "not a JWT|over")
    assert not looks_like_jwt("sortie_abcdef0123456789") and not looks_like_jwt("a.b")
    assert looks_like_jwt(rsa_signer().sign(claims()))


def test_a_key_whose_jwk_declares_another_algorithm(tmp_path: Path, rsa_key: Signer) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**rsa_key.jwk(), "alg": "PS256"}]}))
    refused(rsa_key.sign(claims()), config(path), "says RS256 but its key is for PS256")


# --- the config -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "message"), [
    ({"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "/j.json", "client_secret": "x"},
     "api.oidc.client_secret: "),
    ({"issuer": ISSUER, "audience": AUDIENCE}, "exactly one of jwks_url and jwks_file"),
    ({"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "/j.json", "jwks_url": "https://i/j"}, "exactly one"),
    ({"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": "http://idp.example.com/certs"}, "https://"),
    ({"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json"}, "absolute path"),
    ({"audience": AUDIENCE, "jwks_file": "/j.json"}, "api.oidc.issuer: "),
    ({"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "/j.json", "group_roles": {"g": "root"}},
     "api.oidc.group_roles.g: "),
    ("issuer: x", "must be a mapping"),
])
def test_bad_config_is_one_line_naming_the_key(data: Any, message: str) -> None:
    with pytest.raises(OidcError) as caught:
        OidcConfig.from_mapping(data)
    line = str(caught.value)
    assert message in line and "\n" not in line, line
    assert isinstance(caught.value, SortieError)


def test_http_is_allowed_only_to_loopback() -> None:
    for url in ("http://127.0.0.1:8080/jwks", "http://localhost/jwks", "http://[::1]/jwks", "https://idp/jwks"):
        assert OidcConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url=url).jwks_url == url


def test_a_bad_jwks_file(tmp_path: Path, rsa_key: Signer) -> None:
    token = rsa_key.sign(claims())
    path = tmp_path / "jwks.json"
    refused(token, config(path), "cannot be read")
    for content, match in ((b"{", "not JSON"), (b'{"k": 1}', "no \"keys\" list"),
                           (json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).encode(), "no signing key"),
                           (b" " * (MAX_JWKS_BYTES + 1), "over")):
        JWKS.clear()
        path.write_bytes(content)
        refused(token, config(path), match)


# --- a JWKS served over HTTP ----------------------------------------------------------------------------------


@dataclass
class Provider:
    """A JWKS endpoint on loopback; `body` is what it serves, `hits` how often it was asked."""

    body: bytes = b""
    status: int = 200
    location: str | None = None
    hits: list[str] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def provider() -> Iterator[Provider]:
    state = Provider()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits.append(self.path)
            self.send_response(state.status)
            if state.location:
                self.send_header("Location", state.location)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/certs"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def url_config(provider: Provider) -> OidcConfig:
    return config(None, jwks_url=provider.url)


def test_the_jwks_is_fetched_cached_and_refetched_on_a_new_kid(provider: Provider, rsa_key: Signer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(JWKS, "clock", lambda: clock[0])
    provider.body = jwks(rsa_key)
    cfg = url_config(provider)
    for _ in range(3):
        assert verify_oidc_token(rsa_key.sign(claims()), cfg, now=NOW).user == "alice"
    assert len(provider.hits) == 1  # cached

    rotated = rsa_signer("rsa-2")  # the provider rotates: a token with the new kid refetches once
    provider.body = jwks(rsa_key, rotated)
    clock[0] += 1
    assert verify_oidc_token(rotated.sign(claims()), cfg, now=NOW).user == "alice"
    assert len(provider.hits) == 2

    stranger = rsa_signer("made-up")  # unknown kids right after: no new fetch (the cooldown)
    for _ in range(5):
        refused(stranger.sign(claims()), cfg, "not in the provider's JWKS")
    assert len(provider.hits) == 2
    clock[0] += oidc.REFETCH_COOLDOWN_SECONDS + 1  # after it, one more try
    refused(stranger.sign(claims()), cfg, "not in the provider's JWKS")
    assert len(provider.hits) == 3

    clock[0] += oidc.JWKS_TTL_SECONDS + 1  # past the TTL: fetched again, a dropped key stops working
    provider.body = jwks(rotated)
    refused(rsa_key.sign(claims()), cfg, "not in the provider's JWKS")
    assert verify_oidc_token(rotated.sign(claims()), cfg, now=NOW).user == "alice"
    assert len(provider.hits) == 4


@pytest.mark.parametrize(("status", "body", "location", "match"), [
    (500, b"oops", None, "answered HTTP 500"),
    (200, b"x" * (MAX_JWKS_BYTES + 10), None, f"more than {MAX_JWKS_BYTES} bytes"),
    (302, b"", "http://evil.example.com/certs", "answered a redirect"),
    (200, b"<html>", None, "not JSON"),
])
def test_a_provider_that_answers_badly(provider: Provider, rsa_key: Signer, status: int, body: bytes,
                                       location: str | None, match: str) -> None:
    provider.status, provider.body, provider.location = status, body, location
    refused(rsa_key.sign(claims()), url_config(provider), match)


def test_a_provider_that_is_down(rsa_key: Signer) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = config(None, jwks_url=f"http://127.0.0.1:{port}/certs")
    refused(rsa_key.sign(claims()), cfg, "could not be fetched")
