"""Prometheus metrics of the service, shared by the API and the ingestion worker.

The metric objects are module-level so any part of the service (routes, encoder, worker,
replication) records into the same series; ``/metrics`` renders the process registry. Gauges
that mirror state owned elsewhere (index sizes, queue depth, querybank version) are refreshed
at scrape time by :func:`refresh` instead of being pushed from every write path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import Metric

logger = logging.getLogger(__name__)

# Latency buckets from 1 ms to 30 s: search is ms-scale, ingest/querybank calls can take seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# --- HTTP --------------------------------------------------------------------------------------
REQUESTS = Counter(
    "xmodal_http_requests_total",
    "HTTP requests by method, route template and status code.",
    ["method", "route", "status"],
)
REQUEST_LATENCY = Histogram(
    "xmodal_http_request_duration_seconds",
    "HTTP request latency by method, route template and status code.",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
ERRORS = Counter(
    "xmodal_http_errors_total",
    "Requests answered with an error, by route and error kind.",
    ["route", "kind"],
)

# --- reliability (issue 15) -------------------------------------------------------------------
QUERYBANK_STALE = Gauge(
    "xmodal_querybank_stale",
    "1 while the querybank store is unreachable and QB-Norm serves the cached bank.",
)

# --- search ------------------------------------------------------------------------------------
SEARCH_STAGE = Histogram(
    "xmodal_search_stage_seconds",
    "Time spent per search stage (encode, search, qbnorm, rerank).",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
SEARCHES = Counter(
    "xmodal_searches_total",
    "Searches by query kind and whether QB-Norm was applied.",
    ["query", "qbnorm"],
)
QUERY_BATCH_SIZE = Histogram(
    "xmodal_query_batch_size",
    "Queries encoded together by the micro-batching query encoder.",
    ["kind"],
    buckets=BATCH_BUCKETS,
)
QUERY_ENCODER_PENDING = Gauge(
    "xmodal_query_encoder_pending", "Queries waiting for the query encoder.", ["kind"]
)
REJECTED_OVERLOAD = Counter(
    "xmodal_rejected_overload_total", "Requests answered 429 because of overload.", ["route"]
)

# --- ingestion (recorded by the worker) --------------------------------------------------------
QUEUE_DEPTH = Gauge("xmodal_ingest_queue_depth", "Ingest messages queued and not yet read.")
QUEUE_PENDING = Gauge(
    "xmodal_ingest_queue_pending", "Ingest messages delivered to a worker and not yet acked."
)
DEAD_LETTERS = Gauge("xmodal_ingest_dead_letters", "Ingest items in the dead-letter stream.")
DEAD_LETTERED = Counter(
    "xmodal_ingest_dead_lettered_total", "Ingest items sent to the dead-letter stream."
)
ITEMS_ENQUEUED = Counter(
    "xmodal_items_enqueued_total", "Items accepted by POST /ingest.", ["modality"]
)
ITEMS_INDEXED = Counter("xmodal_items_indexed_total", "Items written to the index.", ["modality"])
ITEMS_FAILED = Counter("xmodal_items_failed_total", "Items that failed ingestion.", ["modality"])
ITEMS_DELETED = Counter("xmodal_items_deleted_total", "Items removed by DELETE /items.")
INGEST_BATCH_SIZE = Histogram(
    "xmodal_ingest_batch_size",
    "Items encoded together by the ingestion worker.",
    ["modality"],
    buckets=BATCH_BUCKETS,
)
ENCODE_SECONDS = Histogram(
    "xmodal_encode_seconds",
    "Model time per encoded batch, by what was encoded (query_text, image, video, text...).",
    ["kind"],
    buckets=LATENCY_BUCKETS,
)
ENCODED_ITEMS = Counter("xmodal_encoded_items_total", "Items run through the model.", ["kind"])
QUEUE_LAG = Gauge(
    "xmodal_ingest_queue_lag_seconds",
    "Age of the oldest ingest message not yet acked (0 when the queue is empty).",
)

# --- index and querybank -----------------------------------------------------------------------
INDEX_ITEMS = Gauge("xmodal_index_items", "Items in the index per modality.", ["modality"])
INDEX_VERSION = Gauge("xmodal_index_version", "Index version per modality.", ["modality"])
QUERYBANK_QUERIES = Gauge("xmodal_querybank_queries", "Queries in the querybank.", ["direction"])
QUERYBANK_VERSION = Gauge("xmodal_querybank_version", "Querybank version.", ["direction"])
READY = Gauge("xmodal_ready", "1 when the service is ready to serve.")

# --- distributed mode (Redis), refreshed by the API at scrape time -----------------------------
REDIS_UP = Gauge("xmodal_redis_up", "1 when this process reached Redis at the last scrape.")
WORKERS_LIVE = Gauge(
    "xmodal_workers_live", "Ingest workers with a live heartbeat in Redis (service.heartbeat)."
)
REPLICA_LAG = Gauge(
    "xmodal_replica_log_lag_seconds",
    "Age of the oldest vector-log entry this replica has not applied (0 = caught up).",
)
REPLICA_GAP = Gauge(
    "xmodal_replica_log_gap",
    "1 when vector-log entries this replica needed were trimmed away (its index is wrong).",
)


# What only an API replica knows; ``xmodal worker``'s /metrics leaves them out, so a worker
# does not export a constant ``xmodal_ready 0`` or ``xmodal_redis_up 0`` that alerts would read.
API_ONLY: tuple[Any, ...] = (
    READY,
    REDIS_UP,
    WORKERS_LIVE,
    REPLICA_LAG,
    REPLICA_GAP,
    QUEUE_LAG,
    INDEX_ITEMS,
    INDEX_VERSION,
    QUERYBANK_QUERIES,
    QUERYBANK_VERSION,
    ITEMS_DELETED,
)


class _WorkerCollector:
    """The process registry without :data:`API_ONLY` (collected afresh at each scrape)."""

    def __init__(self) -> None:
        self.skip = {m.describe()[0].name for m in API_ONLY}

    def collect(self) -> Iterable[Metric]:
        for metric in REGISTRY.collect():
            if metric.name not in self.skip:
                yield metric


def worker_registry() -> CollectorRegistry:
    """The registry ``xmodal worker`` serves: everything but the API-only series."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WorkerCollector())  # type: ignore[arg-type]
    return registry


def start_worker_server(port: int) -> None:
    """Serve :func:`worker_registry` on ``port`` (``xmodal worker``'s /metrics)."""
    from prometheus_client import start_http_server

    start_http_server(port, registry=worker_registry())


def observe_encode(kind: str, items: int, seconds: float) -> None:
    """Record one model call: its duration and its item count (throughput is
    ``rate(xmodal_encoded_items_total)``, computed by Prometheus from the counter)."""
    ENCODE_SECONDS.labels(kind).observe(seconds)
    ENCODED_ITEMS.labels(kind).inc(items)


def refresh(
    galleries: Mapping[str, Any],
    querybank: Mapping[str, tuple[int, int]] | None = None,
    queue_stats: Mapping[str, Any] | None = None,
) -> None:
    """Set the state gauges from the live objects (called at scrape time).

    ``galleries`` maps modality -> Gallery, ``querybank`` maps direction -> (size, version),
    ``queue_stats`` may hold ``depth``, ``pending``, ``dead_letters`` and ``lag_seconds``.
    """
    for modality, gallery in galleries.items():
        INDEX_ITEMS.labels(modality).set(len(gallery))
        INDEX_VERSION.labels(modality).set(getattr(gallery, "version", 0))
    for direction, (size, version) in (querybank or {}).items():
        QUERYBANK_QUERIES.labels(direction).set(size)
        QUERYBANK_VERSION.labels(direction).set(version)
    stats = queue_stats or {}
    gauges: Iterable[tuple[str, Gauge]] = (
        ("depth", QUEUE_DEPTH),
        ("pending", QUEUE_PENDING),
        ("dead_letters", DEAD_LETTERS),
        ("lag_seconds", QUEUE_LAG),
    )
    for key, gauge in gauges:
        value = stats.get(key)
        if isinstance(value, (int, float)):
            gauge.set(value)


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition of the process registry and its content type."""
    return _generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def safe(fn: Callable[[], Any], what: str) -> Any:
    """Run a best-effort metrics probe; a failing probe is logged, never breaks a scrape."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a probe must never fail /metrics
        logger.warning("metrics probe failed: %s", what, exc_info=True)
        return None
