"""Who may use the dashboard. On loopback (the default) anyone on this machine may, and the Host header must
name the loopback (no DNS rebinding), with any port (issue 28: not compared with the dashboard's own, which an SSH
tunnel's local port differs from; a rebinding page's Host is its own name, refused whatever the port). Bound to any
other address, every request needs the token (a bearer header, or the cookie that the `?token=` link sets); 401
otherwise. Requests that change state are POSTs and carry the CSRF token in `X-CSRF-Token` (pages read it from a
meta tag, scripts from GET /api/csrf), unless they authenticate with the bearer header, which a browser never adds
by itself."""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

TOKEN_COOKIE = "sortie_dashboard_token"
CSRF_HEADER = "x-csrf-token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_LOOPBACK_HOST_HEADER = re.compile(r"(localhost|127(?:\.\d{1,3}){3}|\[::1\])(?::(\d{1,5}))?")


def loopback_host_header(value: str) -> bool:
    """Whether a Host header is exactly a loopback name, with at most a port (issue 17: `evil.example@127.0.0.1`,
    `127.0.0.1.evil.example` and anything with userinfo, paths or spaces are refused)."""
    match = _LOOPBACK_HOST_HEADER.fullmatch(value)
    if match is None:
        return False
    if match.group(1).startswith("127.") and not all(0 <= int(p) <= 255 for p in match.group(1).split(".")):
        return False
    return match.group(2) is None or 0 < int(match.group(2)) <= 65535


def token_path(home: Path) -> Path:
    return home / "dashboard" / "token"


def load_or_create_token(home: Path) -> tuple[str, bool]:
    """The dashboard's token, and whether it was made now (it is shown only then). Stored 0600."""
    path = token_path(home)
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token, True


@dataclass
class Guard:
    """The checks every request goes through (see the module docstring)."""

    token: str | None
    loopback_only: bool
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def _same(self, given: str | None, expected: str | None) -> bool:
        return bool(given and expected) and hmac.compare_digest(given.encode(), expected.encode())  # type: ignore[union-attr]

    def bearer(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else None

    async def __call__(self, request: Request, call_next) -> Response:
        if self.loopback_only and not loopback_host_header(request.headers.get("host") or ""):
            return JSONResponse({"detail": "the dashboard answers only to a loopback Host"}, status_code=403)
        by_header = False
        if self.token is not None:
            by_header = self._same(self.bearer(request), self.token)
            by_cookie = self._same(request.cookies.get(TOKEN_COOKIE), self.token)
            by_link = request.method == "GET" and self._same(request.query_params.get("token"), self.token)
            if by_link and not by_header:  # the printed link: keep the token in a cookie, drop it from the URL
                response = RedirectResponse(request.url.remove_query_params("token").path or "/", status_code=303)
                response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
                return response
            if not (by_header or by_cookie):
                return JSONResponse({"detail": "a token is required (Authorization: Bearer TOKEN)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if request.method not in SAFE_METHODS and not by_header:
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                return JSONResponse({"detail": "cross-origin request refused"}, status_code=403)
            if not self._same(request.headers.get(CSRF_HEADER), self.csrf):
                return JSONResponse({"detail": "missing or wrong X-CSRF-Token (GET /api/csrf)"}, status_code=403)
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:")
        return response
