"""What the request middleware answers when a route raised something nobody handled.

:class:`service.logging.RequestContextMiddleware` calls :func:`unhandled_response` itself,
*inside* the request's context, instead of letting the exception reach Starlette's
``ServerErrorMiddleware``. That outer layer runs after the request id is gone (so the body's
``request_id`` was null and there was no ``X-Request-ID`` header) and re-raises after sending,
which makes uvicorn drop the keep-alive connection, so the client's *next* request failed too.
Here the error is answered like any other: a JSON ``{"error", "detail", "request_id"}`` with
the request's own id in the body and the header, and the connection stays usable.

A storage outage is not an internal error: Redis unreachable (or SQLite locked past its
timeout) answers ``503`` with ``Retry-After`` and a generic message; the cause goes to the log.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics
from service.logging import request_id_var

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 5

STORAGE_UNAVAILABLE = Counter(
    "xmodal_storage_unavailable_total",
    "Requests answered 503 because the queue/job/querybank storage was unreachable.",
    ["route", "backend"],
)


def storage_backend(exc: BaseException) -> str | None:
    """``"redis"`` / ``"sqlite"`` when ``exc`` means the storage is (for now) unreachable."""
    try:
        import redis
    except ImportError:  # pragma: no cover - redis is a dependency
        redis = None  # type: ignore[assignment]
    if redis is not None and isinstance(
        exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
    ):
        return "redis"
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return "sqlite"
    return None


def _route(scope: Scope) -> str:
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "<unmatched>"


def unhandled_response(exc: Exception, scope: Scope, request_id: str) -> JSONResponse:
    """The answer to an exception no handler took: 503 for a storage outage, else 500."""
    route = _route(scope)
    method, path = scope.get("method", ""), scope.get("path", "")
    backend = storage_backend(exc)
    body: dict[str, Any]
    if backend is not None:
        STORAGE_UNAVAILABLE.labels(route, backend).inc()
        metrics.ERRORS.labels(route, "503").inc()
        logger.warning("%s %s -> 503: %s unavailable: %r", method, path, backend, exc)
        body = {
            "error": "storage unavailable; nothing was changed, retry later",
            "detail": {"kind": "storage_unavailable"},
            "request_id": request_id,
        }
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    metrics.ERRORS.labels(route, "500").inc()
    logger.error("%s %s -> 500", method, path, exc_info=exc)
    body = {
        "error": "internal error",
        "detail": {"type": type(exc).__name__},
        "request_id": request_id,
    }
    return JSONResponse(body, status_code=500)


def _error(scope: Scope, status: int, message: str, headers: dict[str, str]) -> JSONResponse:

    metrics.ERRORS.labels(_route(scope), str(status)).inc()
    body = {"error": message, "detail": None, "request_id": request_id_var.get()}
    return JSONResponse(body, status_code=status, headers=headers)


def _flat_routes(routes: Any) -> list[Any]:
    """The endpoint routes, looking inside included routers (FastAPI >= 0.16x wraps each
    ``include_router`` in an ``_IncludedRouter``; ours are included without a prefix)."""
    out: list[Any] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None and not getattr(route.include_context, "prefix", ""):
            out += _flat_routes(inner.routes)
        else:
            out.append(route)
    return out


class EdgeMiddleware:
    """Answers two things before any route runs (issue #15 item 7):

    - the API key of a route guarded by ``ReadAccess``/``WriteAccess`` is checked before its
      body is read or parsed, so a malformed body without a key is 401, not 400;
    - ``OPTIONS`` (and a method a path does not allow, 405) list every method of every route
      on that path in ``Allow`` (``/items/{id}`` has a GET and a DELETE route; Starlette's
      own 405 names only the first one's).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._flat: tuple[int, list[Any]] = (-1, [])  # (routes seen, flattened), per app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        top = getattr(getattr(scope.get("app"), "router", None), "routes", [])
        if self._flat[0] != len(top):  # flattened again only when a route was added
            self._flat = (len(top), _flat_routes(top))
        routes = self._flat[1]
        full = None
        allowed: set[str] = set()
        for route in routes:
            match, _ = route.matches(scope)
            if match == Match.FULL and full is None:
                full = route
            if match in (Match.FULL, Match.PARTIAL):
                allowed |= set(getattr(route, "methods", None) or ())
        if full is None and allowed:
            allow = ", ".join(sorted(allowed | {"OPTIONS"}))
            if scope.get("method") == "OPTIONS":
                response: Response = Response(status_code=204, headers={"Allow": allow})
            else:
                response = _error(scope, 405, "method not allowed", {"Allow": allow})
            await response(scope, receive, send)
            return
        if full is not None:
            problem = self._key_problem(scope, full)
            if problem is not None:
                headers = dict(problem.headers or {})
                refusal = _error(scope, problem.status_code, str(problem.detail), headers)
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _key_problem(scope: Scope, route: Any) -> StarletteHTTPException | None:
        from service import deps

        needs = {getattr(d, "dependency", None) for d in getattr(route, "dependencies", ())}
        write = deps.require_write in needs
        if not write and deps.require_read not in needs:
            return None
        state = getattr(getattr(scope.get("app"), "state", None), "xmodal", None)
        if state is None:
            return None
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            deps._check_key(state, headers.get("authorization"), headers.get("x-api-key"), write)
        except StarletteHTTPException as exc:
            return exc
        return None


__all__ = ["STORAGE_UNAVAILABLE", "EdgeMiddleware", "storage_backend", "unhandled_response"]
