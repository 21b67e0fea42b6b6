"""Server-rendered pages (Jinja2, autoescaped) and the fragments their script polls for live updates."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from orchestrator import timefmt
from orchestrator.dashboard import HERE, views
from orchestrator.dashboard.api import MAX_PAGE, JobId, job_detail, job_page, pool_detail, service_of
from orchestrator.job_status import JobStatus

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)
templates = Jinja2Templates(env=jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True))
templates.env.filters.update(ago=timefmt.ago, duration=timefmt.duration, clock=timefmt.clock, seconds=timefmt.seconds)
STATUSES = [s.value for s in JobStatus]
# The status filter's quick picks: "in progress" (not ended) and "failed" (every FAILED_* kind).
STATUS_GROUPS = {s.value: "failed" if s.failed else "ended" if s.terminal else "active" for s in JobStatus}


def render(request: Request, name: str, **context: Any) -> Response:
    guard = request.app.state.guard
    return templates.TemplateResponse(request, name, {"csrf": guard.csrf, **context})


def _jobs_context(request: Request, status: list[str], user: str | None, name: str | None, pool: str | None,
                  q: str | None, page: int, per_page: int) -> dict[str, Any]:
    service = service_of(request)
    wanted = [s for s in status if s in STATUSES]  # the form's "any" is an empty value
    filters = {"status": wanted, "user": user or "", "name": name or "", "pool": pool or "",
               "q": q or ""}
    result = job_page(service, status=list(filters["status"]), user=user, name=name, pool=pool, q=q,
                      offset=(page - 1) * per_page, limit=per_page)
    pages = max((result.total + per_page - 1) // per_page, 1)
    query = [(k, v) for k, v in filters.items() if k != "status" and v] + [("status", s) for s in filters["status"]]

    def link(to: int) -> str:
        return "/jobs?" + urlencode([*query, ("page", to), ("per_page", per_page)])

    return {"result": result, "filters": filters, "page": page, "pages": pages, "per_page": per_page,
            "prev_link": link(page - 1) if page > 1 else None, "next_link": link(page + 1) if page < pages else None,
            "first": result.offset + 1 if result.items else 0, "last": result.offset + len(result.items)}


PageNo = Annotated[int, Query(ge=1, le=2**31)]
PerPage = Annotated[int, Query(ge=1, le=MAX_PAGE)]


@router.get("/")
def index() -> Response:
    return RedirectResponse("/jobs", status_code=303)


@router.get("/jobs")
def jobs_page(request: Request, status: Annotated[list[str], Query()] = [],  # noqa: B006
              user: str | None = None, name: str | None = None, pool: str | None = None, q: str | None = None,
              page: PageNo = 1, per_page: PerPage = 50) -> Response:
    service = service_of(request)
    context = _jobs_context(request, status, user, name, pool, q, page, per_page)
    return render(request, "jobs.html", statuses=STATUSES, status_groups=STATUS_GROUPS, users=service.store.job_users(),
                  pools=[p.name for p in service.store.pools(include_terminated=True)], **context)


@router.get("/fragments/jobs")
def jobs_fragment(request: Request, status: Annotated[list[str], Query()] = [],  # noqa: B006
                  user: str | None = None, name: str | None = None, pool: str | None = None, q: str | None = None,
                  page: PageNo = 1, per_page: PerPage = 50) -> Response:
    return render(request, "_jobs_table.html", **_jobs_context(request, status, user, name, pool, q, page, per_page))


@router.get("/jobs/{job_id}")
def job_page_(request: Request, job_id: JobId) -> Response:
    return render(request, "job.html", d=job_detail(service_of(request), job_id))


@router.get("/fragments/jobs/{job_id}")
def job_fragment(request: Request, job_id: JobId) -> Response:
    return render(request, "_job_live.html", d=job_detail(service_of(request), job_id))


@router.get("/pools")
def pools_page(request: Request) -> Response:
    return render(request, "pools.html", pools=[views.pool_out(s) for s in service_of(request).status()])


@router.get("/pools/{name}")
def pool_page(request: Request, name: Annotated[str, Path(max_length=63)]) -> Response:
    return render(request, "pool.html", p=pool_detail(service_of(request), name))


@router.get("/fragments/pools/{name}")
def pool_fragment(request: Request, name: Annotated[str, Path(max_length=63)]) -> Response:
    return render(request, "_pool_live.html", p=pool_detail(service_of(request), name))


@router.get("/stacks/{name}")
def stack_page(request: Request, name: Annotated[str, Path(max_length=255)]) -> Response:
    from orchestrator.dashboard.api import stack

    return render(request, "stack.html", s=stack(request, name))


@router.get("/fragments/status")
def status_fragment(request: Request) -> Response:
    return render(request, "_status.html", st=views.status_out(service_of(request).controller_status()))
