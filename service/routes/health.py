"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response, status

from index.querybank import BANK_DIRECTION
from service import metrics, monitoring
from service.backends import backend_mode
from service.deps import MetricsAccess, State
from service.schemas import HealthResponse, ReadyResponse
from service.state import ServiceState

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
def healthz() -> HealthResponse:
    """The process is alive."""
    return HealthResponse()


def readiness(state: ServiceState) -> ReadyResponse:
    """Model loaded, index loaded, Redis reachable when configured."""
    checks = {
        "model": state.model is not None,
        "index": bool(state.galleries) and state.ready,
    }
    if backend_mode(state.settings) == "redis":
        ok = False
        if state.redis is not None:
            try:
                ok = bool(state.redis.ping())
            except Exception as exc:  # noqa: BLE001 - an unreachable Redis is "not ready"
                logger.warning("readiness: Redis ping failed: %s", exc)
        checks["redis"] = ok
        if state.replica is not None:
            checks["replication"] = not getattr(state.replica, "gap", False)
    ready = state.ready and all(checks.values())
    workers = monitoring.live_worker_names(state)  # None in embedded mode
    detail = "start-up failed; the cause is in the service log" if state.error else None
    return ReadyResponse(ready=ready, checks=checks, detail=detail, workers=workers)


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "not ready yet"}},
)
def readyz(state: State, response: Response) -> ReadyResponse:
    """Ready to serve: 200, else 503 with the failing checks."""
    answer = readiness(state)
    if not answer.ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        response.headers["Retry-After"] = "5"
    return answer


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[MetricsAccess],
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition"}},
)
def prometheus_metrics(state: State) -> Response:
    """Prometheus metrics (text exposition format)."""
    metrics.READY.set(1 if state.ready else 0)
    if state.ready:
        metrics.refresh(
            state.galleries,
            querybank=metrics.safe(lambda: querybank_stats(state), "querybank") or {},
            queue_stats=metrics.safe(lambda: queue_stats(state), "queue") or {},
        )
    metrics.safe(lambda: monitoring.refresh_distributed(state), "redis")
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


def querybank_stats(state: ServiceState) -> dict[str, tuple[int, int]]:
    """direction -> (size, version) of each of the serving model's live banks."""
    out: dict[str, tuple[int, int]] = {}
    for modality, direction in BANK_DIRECTION.items():
        size, version = state.serving_bank(modality)
        out[direction] = (size, version or 0)
    return out


def queue_stats(state: ServiceState) -> dict[str, int]:
    """Queue depth, pending and dead letters."""
    queue = state.queue
    if queue is None:
        return {}
    return {
        "depth": queue.depth(),
        "pending": queue.pending(),
        "dead_letters": queue.dead_letters(),
    }
