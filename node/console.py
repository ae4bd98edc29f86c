"""The admin's console that `serve` runs over HTTP ([http] in config.toml): pages of what the
node holds and does, /metrics for Prometheus and /health for a load balancer or a monitor.

Read-only unless config.toml sets ``[http] admin_token``; then retry, resend, reprocess and
activate need that token, as a bearer token or entered once in the page (kept in a cookie),
and each is written to the audit trail with the caller's address.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import uvicorn
from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from node import pages
from node.config import Config
from node.health import check_health
from node.metrics import metrics_registry
from node.pages import Query
from node.version import software_version
from pipeline.model.registry import ModelRegistry, RegistryError
from pipeline.spool import Spool
from pipeline.state import audit
from pipeline.state.audit import AuditFilter, read_audit
from pipeline.state.db import DeliveryState, JobState, SeriesState
from pipeline.state.deliveries import resend_job, retry_delivery
from pipeline.state.heartbeats import read_heartbeats, worker_alive
from pipeline.state.jobs import reprocess_series, retry_job
from pipeline.state.quality import quality_report, resume

log = logging.getLogger(__name__)

TOKEN_COOKIE = "dicomnode_admin"
# The pages reload themselves this often (a meta refresh: no JavaScript).
REFRESH_SECONDS = 10
TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
)


class ListenError(Exception):
    """The console cannot listen where [http] says."""


def build_app(config: Config, sessions: sessionmaker, serve_id: Any = lambda: None) -> Starlette:
    """The console's ASGI app. ``serve_id()``: the heartbeat row of the serving process."""
    registry = ModelRegistry(config.models.registry)
    spool = Spool(config.node.storage)
    http = config.http
    scraped = metrics_registry(sessions, registry, config.routes)

    def render(request: Request, template: str, **context: Any) -> HTMLResponse:
        html = TEMPLATES.get_template(template).render(
            request=request,
            page=template.removesuffix(".html"),
            version=software_version(),
            admin=_is_admin(request),
            token_set=http.admin_token is not None,
            refresh=REFRESH_SECONDS,
            message=request.query_params.get("message"),
            error=request.query_params.get("error"),
            **context,
        )
        return HTMLResponse(html)

    def _is_admin(request: Request) -> bool:
        if http.admin_token is None:
            return False
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        given = given or request.cookies.get(TOKEN_COOKIE, "")
        return hmac.compare_digest(given.encode(), http.admin_token.encode())

    def query(request: Request) -> Query:
        params = request.query_params
        page = params.get("page", "1")
        return Query(
            page=int(page) if page.isdigit() else 1,
            state=params.get("state") or None,
            search=params.get("q") or None,
        )

    async def overview(request: Request) -> Response:
        beats = read_heartbeats(sessions)
        serve = next((b for b in beats if b["role"] == "serve" and b["liveness"] == "alive"), None)
        return render(
            request,
            "overview.html",
            health=check_health(config, sessions, serve_id()),
            workers=beats,
            up_since=serve["started_at"] if serve else None,
            figures=pages.overview(sessions, config.node.storage),
            destinations=pages.destination_summary(sessions),
        )

    async def series(request: Request) -> Response:
        q = query(request)
        rows = pages.series_page(sessions, q, spool, http.show_patient_names)
        return render(
            request,
            "series.html",
            rows=rows,
            q=q,
            states=list(SeriesState),
            **_pager(request, q, rows),
        )

    async def jobs(request: Request) -> Response:
        q = query(request)
        rows = pages.jobs_page(sessions, q)
        # A queued job nobody will take is flagged where the admin looks for it.
        return render(
            request,
            "jobs.html",
            rows=rows,
            q=q,
            states=list(JobState),
            worker_alive=worker_alive(read_heartbeats(sessions)),
            **_pager(request, q, rows),
        )

    async def deliveries(request: Request) -> Response:
        q = query(request)
        destination = request.query_params.get("destination") or None
        rows = pages.deliveries_page(sessions, q, destination)
        return render(
            request,
            "deliveries.html",
            rows=rows,
            q=q,
            states=list(DeliveryState),
            destination=destination,
            destinations=pages.destination_summary(sessions),
            **_pager(request, q, rows),
        )

    async def models(request: Request) -> Response:
        return render(
            request,
            "models.html",
            rows=pages.models(registry),
            quality=quality_report(sessions, config.monitor)["rolling"],
            monitor=config.monitor,
        )

    async def audit_page(request: Request) -> Response:
        q = query(request)
        where = AuditFilter(
            accession_or_study=q.search, destination=request.query_params.get("destination")
        )
        rows = read_audit(sessions, where, limit=pages.PAGE_SIZE, newest_first=True, skip=q.offset)
        return render(request, "audit.html", rows=rows, q=q, **_pager(request, q, rows))

    async def thumbnail(request: Request) -> Response:
        source, output = pages.job_files(sessions, spool, request.path_params["job"])
        which = request.path_params["which"]
        png = pages.thumbnail(source if which == "source" else output)
        if png is None:
            return PlainTextResponse("no image: the files are gone or cannot be decoded", 404)
        return Response(png, media_type="image/png")

    async def health(request: Request) -> Response:
        verdict = check_health(config, sessions, serve_id())
        return PlainTextResponse(verdict.line() + "\n", 200 if verdict.healthy else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(scraped), media_type=CONTENT_TYPE_LATEST)

    async def login(request: Request) -> Response:
        form = await request.form()
        token = str(form.get("token", ""))
        back = RedirectResponse(str(form.get("back") or "/"), status_code=303)
        if http.admin_token and hmac.compare_digest(token.encode(), http.admin_token.encode()):
            back.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        else:
            back = _redirect(str(form.get("back") or "/"), error="wrong admin token")
        return back

    async def logout(request: Request) -> Response:
        back = RedirectResponse("/", status_code=303)
        back.delete_cookie(TOKEN_COOKIE)
        return back

    async def action(request: Request) -> Response:
        form = await request.form()
        back = str(form.get("back") or "/")
        if not _is_admin(request):
            why = "the console is read-only" if http.admin_token is None else "admin token needed"
            return PlainTextResponse(f"forbidden: {why}\n", 403)
        if not request.headers.get("authorization") and not _from_this_console(request):
            # The cookie rides along with any page's form (SameSite aside, in older
            # browsers): a browser's action must come from one of this console's pages.
            return PlainTextResponse("forbidden: not sent from this console's pages\n", 403)
        origin = f"http {request.client.host if request.client else '?'}"
        kind, target = str(form.get("action", "")), str(form.get("target", "")).strip()
        try:
            message = _act(kind, target, form, origin)
        except (ValueError, RegistryError) as error:
            refusal = f"cannot {kind}: {error}"
            if request.headers.get("authorization"):  # a script: the answer, not a page
                return PlainTextResponse(refusal + "\n", 400)
            return _redirect(back, error=refusal)
        log.info("console: %s (by %s)", message, origin)
        if request.headers.get("authorization"):
            return PlainTextResponse(message + "\n")
        return _redirect(back, message=message)

    def _act(kind: str, target: str, form: Any, origin: str) -> str:
        if kind == "activate":
            from pipeline.model.card import ModelFileError  # torch: only to activate

            name, _, version = target.partition(":")
            try:
                registry.activate(name, version)
            except ModelFileError as error:
                raise ValueError(str(error)) from None
            audit.record_activation(sessions, name, version, origin)
            return f"{name} {version} is now active"
        if kind == "reprocess":
            return reprocess_series(sessions, target, origin=origin)
        if kind == "quality-resume":
            scanner, protocol = str(form.get("scanner", "")), str(form.get("protocol", ""))
            resume(sessions, scanner, protocol, target, origin=origin)  # NoScores: the message
            return f"protocol {protocol!r} on {scanner} with {target} resumed"
        if not target.isdigit():
            raise ValueError(f"{target!r} is not an id")
        if kind == "retry-job":
            return retry_job(sessions, int(target), origin=origin)
        if kind == "retry-delivery":
            return retry_delivery(sessions, int(target), origin=origin)
        if kind == "resend":
            destination = str(form.get("destination") or "") or None
            return resend_job(
                sessions, int(target), destination, config.destinations, origin=origin
            )
        raise ValueError(f"no action {kind!r}")

    return Starlette(
        routes=[
            Route("/", overview),
            Route("/series", series),
            Route("/jobs", jobs),
            Route("/jobs/{job:int}/{which:str}.png", thumbnail),
            Route("/deliveries", deliveries),
            Route("/models", models),
            Route("/audit", audit_page),
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/actions", action, methods=["POST"]),
        ]
    )


def _pager(request: Request, q: Query, rows: list) -> dict[str, Any]:
    """Links to the previous and next page, keeping the filters."""

    def link(page: int) -> str:
        params = {**request.query_params, "page": str(page)}
        return f"{request.url.path}?{urlencode(params)}"

    return {
        "previous": link(q.page - 1) if q.page > 1 else None,
        "next": link(q.page + 1) if len(rows) == pages.PAGE_SIZE else None,
    }


def _from_this_console(request: Request) -> bool:
    """Whether a browser's POST names this console as its origin (Origin, else Referer)."""
    origin = request.headers.get("origin") or request.headers.get("referer") or ""
    return urlsplit(origin).netloc == request.headers.get("host")


def _redirect(back: str, **params: str) -> RedirectResponse:
    # Only a path of this console: never an address given by a form (an open redirect).
    path = back if back.startswith("/") and not back.startswith("//") else "/"
    separator = "&" if "?" in path else "?"
    return RedirectResponse(f"{path}{separator}{urlencode(params)}", status_code=303)


class ConsoleServer:
    """uvicorn serving the console in a thread of `serve`, on a socket bound at start, so a
    port in use stops `serve` with a line instead of a thread's traceback."""

    def __init__(self, config: Config, app: Starlette) -> None:
        self._http = config.http
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self._http.host}:{self._http.port}"

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._http.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._http.host, self._http.port))
        except OSError as error:
            sock.close()
            raise ListenError(
                f"http.port = {self._http.port}: cannot listen on {self._http.host}:"
                f"{self._http.port} ({error.strerror})"
            ) from None
        sock.listen(128)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="console", daemon=True
        )
        self._thread.start()
        log.info("console on %s", self.url)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
