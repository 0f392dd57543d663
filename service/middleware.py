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

from fastapi.responses import JSONResponse
from prometheus_client import Counter
from starlette.types import Scope

from service import metrics

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


__all__ = ["STORAGE_UNAVAILABLE", "storage_backend", "unhandled_response"]
