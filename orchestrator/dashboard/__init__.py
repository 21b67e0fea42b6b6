"""The dashboard: jobs and pools in a web page, live, over the same service layer as the CLI.

`create_app()` builds the FastAPI app: the JSON API under /api (OpenAPI at /api/openapi.json), server-rendered
pages (Jinja2) and the fragments their small script polls. `server.py` runs it beside the controller."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

HERE = Path(__file__).resolve().parent


def create_app(home: Path | None = None, *, host: str = "127.0.0.1", token: str | None = None) -> FastAPI:
    """The app for one Sortie home. Bound beyond loopback it needs a token: `token`, or the one stored
    (made if missing) under the home."""
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    from orchestrator import __version__
    from orchestrator.dashboard import api, pages
    from orchestrator.dashboard.security import Guard, is_loopback, load_or_create_token
    from orchestrator.pool_service import PoolService

    service = PoolService(home)
    loopback = is_loopback(host)
    if token is None and not loopback:
        token, _ = load_or_create_token(service.home)
    app = FastAPI(title="Sortie dashboard", version=__version__, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json",
                  description="Managed jobs and pools: the API the dashboard's pages use. Bound beyond loopback, "
                              "send `Authorization: Bearer TOKEN`; POSTs from a browser need `X-CSRF-Token`.")
    guard = Guard(token=token, loopback_only=loopback)
    app.state.service = service
    app.state.guard = guard
    app.middleware("http")(guard)
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return app
