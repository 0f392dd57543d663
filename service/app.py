"""The FastAPI application: ``create_app(settings)`` wires the pieces together.

Start-up answers ``/healthz`` at once and ``/readyz`` 503 while the heavy objects load in the
background (:func:`service.lifecycle.build_state`: model, one gallery per modality, querybank
store and QB-Norm normalisers, ingest queue and job store, then the embedded worker or, with
Redis, the replica applier). Shutdown is graceful (:func:`service.lifecycle.shutdown_state`).

Everything lives on one :class:`~service.state.ServiceState` at ``app.state.xmodal``; tests may
pass a model (``create_app(settings, model=...)``) instead of loading the configured one.
Errors and the body limit are :mod:`service.errors`; QB-Norm refits :mod:`service.normalizers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI

from index.vector_index import set_search_threads
from service import metrics
from service.encoder import QueryEncoder
from service.errors import BodyLimitMiddleware, install_error_handlers
from service.lifecycle import build_state, shutdown_state
from service.logging import RequestContextMiddleware
from service.middleware import EdgeMiddleware, unhandled_response
from service.routes import (
    admin,
    health,
    ingest,
    items,
    page,
    querybank,
    search,
    thumbnails,
)
from service.settings import Settings
from service.state import ServiceState

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, model: Any = None) -> FastAPI:
    """Build the API. ``model`` overrides loading ``settings.model`` (tests)."""
    settings = settings if settings is not None else Settings()  # type: ignore[call-arg]
    executor = ThreadPoolExecutor(
        settings.model.threads,
        thread_name_prefix="xmodal",
        initializer=set_search_threads,  # per thread: one query's search on one core
        initargs=(settings.index.search_threads,),
    )
    state = ServiceState(settings=settings, executor=executor)

    async def load() -> None:
        try:
            await state.run(build_state, state, model)
            state.encoder = QueryEncoder(
                state.model,
                executor,
                max_batch=settings.model.query_batch_size,
                wait_ms=settings.model.query_batch_wait_ms,
                max_pending=settings.model.max_pending_queries,
            )
            state.encoder.start()
            state.ready = True
            metrics.READY.set(1)
        except Exception as exc:
            state.error = f"{type(exc).__name__}: {exc}"
            logger.exception("start-up failed; the service stays not ready")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.get_running_loop().create_task(load(), name="xmodal-load")
        app.state.loader = loader
        try:
            yield
        finally:
            logger.info("shutting down")
            with contextlib.suppress(Exception):
                await loader
            if state.encoder is not None:
                await state.encoder.stop()
            await asyncio.get_running_loop().run_in_executor(None, shutdown_state, state)
            executor.shutdown(wait=True)
            metrics.READY.set(0)
            logger.info("stopped")

    app = FastAPI(
        title="xmodal",
        summary="Cross-modal retrieval: search images and videos with text, text with them.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.xmodal = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.ingest.max_body_bytes)
    app.add_middleware(EdgeMiddleware)  # API key before the body, OPTIONS/405 Allow
    app.add_middleware(RequestContextMiddleware, on_error=unhandled_response)
    install_error_handlers(app)

    for module in (search, ingest, items, querybank, health, admin, thumbnails, page):
        app.include_router(module.router)
    return app


__all__ = ["ServiceState", "create_app"]
