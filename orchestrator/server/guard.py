"""What every request of the API server goes through: a request id, the body bound, the token (401), the per-token rate
limit (429), the client's address (behind a trusted proxy, `X-Forwarded-For`), and errors as one JSON line with the
CLI's exit code, never a traceback."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orchestrator import __version__
from orchestrator.auth.identity import ForbiddenError, UnauthorizedError
from orchestrator.errors import SortieError, UsageError
from orchestrator.server import API_HEADER, API_VERSION, VERSION_HEADER

if TYPE_CHECKING:
    from orchestrator.auth.users import Users

log = logging.getLogger("sortie.api")
OPEN_PATHS = {"/api/v1/health", "/api/v1/version", "/api/v1/openapi.json", "/api/v1/docs"}
DASHBOARD_COOKIE = "sortie_dashboard_token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def error_response(status: int, line: str, exit_code: int, request_id: str = "") -> JSONResponse:
    return JSONResponse({"detail": line.splitlines()[0] if line else "error", "exit_code": exit_code},
                        status_code=status, headers={"X-Request-Id": request_id})


def status_of(exc: SortieError) -> int:
    from orchestrator.service import UnknownJobError

    if isinstance(exc, UnauthorizedError):
        return 401
    if isinstance(exc, ForbiddenError):
        return 403
    if isinstance(exc, UnknownJobError):
        return 404
    if isinstance(exc, UsageError):
        return 400
    return 422


@dataclass
class RateLimiter:
    """A token bucket per API token: `per_minute` requests, refilled continuously."""

    per_minute: int
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self, key: str, now: float | None = None) -> bool:
        now = now or time.monotonic()
        rate = self.per_minute / 60.0
        with self.lock:
            level, at = self.buckets.get(key, (float(self.per_minute), now))
            level = min(float(self.per_minute), level + (now - at) * rate)
            if level < 1:
                self.buckets[key] = (level, now)
                return False
            self.buckets[key] = (level - 1, now)
            if len(self.buckets) > 100_000:  # bounded: forget the oldest
                for old in sorted(self.buckets, key=lambda k: self.buckets[k][1])[:50_000]:
                    del self.buckets[old]
            return True


@dataclass
class ApiGuard:
    users: Users
    max_body: int
    limiter: RateLimiter
    behind_proxy: bool = False
    trusted_proxies: tuple[str, ...] = ()
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # the folded dashboard's pages' POSTs

    async def _dashboard(self, request: Request, request_id: str) -> Response | None:
        """The dashboard folded into the server: admins only (its pages list every workspace), by bearer token or by
        the cookie its `?token=` link sets; a POST from a page carries the CSRF token."""
        from starlette.responses import RedirectResponse

        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header.lower().startswith("bearer ") else None
        link = request.query_params.get("token") if request.method == "GET" else None
        token = bearer or link or request.cookies.get(DASHBOARD_COOKIE)
        try:
            identity = await run_in_threadpool(self.users.authenticate, token, request_id)
        except UnauthorizedError as exc:
            return error_response(401, str(exc), 1, request_id)
        if not identity.admin:
            return error_response(403, "the dashboard is for admins; use `sortie jobs queue`", 2, request_id)
        if link and not bearer:
            response = RedirectResponse(request.url.remove_query_params("token").path or "/", status_code=303)
            response.set_cookie(DASHBOARD_COOKIE, link, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
            return response
        if request.method not in SAFE_METHODS and not bearer and not hmac.compare_digest(
                request.headers.get("x-csrf-token", "").encode(), self.csrf.encode()):
            return error_response(403, "missing or wrong X-CSRF-Token (GET /api/csrf)", 2, request_id)
        request.state.identity = identity
        return None

    def client_address(self, request: Request) -> str:
        peer = request.client.host if request.client else ""
        if self.behind_proxy and peer in self.trusted_proxies:
            forwarded = request.headers.get("x-forwarded-for", "")
            if forwarded:
                return forwarded.split(",")[-1].strip()[:64]
        return peer

    async def __call__(self, request: Request, call_next: Any) -> Response:
        request_id = secrets.token_hex(8)
        request.state.request_id = request_id
        path = request.url.path
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return error_response(413, f"the request body is over the server's limit of "
                                  f"{self.max_body // (1024 * 1024)} MiB (api.max_body_mb)", 2, request_id)
        if length is None and request.method in ("POST", "PUT", "PATCH") and path != "/api/v1/uploads":
            return error_response(411, "a request body needs a Content-Length", 2, request_id)
        if path.startswith("/api/v1/") and path not in OPEN_PATHS:
            header = request.headers.get("authorization", "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else None
            if token and not self.limiter.allow(hashlib.sha256(token.encode()).hexdigest()):
                return error_response(429, "too many requests for this token; wait and retry", 1, request_id)
            try:
                request.state.identity = await run_in_threadpool(self.users.authenticate, token, request_id)
            except UnauthorizedError as exc:
                return error_response(401, str(exc), 1, request_id)
        elif path not in OPEN_PATHS and not path.startswith("/static/"):
            refused = await self._dashboard(request, request_id)
            if refused is not None:
                return refused
        try:
            response = await call_next(request)
        except SortieError as exc:  # raised outside a route (a streaming body): still one line
            response = error_response(status_of(exc), str(exc), exc.exit_code, request_id)
        except Exception as exc:  # never a traceback to the client; the server's log has the type
            log.error("request %s %s failed: %s", request_id, path, type(exc).__name__)
            response = error_response(500, f"internal error ({type(exc).__name__}); request id {request_id}", 1,
                                      request_id)
        response.headers[VERSION_HEADER] = __version__
        response.headers[API_HEADER] = str(API_VERSION)
        response.headers["X-Request-Id"] = request_id
        if self.behind_proxy or request.url.scheme == "https":
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response
