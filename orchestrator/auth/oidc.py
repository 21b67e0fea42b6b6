"""OIDC: the API server accepts a JWT from a platform's own identity provider (issue 23, `api.oidc` of the
server's config) and maps the token's groups to a Sortie role and workspaces.

    api:
      oidc:
        issuer: https://idp.example.com/realms/ml
        audience: sortie
        jwks_url: https://idp.example.com/realms/ml/protocol/openid-connect/certs   # or jwks_file: /etc/...
        user_claim: preferred_username      # default: sub
        groups_claim: groups                # default: groups
        group_roles: {platform-admins: admin}
        group_workspaces: {ml-team: [ml], vision-team: [vision]}

What a token must be to pass `verify_oidc_token`: a JWS signed with an asymmetric algorithm (RSA, RSA-PSS, ECDSA
or EdDSA; never `none`, never HMAC, whose "secret" would be the public key) by a key of the issuer's JWKS, found by
its `kid`; `iss` the configured issuer, `aud` (a string or a list) holding the configured audience; `exp` in the
future and `nbf`/`iat` not in it, with `LEEWAY_SECONDS` for clocks; the user claim a short printable string.

The JWKS is fetched over HTTPS (plain HTTP only from a loopback host), at most `MAX_JWKS_BYTES` within
`FETCH_TIMEOUT_SECONDS`, no redirects, and cached for `JWKS_TTL_SECONDS`. A token whose `kid` the cached set lacks
(the provider rotated its keys) refetches it once; such refetches are at most one per `REFETCH_COOLDOWN_SECONDS`,
so a stream of made-up `kid`s cannot turn the server into a flood of requests to the provider.

Signatures are PyJWT's (on `cryptography`); nothing here does cryptography by hand.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import jwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.errors import SortieError

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}  # an algorithm's key type (JWK `kty`)
LEEWAY_SECONDS = 60
MAX_TOKEN_BYTES = 16 * 1024
MAX_JWKS_BYTES = 256 * 1024
MAX_JWKS_KEYS = 64
MAX_GROUPS = 256
MAX_NAME_CHARS = 256  # a user or group name from a token
FETCH_TIMEOUT_SECONDS = 5.0
JWKS_TTL_SECONDS = 300.0
REFETCH_COOLDOWN_SECONDS = 10.0
CONFIG_KEY = "api.oidc"

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]


class OidcError(SortieError):
    """A token the server does not accept, or an OIDC setting or JWKS it cannot use; one line, never the token."""


class OidcConfig(BaseModel):
    """`api.oidc` of the server's config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: Annotated[str, Field(min_length=1, max_length=2048,
                                 description="The `iss` every token must carry, exactly (the provider's issuer URL).")]
    audience: Annotated[str, Field(min_length=1, max_length=2048,
                                   description="The `aud` (or one of them) every token must carry: Sortie's client "
                                               "id at the provider.")]
    jwks_url: Annotated[str | None, Field(max_length=2048, description="Where the provider publishes its keys "
                                                                        "(HTTPS; HTTP only on loopback).")] = None
    jwks_file: Annotated[Path | None, Field(description="The provider's keys as a JWKS file (an absolute path), "
                                                        "instead of jwks_url.")] = None
    user_claim: Annotated[str, Field(min_length=1, max_length=128,
                                     description="The claim naming the user (sub, email, preferred_username).")] = "sub"
    groups_claim: Annotated[str, Field(min_length=1, max_length=128,
                                       description="The claim listing the user's groups.")] = "groups"
    group_roles: Annotated[dict[Name, Literal["admin", "user"]],
                           Field(description="A group's role; a member of any admin group is an admin.")] = {}
    group_workspaces: Annotated[dict[Name, list[Name]],
                                Field(description="The workspaces a group's members belong to.")] = {}

    @model_validator(mode="after")
    def _one_key_source(self) -> OidcConfig:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("give exactly one of jwks_url and jwks_file")
        if self.jwks_url is not None:
            check_jwks_url(self.jwks_url)
        if self.jwks_file is not None and not self.jwks_file.is_absolute():
            raise ValueError(f"jwks_file must be an absolute path (got {str(self.jwks_file)!r})")
        return self

    @classmethod
    def from_mapping(cls, data: Any) -> OidcConfig:
        """The config from `api.oidc` as read from YAML, or an OidcError naming the first bad key."""
        from orchestrator.spec.errors import problems_from

        if not isinstance(data, Mapping):
            raise OidcError(f"{CONFIG_KEY}: must be a mapping (issuer, audience, jwks_url or jwks_file, ...)")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise OidcError(problems_from(exc, CONFIG_KEY)[0]) from None


@dataclass(frozen=True)
class OidcIdentity:
    """Who a verified token names, and what its groups give them."""

    user: str
    groups: list[str]
    role: str  # "admin" | "user"
    workspaces: list[str]


def check_jwks_url(url: str) -> None:
    """HTTPS, or HTTP to a loopback host (a provider on the same machine, or a test's)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise ValueError(f"jwks_url must be an https:// URL (plain http only to a loopback host), got {url!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated base64url parts: a JWT, not a Sortie token (the server picks the check by this)."""
    parts = token.split(".")
    return len(parts) == 3 and all(parts[:2]) and all(_is_b64url(p) for p in parts)


def _is_b64url(part: str) -> bool:
    return all(c.isascii() and (c.isalnum() or c in "-_") for c in part)


# --- the provider's keys --------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise OidcError(f"{CONFIG_KEY}.jwks_url answered a redirect ({code}); give the URL it redirects to")


def _read_jwks_url(url: str) -> bytes:
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "sortie-oidc"})
    try:
        with opener.open(request, timeout=FETCH_TIMEOUT_SECONDS) as response:
            body: bytes = response.read(MAX_JWKS_BYTES + 1)
    except OidcError:
        raise
    except urllib.error.HTTPError as exc:
        raise OidcError(f"{CONFIG_KEY}.jwks_url answered HTTP {exc.code}; check the URL and the provider") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc.__class__.__name__
        raise OidcError(f"{CONFIG_KEY}.jwks_url could not be fetched ({reason}); check the URL and the "
                        "provider") from None
    if len(body) > MAX_JWKS_BYTES:
        raise OidcError(f"{CONFIG_KEY}.jwks_url answered more than {MAX_JWKS_BYTES} bytes: not a JWKS")
    return body


def _read_jwks_file(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            body = fh.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise OidcError(f"{CONFIG_KEY}.jwks_file {path} cannot be read ({exc.strerror or exc.__class__.__name__})"
                        ) from None
    if len(body) > MAX_JWKS_BYTES:
        raise OidcError(f"{CONFIG_KEY}.jwks_file {path} is over {MAX_JWKS_BYTES} bytes: not a JWKS")
    return body


@dataclass(frozen=True)
class SigningKey:
    key: jwt.PyJWK
    alg: str | None  # the JWK's own "alg", when it declares one


def parse_jwks(body: bytes, source: str) -> dict[str | None, SigningKey]:
    """The signing keys of a JWKS document, by `kid` (None for a key without one). Symmetric (`oct`) keys, keys of
    types PyJWT does not know and encryption keys are skipped, as RFC 7517 lets a reader do; a document with no
    usable key is an error."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise OidcError(f"{source} is not JSON: not a JWKS") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise OidcError(f"{source} has no \"keys\" list: not a JWKS")
    found: dict[str | None, SigningKey] = {}
    for item in keys[:MAX_JWKS_KEYS]:
        if not isinstance(item, dict) or item.get("use", "sig") != "sig" or item.get("kty") == "oct":
            continue
        try:
            key = jwt.PyJWK(item)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue
        kid, alg = item.get("kid"), item.get("alg")
        found[kid if isinstance(kid, str) else None] = SigningKey(key, alg if isinstance(alg, str) else None)
    if not found:
        raise OidcError(f"{source} holds no signing key this server can use (RSA, EC or OKP)")
    return found


@dataclass
class _Entry:
    keys: dict[str | None, SigningKey]
    fetched: float
    refetched: float = float("-inf")  # the last refetch an unknown kid asked for


class JwksCache:
    """Each key source's keys, for `ttl` seconds; `clock` is monotonic."""

    def __init__(self, ttl: float = JWKS_TTL_SECONDS, cooldown: float = REFETCH_COOLDOWN_SECONDS,
                 clock: Any = time.monotonic) -> None:
        self.ttl, self.cooldown, self.clock = ttl, cooldown, clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def key_for(self, config: OidcConfig, kid: str | None) -> SigningKey:
        """The key `kid` names (or the only key, for a token without a kid)."""
        source = config.jwks_url or str(config.jwks_file)
        with self._lock:  # one fetch at a time; the others wait for its answer
            now = self.clock()
            entry = self._entries.get(source)
            fresh = entry is None or now - entry.fetched > self.ttl
            if entry is None or fresh:
                entry = self._entries[source] = _Entry(_load(config), now)
            key = _pick(entry.keys, kid)
            if key is None and not fresh and now - entry.refetched > self.cooldown:
                entry = self._entries[source] = _Entry(_load(config), now, refetched=now)
                key = _pick(entry.keys, kid)
        if key is None:
            raise OidcError("the token's signing key (kid) is not in the provider's JWKS; log in again")
        return key


def _load(config: OidcConfig) -> dict[str | None, SigningKey]:
    if config.jwks_url:
        return parse_jwks(_read_jwks_url(config.jwks_url), f"{CONFIG_KEY}.jwks_url")
    assert config.jwks_file is not None
    return parse_jwks(_read_jwks_file(config.jwks_file), f"{CONFIG_KEY}.jwks_file {config.jwks_file}")


def _pick(keys: dict[str | None, SigningKey], kid: str | None) -> SigningKey | None:
    if kid is not None:
        return keys.get(kid)
    return next(iter(keys.values())) if len(keys) == 1 else None


JWKS = JwksCache()


# --- the token ------------------------------------------------------------------------------------------------


def verify_oidc_token(token: str, config: OidcConfig, now: float | None = None) -> OidcIdentity:
    """The identity a token of the configured provider names, or an OidcError saying why it is refused."""
    claims = _verified_claims(token, config)
    _check_times(claims, time.time() if now is None else now)
    user = _name(claims.get(config.user_claim), f"claim {config.user_claim!r} (api.oidc.user_claim)")
    groups = _groups(claims.get(config.groups_claim), config.groups_claim)
    role = "admin" if any(config.group_roles.get(g) == "admin" for g in groups) else "user"
    workspaces = sorted({w for g in groups for w in config.group_workspaces.get(g, [])})
    return OidcIdentity(user=user, groups=groups, role=role, workspaces=workspaces)


def _verified_claims(token: str, config: OidcConfig) -> dict[str, Any]:
    if len(token) > MAX_TOKEN_BYTES:
        raise OidcError(f"the token is over {MAX_TOKEN_BYTES} bytes: not an ID or access token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise OidcError("the token is not a JWT") from None
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        shown = alg if isinstance(alg, str) and len(alg) <= 16 else "?"
        raise OidcError(f"the token's algorithm {shown!r} is refused: only signed tokens ({', '.join(ALGORITHMS)})")
    kid = header.get("kid")
    found = JWKS.key_for(config, kid if isinstance(kid, str) else None)
    if found.alg is not None and found.alg != alg:
        raise OidcError(f"the token says {alg} but its key is for {found.alg}")
    if found.key.key_type != KEY_TYPES[alg[:2]]:
        raise OidcError(f"the token says {alg} but its key is an {found.key.key_type} key")
    try:
        return jwt.decode(token, found.key.key, algorithms=[alg], audience=config.audience, issuer=config.issuer,
                          options={"require": ["exp", "iss", "aud"], "verify_exp": False, "verify_nbf": False,
                                   "verify_iat": False})
    except jwt.InvalidAudienceError:
        raise OidcError(f"the token is not for this server: its audience is not {config.audience!r}") from None
    except jwt.InvalidIssuerError:
        raise OidcError(f"the token is from another issuer, not {config.issuer!r}") from None
    except jwt.MissingRequiredClaimError as exc:
        raise OidcError(f"the token has no {exc.claim!r} claim") from None
    except (jwt.InvalidSignatureError, jwt.InvalidKeyError, jwt.InvalidAlgorithmError, TypeError, ValueError):
        raise OidcError("the token's signature does not verify with the provider's key") from None
    except jwt.PyJWTError as exc:
        raise OidcError(f"the token is malformed ({exc.__class__.__name__})") from None


def _check_times(claims: Mapping[str, Any], now: float) -> None:
    def number(name: str) -> float | None:
        value = claims.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OidcError(f"the token's {name!r} claim is not a number")
        return float(value)

    exp, nbf, iat = number("exp"), number("nbf"), number("iat")
    if exp is not None and now > exp + LEEWAY_SECONDS:
        raise OidcError("the token has expired; log in again")
    if nbf is not None and nbf > now + LEEWAY_SECONDS:
        raise OidcError("the token is not valid yet (nbf); check this server's clock")
    if iat is not None and iat > now + LEEWAY_SECONDS:
        raise OidcError("the token was issued in the future (iat); check this server's clock")


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or not value.isprintable() or len(value) > MAX_NAME_CHARS \
            or value != value.strip():
        raise OidcError(f"the token's {what} is missing or not a name (a printable string of at most "
                        f"{MAX_NAME_CHARS} characters)")
    return value


def _groups(value: Any, claim: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_GROUPS:
        raise OidcError(f"the token's claim {claim!r} (api.oidc.groups_claim) is not a list of at most "
                        f"{MAX_GROUPS} groups")
    return list(dict.fromkeys(_name(g, f"group in {claim!r}") for g in value))
