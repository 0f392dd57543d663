"""The FastAPI application: ``create_app(settings)`` and the state its lifespan builds.

Start-up answers ``/healthz`` at once and ``/readyz`` 503 while the heavy objects load in the
background (model, one gallery per modality, querybank store and QB-Norm normalisers, ingest
queue and job store, then the embedded worker or, with Redis, the replica applier that applies
the workers' vectors to this replica's galleries). Shutdown is graceful: the worker finishes
its in-flight batch, the replica applier stops, galleries are snapshotted and closed.

Everything lives on one :class:`ServiceState` at ``app.state.xmodal``; tests may pass a model
(``create_app(settings, model=...)``) instead of loading the configured one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.encoder import Overloaded, QueryEncoder
from service.logging import RequestContextMiddleware, request_id_var
from service.media import MediaError
from service.middleware import EdgeMiddleware
from service.settings import MODALITIES, Settings

logger = logging.getLogger(__name__)

R = TypeVar("R")

# The bank QB-Norm uses at serving time: text queries against visual galleries
# (index.querybank direction "t2v").
QUERYBANK_DIRECTION = "t2v"
QBNORM_TARGETS = ("image", "video")


@dataclass
class ServiceState:
    """Everything heavy the service holds, built in the lifespan (tests may override)."""

    settings: Settings
    executor: ThreadPoolExecutor
    model: Any = None  # models.XModal
    encoder: QueryEncoder | None = None
    galleries: dict[str, Any] = field(default_factory=dict)  # modality -> index.gallery.Gallery
    querybank: Any = None  # index.querybank.QueryBankStore
    normalizers: dict[str, Any] = field(default_factory=dict)  # modality -> QBNormalizer
    queue: Any = None  # service.queue.IngestQueue
    jobs: Any = None  # service.jobs.JobStore
    worker: Any = None  # the embedded worker, or None
    replica: Any = None  # service.replication.ReplicaApplier, or None
    publisher: Any = None  # service.replication.ReplicationPublisher (deletes), or None
    redis: Any = None  # redis.Redis for readiness checks, or None
    ready: bool = False
    error: str | None = None  # why loading failed, when it did
    bank_checked: float = 0.0  # monotonic time of the last querybank version check
    bank_stale: bool = False  # that check failed (store unreachable): serving the cached bank
    stop_event: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def model_name(self) -> str:
        return str(getattr(self.model, "name", "unknown"))

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """Run blocking work (model, FAISS, Redis, SQLite) on the pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- index ------------------------------------------------------------------------------
    def index_version(self) -> int:
        """One monotonic number for the whole index: the sum of the galleries' versions."""
        return int(sum(int(g.version) for g in self.galleries.values()))

    def remove_item(self, item_id: str, modalities: list[str]) -> None:
        """Delete an item everywhere it is indexed.

        Embedded: straight from the galleries. Redis: a tombstone on the vector log, which
        every replica applies; we wait (briefly) for our own replica to read our write.
        """
        if self.publisher is not None:
            offset = self.publisher.publish_delete([item_id])
            applied = self.replica is None or offset is None
            if not applied and not self.replica.wait_for(offset, timeout=10.0):
                logger.warning("delete of %s not applied locally within 10 s", item_id)
            return
        for modality in modalities:
            self.galleries[modality].remove([item_id])

    # ---- ingest -----------------------------------------------------------------------------
    def check_queue_capacity(self, incoming: int) -> None:
        """429 when the ingest backlog is over the configured cap."""
        cap = self.settings.ingest.max_queue_depth
        depth_fn = getattr(self.queue, "depth", None)
        if not cap or not callable(depth_fn):
            return
        try:
            depth = int(depth_fn())
        except Exception:  # noqa: BLE001 - a failing probe must not block ingestion
            logger.warning("queue depth probe failed", exc_info=True)
            return
        if depth + incoming > cap:
            metrics.REJECTED_OVERLOAD.labels("/ingest").inc()
            raise Overloaded(f"ingest queue holds {depth} items (cap {cap})", retry_after=5)

    def enqueue(self, job_id: str, payloads: list[dict[str, Any]]) -> None:
        """Register the job and queue its items durably, all or nothing (service/enqueue.py)."""
        from service.enqueue import enqueue_job

        enqueue_job(self.jobs, self.queue, job_id, payloads)

    # ---- querybank and QB-Norm --------------------------------------------------------------
    def querybank_info(self) -> tuple[int, int | None]:
        """(size, version) of the serving model's text->visual bank; (0, None) when none."""
        if self.querybank is None:
            return 0, None
        bank = self.querybank.get(self.model_name, QUERYBANK_DIRECTION)
        if bank is None:
            return 0, None
        return int(len(bank)), int(bank.version)

    def serving_bank(self) -> tuple[int, int | None]:
        """(size, version) of the bank the live QB-Norm normalisers use, without reading the
        store (cheap: for every search response and metrics scrape); (0, None) when none."""
        current = next(iter(self.normalizers.values()), None)
        if current is None:
            return 0, None
        return int(len(current.bank)), int(current.bank_version)

    def append_querybank(self, vectors: np.ndarray, texts: list[str]) -> None:
        """Append encoded queries to the bank and rebuild the normalisers over it."""
        self.querybank.append(self.model_name, QUERYBANK_DIRECTION, vectors, texts)
        self.refresh_normalizers(force=True)

    def refresh_normalizers(self, force: bool = False) -> None:
        """(Re)build the QB-Norm normalisers when the bank version changed."""
        build_normalizers(self, force=force)


# ----------------------------------------------------------------------------------------------
# building and tearing down
# ----------------------------------------------------------------------------------------------


def build_state(state: ServiceState, model: Any = None) -> None:
    """Blocking: load everything onto ``state`` (runs on the pool at start-up)."""
    settings = state.settings
    t0 = time.perf_counter()
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        from service.loading import load_serving_model

        # the GPU when there is one (settings.model.device), else the CPU with ONNX Runtime
        model = load_serving_model(settings.model)
    if hasattr(model, "eval"):
        model.eval()
    state.model = model
    logger.info(
        "model %s loaded on %s (dim %d, %d vector(s) per item)",
        state.model_name,
        getattr(model, "device", "?"),
        model.embed_dim,
        model.num_vectors,
    )
    state.galleries = open_galleries(settings, model)
    from index.querybank import open_querybank_store

    state.querybank = open_querybank_store(settings.redis_url, data_dir)
    build_normalizers(state, force=True)
    from service.jobs import open_job_store
    from service.queue import open_queue

    state.queue = open_queue(settings)
    state.jobs = open_job_store(settings)
    if settings.redis_url is not None:
        import redis

        state.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
        state.replica = start_replica(state)
    elif settings.worker.embedded:
        state.worker = start_worker(state)
    logger.info(
        "ready in %.1fs: %s",
        time.perf_counter() - t0,
        ", ".join(f"{m}={len(g)}" for m, g in state.galleries.items()),
    )


def open_galleries(settings: Settings, model: Any) -> dict[str, Any]:
    """One durable gallery per modality under ``<data_dir>/index/<model name>/<modality>``:
    vectors of different models never share (or corrupt) an index."""
    from index.gallery import Gallery

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(getattr(model, "name", "model"))) or "model"
    root = Path(settings.data_dir) / "index" / safe
    return {
        m: Gallery(root / m, model.embed_dim, model.num_vectors, settings.index) for m in MODALITIES
    }


def start_worker(state: ServiceState) -> Any:
    """The in-process ingestion worker of embedded mode."""
    from service.worker import start_embedded_worker

    return start_embedded_worker(
        state.settings,
        model=state.model,
        galleries=state.galleries,
        queue=state.queue,
        jobs=state.jobs,
        stop_event=state.stop_event,
    )


def start_replica(state: ServiceState) -> Any:
    """Tail the workers' vector log into this replica's galleries (Redis mode); deletes are
    published on the same log so every replica applies them in the same order."""
    from service.replication import ReplicaApplier, ReplicationPublisher

    assert state.settings.redis_url is not None
    state.publisher = ReplicationPublisher(state.settings.redis_url)
    return ReplicaApplier(state.settings.redis_url, state.galleries).start()


def build_normalizers(state: ServiceState, force: bool = False) -> None:
    """QB-Norm normalisers for the visual galleries over the current text->visual bank.

    Rebuilt only when the bank version changed (or ``force``); between rebuilds each
    normaliser follows its gallery's upserts/removes incrementally (gallery listener).
    """
    if state.querybank is None or state.model is None:
        return
    with state.lock:
        bank = state.querybank.get(state.model_name, QUERYBANK_DIRECTION)
        current = next(iter(state.normalizers.values()), None)
        if bank is None or len(bank) == 0:
            for old in state.normalizers.values():
                old.detach()
            state.normalizers = {}
            return
        if not force and current is not None and current.bank_version == bank.version:
            return
        from index.qbnorm import QBNormalizer

        fresh = {
            m: QBNormalizer.from_bank(bank, state.settings.qbnorm).fit(state.galleries[m])
            for m in QBNORM_TARGETS
            if m in state.galleries
        }
        for old in state.normalizers.values():
            old.detach()
        state.normalizers = fresh
        state.bank_checked = time.monotonic()
        logger.info("qbnorm: bank v%s (%d queries) fitted", bank.version, len(bank))


def maybe_refresh_normalizers(state: ServiceState, every_s: float = 1.0) -> None:
    """Pick up a bank changed elsewhere (another replica, ``xmodal querybank build``):
    compare the store's version at most every ``every_s`` seconds."""
    now = time.monotonic()
    if state.querybank is None or now - state.bank_checked < every_s:
        return
    state.bank_checked = now
    try:
        version = state.querybank.version(state.model_name, QUERYBANK_DIRECTION)
    except Exception:  # noqa: BLE001 - keep serving with the bank we have
        logger.warning("qbnorm: querybank version check failed", exc_info=True)
        state.bank_stale = True
        metrics.QUERYBANK_STALE.set(1)
        return
    state.bank_stale = False
    metrics.QUERYBANK_STALE.set(0)
    current = next(iter(state.normalizers.values()), None)
    have = current.bank_version if current is not None else None
    if version != have and (version or have):
        build_normalizers(state, force=True)


def stop_worker(obj: Any, timeout: float = 60.0) -> None:
    """Stop a background runner (embedded worker, replica applier) after its current batch."""
    if hasattr(obj, "close"):
        obj.close()
    elif hasattr(obj, "stop"):
        obj.stop()
    if hasattr(obj, "join"):
        obj.join(timeout=timeout)


def shutdown_state(state: ServiceState) -> None:
    """Blocking, graceful: stop ingestion (finishing the in-flight batch), then close."""
    state.ready = False
    state.stop_event.set()
    for name, obj in (("worker", state.worker), ("replica applier", state.replica)):
        if obj is None:
            continue
        try:
            stop_worker(obj)
        except Exception:
            logger.exception("stopping the %s failed", name)
    for modality, gallery in state.galleries.items():
        try:
            gallery.snapshot()
        except Exception:
            logger.exception("snapshot of the %s gallery failed", modality)
        finally:
            gallery.close()
    closables = (
        ("queue", state.queue),
        ("job store", state.jobs),
        ("querybank store", state.querybank),
        ("replication publisher", state.publisher),
        ("redis", state.redis),
    )
    for name, obj in closables:
        if obj is not None and hasattr(obj, "close"):
            try:
                obj.close()
            except Exception:
                logger.exception("closing the %s failed", name)


# ----------------------------------------------------------------------------------------------
# errors: every failure is a JSON {"error", "detail", "request_id"} with an explicit status
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, *, model: Any = None) -> FastAPI:
    """Build the API. ``model`` overrides loading ``settings.model`` (tests)."""
    settings = settings if settings is not None else Settings()  # type: ignore[call-arg]
    executor = ThreadPoolExecutor(settings.model.threads, thread_name_prefix="xmodal")
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
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(settings.ingest.max_body_mb * 2**20))
    app.add_middleware(EdgeMiddleware)  # API key before the body, OPTIONS/405 Allow
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app)

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

    for module in (search, ingest, items, querybank, health, admin, thumbnails, page):
        app.include_router(module.router)
    return app


__all__ = ["ServiceState", "create_app"]
