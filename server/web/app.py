"""The dashboard and its JSON API (documented in docs/api.md): read-only, token-protected, no external
CDN (every asset is served from here, so it works on a site without internet).

The token comes in as ``Authorization: Bearer <token>``, or once in the dashboard's address, after which
a cookie (HttpOnly, SameSite=Strict, Secure behind TLS) carries it. The address the server prints is
``/#token=…``: a fragment never reaches the server, a proxy's log or a Referer, and the page's script
exchanges it for the cookie (``POST /login``) and takes it out of the address and the browser's history
at once. ``/?token=…`` still works (redirected to the cookie), for links people already have. The page
itself (``/``) is a shell without data, open to anyone; every answer with data needs the token.
``/healthz`` and ``/metrics`` are open, for load balancers and Prometheus; bind the listener to an
internal address.
"""

from __future__ import annotations

import hmac
import time
import urllib.parse
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from battery_trace.protocol.battery_code import normalise
from battery_trace.server import inputs, metrics
from battery_trace.server.rules import FINDING_KINDS
from battery_trace.server.store import Store, StoreUnavailable, queries
from battery_trace.server.verify import REASONS
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/healthz", "/metrics", "/static/")
SHELL = "/"  # the page without data: its script logs in with the token from the address's fragment
COOKIE = "bt_token"


class TokenAuth(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self.token = token

    def _valid(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.token.encode())

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        path = request.url.path
        if path.startswith(OPEN_PATHS):
            return await call_next(request)
        query = request.query_params.get("token")
        if self._valid(query):  # an older link: move the token into a cookie, out of the URL
            return self._logged_in(request, query or "", RedirectResponse(request.url.path, status_code=303))
        header = request.headers.get("authorization", "")
        bearer = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None
        if path == "/login" and request.method == "POST":
            if not self._valid(bearer):
                return JSONResponse({"error": "missing or wrong token"}, status_code=401)
            return self._logged_in(request, bearer or "", Response(status_code=204))
        if self._valid(bearer) or self._valid(request.cookies.get(COOKIE)) or path == SHELL:
            return await call_next(request)
        if path.startswith("/api/"):
            return JSONResponse({"error": "missing or wrong token"}, status_code=401)
        return PlainTextResponse(
            "Open the dashboard with the address the server printed (it holds the token).\n", status_code=401
        )

    @staticmethod
    def _logged_in(request: Request, token: str, response: Response) -> Response:
        # Secure behind TLS (https here, or X-Forwarded-Proto from a proxy uvicorn trusts), so the
        # browser never sends the token over plain HTTP; the answer itself is never cached.
        secure = request.url.scheme == "https"
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=secure)
        response.headers["Cache-Control"] = "no-store"
        return response


# Every answer: not in a frame (clickjacking), scripts and styles only from here, no referrer to any
# other site (an address may hold a battery code or a VIN), no content-type sniffing.
HYGIENE = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


class Hygiene(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        for name, value in HYGIENE.items():
            response.headers.setdefault(name, value)
        return response


class BadParameter(Exception):
    """A query parameter that is not valid: answered 400 with its name, never a 500 or a silent default."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"parameter {name}: {problem}")
        self.name = name


def _known(request: Request, *names: str) -> None:
    """A misspelt filter (``knd=``) must not quietly answer as if there were none."""
    for name in request.query_params:
        if name not in names and name != "token":  # the token may ride along; TokenAuth has dealt with it
            raise BadParameter(name, f"is not a parameter of {request.url.path}; valid: {', '.join(names) or 'none'}")


def _number(request: Request, name: str, default: float, low: float, high: float, whole: bool = False) -> float:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        return inputs.number(text, low, high, whole)
    except inputs.InputError as exc:
        raise BadParameter(name, str(exc)) from None


def _cursor(request: Request, name: str, parse: Callable[[str], Any]) -> Any:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        return parse(text)
    except inputs.InputError as exc:
        raise BadParameter(name, str(exc)) from None


def _limit(request: Request, default: int) -> int:
    return int(_number(request, "limit", default, 1, queries.MAX_PAGE, whole=True))


def _page(request: Request, result: Any, name: str) -> Response:
    """A list a page at a time: the page as the body, the next page's address in ``Link`` (RFC 8288)."""
    if isinstance(result, Response):
        return result
    items, following = result
    if following is None:
        return JSONResponse(items)
    query = urllib.parse.urlencode({**request.query_params, name: following})
    return JSONResponse(items, headers={"Link": f'<{request.url.path}?{query}>; rel="next"'})


def _choice(request: Request, name: str, choices: tuple[str, ...]) -> str | None:
    value = request.query_params.get(name) or None
    if value is not None and value not in choices:
        raise BadParameter(name, f"{value!r} is not valid; valid: {', '.join(choices)}")
    return value


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "")
    if value not in FLAGS:
        raise BadParameter(name, f"{value!r} is not valid; valid: {', '.join(repr(f) for f in FLAGS)}")
    return FLAGS[value]


FLAGS = {"": False, "0": False, "false": False, "no": False, "1": True, "true": True, "yes": True}


async def _bad_parameter(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadParameter)
    return JSONResponse({"error": str(exc), "parameter": exc.name}, status_code=400)


def create_app(
    store: Store,
    token: str,
    healthy: Callable[[], tuple[bool, str]],
    exposition: Callable[[], bytes] | None = None,
) -> Starlette:
    """``healthy`` and ``exposition`` (the Prometheus text) come from the collector: in the web process
    (server/web/process.py) they are questions over a pipe; by default, this process's metrics."""
    if exposition is None:
        metrics.DEVICES.read = lambda: device_counts(store)
        exposition = partial(generate_latest, metrics.REGISTRY)

    async def read(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await run_in_threadpool(fn, *args)
        except StoreUnavailable as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)

    def json_or(result: Any, missing: str) -> Response:
        if isinstance(result, Response):
            return result
        if result is None:
            return JSONResponse({"error": missing}, status_code=404)
        return JSONResponse(result)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def healthz(request: Request) -> Response:
        ok, why = await run_in_threadpool(healthy)
        return PlainTextResponse(why + "\n", status_code=200 if ok else 503)

    async def prometheus(request: Request) -> Response:
        try:
            text = await run_in_threadpool(exposition)
        except (TimeoutError, EOFError, OSError) as exc:
            return PlainTextResponse(f"{exc}\n", status_code=503)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def overview(request: Request) -> Response:
        _known(request, "window_s", "bucket_s")
        window = _number(request, "window_s", 1800, 60, 86400)
        bucket = _number(request, "bucket_s", 10, 1, 3600)
        return json_or(await read(store.overview, time.time(), window, bucket), "")

    async def devices(request: Request) -> Response:
        _known(request, "limit", "after")
        limit = _limit(request, queries.MAX_PAGE)
        return _page(request, await read(store.devices_overview, limit, request.query_params.get("after")), "after")

    async def device(request: Request) -> Response:
        _known(request)
        name = request.path_params["device"]
        return json_or(await read(store.device, name), f"{name} is not enrolled")

    async def battery(request: Request) -> Response:
        _known(request, "limit", "after", "lifecycle")
        code = normalise(request.path_params["code"])
        limit, after = _limit(request, queries.PAGE), _cursor(request, "after", queries.event_cursor)
        result = await read(store.trace, code, limit, after, _flag(request, "lifecycle"))
        return json_or(result, f"no event in the record names battery {code}")

    async def vehicle(request: Request) -> Response:
        _known(request, "limit", "after")
        vin = request.path_params["vin"].strip().upper()
        limit, after = _limit(request, queries.PAGE), _cursor(request, "after", queries.event_cursor)
        return json_or(await read(store.vehicle, vin, limit, after), f"no event in the record names vehicle {vin}")

    async def findings(request: Request) -> Response:
        _known(request, "open", "kind", "limit", "before")
        kind = _choice(request, "kind", FINDING_KINDS)
        open_only = _flag(request, "open")
        limit, before = _limit(request, queries.PAGE), _cursor(request, "before", queries.id_cursor)
        return _page(request, await read(store.findings_page, open_only, kind, limit, before), "before")

    async def rejects(request: Request) -> Response:
        _known(request, "reason", "limit", "before")
        reason = _choice(request, "reason", REASONS)
        limit, before = _limit(request, 100), _cursor(request, "before", queries.id_cursor)
        rows = await read(store.rejects, reason, None, limit + 1, before)
        if isinstance(rows, Response):
            return rows
        for row in rows:
            row.pop("raw")  # the raw bytes stay in the record: `battery-server rejects --raw`
        return _page(request, queries.cut(rows, limit, lambda r: str(r["id"])), "before")

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/metrics", prometheus),
        Route("/api/overview", overview),
        Route("/api/devices", devices),
        Route("/api/devices/{device}", device),
        Route("/api/batteries/{code}", battery),
        Route("/api/vehicles/{vin}", vehicle),
        Route("/api/findings", findings),
        Route("/api/rejects", rejects),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={BadParameter: _bad_parameter})
    app.add_middleware(TokenAuth, token=token)
    app.add_middleware(Hygiene)  # added last, so it wraps TokenAuth's own answers (401, the redirect) too
    return app


def device_counts(store: Store) -> tuple[int, int]:
    summary = store.overview(time.time(), 60, 60)
    return summary["devices_online"], summary["devices"]
