"""Errors: every failure is a JSON ``{"error", "detail", "request_id"}`` with an explicit status.

:func:`install_error_handlers` maps exceptions (HTTP, validation, media, overload, anything
else) to their status and logs the cause; :class:`BodyLimitMiddleware` answers 413 for bodies
over ``IngestSettings.max_body_bytes`` before a route reads them.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.encoder import Overloaded
from service.logging import request_id_var
from service.media import MediaError

logger = logging.getLogger(__name__)


class BodyLimitMiddleware:
    """413 (JSON) for request bodies over ``max_bytes``: at once when Content-Length says so,
    else as soon as the streamed body crosses the limit (the route's body read raises)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> StarletteHTTPException:
        mb = self.max_bytes / 2**20
        return StarletteHTTPException(413, f"request body is over the {mb:g} MB limit")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    exc = self._too_large()
                    metrics.ERRORS.labels("<body>", "413").inc()
                    logger.info(
                        "%s %s -> 413: %s", scope.get("method"), scope.get("path"), exc.detail
                    )
                    response = _error(413, str(exc.detail))
                    await response(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited, send)


def _error(
    status_code: int, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": message, "detail": detail, "request_id": request_id_var.get()}
    return JSONResponse(jsonable_encoder(body), status_code=status_code, headers=headers)


def _route(request: Request) -> str:
    return str(getattr(request.scope.get("route"), "path", "<unmatched>"))


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to an explicit status; log the cause."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        metrics.ERRORS.labels(_route(request), str(exc.status_code)).inc()
        if exc.status_code >= 500:
            logger.warning(
                "%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.detail
            )
        else:
            logger.info(
                "%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.detail
            )
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
        # Malformed JSON is a bad payload (400); well-formed but invalid is 422.
        code = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
        message = _validation_message(errors)
        metrics.ERRORS.labels(_route(request), str(code)).inc()
        logger.info("%s %s -> %d: %s", request.method, request.url.path, code, message)
        return _error(code, message, errors)

    @app.exception_handler(MediaError)
    async def media_error(request: Request, exc: MediaError) -> JSONResponse:
        metrics.ERRORS.labels(_route(request), str(exc.status)).inc()
        logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
        return _error(exc.status, str(exc), {"kind": exc.kind})

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        metrics.ERRORS.labels(_route(request), "429").inc()
        metrics.REJECTED_OVERLOAD.labels(_route(request)).inc()
        logger.warning("%s %s -> 429: %s", request.method, request.url.path, exc)
        retry = str(max(1, int(round(exc.retry_after))))
        return _error(429, f"overloaded: {exc}", headers={"Retry-After": retry})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        metrics.ERRORS.labels(_route(request), "500").inc()
        logger.exception("%s %s -> 500", request.method, request.url.path)
        return _error(500, "internal error", {"type": type(exc).__name__})


__all__ = ["BodyLimitMiddleware", "install_error_handlers"]
