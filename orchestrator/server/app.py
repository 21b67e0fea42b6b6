"""The API server's FastAPI app for one server home: the guard, `/api/v1`, and errors as one JSON line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from orchestrator import __version__
from orchestrator.errors import SortieError
from orchestrator.server.guard import ApiGuard, RateLimiter, error_response, status_of

if TYPE_CHECKING:
    from state.store import StateStore


def create_app(home: Path | None = None, *, behind_proxy: bool = False, store: StateStore | None = None) -> FastAPI:
    from orchestrator.auth.users import Users
    from orchestrator.server import admin_routes, routes
    from state.store import StateStore

    store = store or StateStore(home)
    config = store.config
    app = FastAPI(title="Sortie API", version=__version__, openapi_url="/api/v1/openapi.json",
                  docs_url="/api/v1/docs", redoc_url=None,
                  description="Managed jobs and pools for teams: send `Authorization: Bearer TOKEN` "
                              "(`sortie users add`, `sortie api login`).")
    guard = ApiGuard(users=Users(store, config), max_body=config.api.max_body_mb * 1024 * 1024,
                     limiter=RateLimiter(config.api.rate_limit_per_minute), behind_proxy=behind_proxy,
                     trusted_proxies=tuple(config.api.trusted_proxies))
    app.state.store = store
    app.state.guard = guard
    app.middleware("http")(guard)
    app.include_router(routes.router)
    app.include_router(admin_routes.router)
    _fold_dashboard(app)

    @app.exception_handler(SortieError)
    async def sortie_error(request: Request, exc: SortieError) -> JSONResponse:
        return error_response(status_of(exc), str(exc), exc.exit_code, getattr(request.state, "request_id", ""))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        return error_response(400, f"{where}: {first.get('msg', 'invalid')}", 2,
                              getattr(request.state, "request_id", ""))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), 1, getattr(request.state, "request_id", ""))

    return app


def _fold_dashboard(app: FastAPI) -> None:
    """The dashboard's pages and its JSON API (`/api/...`, `/`, `/jobs`, `/pools`) in the same app, for admins."""
    from fastapi.staticfiles import StaticFiles

    from orchestrator.dashboard import HERE, api, pages

    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
