"""Scrape-time probes of distributed (Redis) mode, for ``/metrics`` and ``/readyz``.

At each scrape of an API replica, :func:`refresh_distributed` sets

- ``xmodal_redis_up``: 1 when Redis answered PING (else 0, and nothing else is probed);
- ``xmodal_workers_live``: workers with a live heartbeat (:mod:`service.heartbeat`);
- ``xmodal_ingest_queue_lag_seconds``: age of the oldest ingest message not yet acked
  (acked entries are deleted from the stream, so the first entry is the oldest unfinished);
- ``xmodal_replica_log_lag_seconds``: age of the oldest vector-log entry this replica has not
  applied (0 when caught up), and ``xmodal_replica_log_gap`` (1 = entries it needed were
  trimmed).

Ages are measured on Redis' clock (``TIME``) against the stream ids (milliseconds, also Redis'
clock), so skew between hosts does not enter. Every probe is a handful of O(1)/O(log n)
commands; none reads more than one stream entry.
"""

from __future__ import annotations

import logging
from typing import Any

from service import metrics
from service.heartbeat import DEFAULT_STREAM, live_workers

logger = logging.getLogger(__name__)


def redis_now_ms(client: Any) -> int:
    """Redis' own clock in milliseconds."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def oldest_entry_age_s(client: Any, stream: str, after: str | None = None) -> float:
    """Seconds since the oldest entry of ``stream`` (after id ``after``, exclusive) was added;
    0.0 when there is none."""
    start = "-" if after is None else f"({after}"
    rows = client.xrange(stream, min=start, max="+", count=1)
    if not rows:
        return 0.0
    entry_id = rows[0][0]
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    ms = int(str(entry_id).partition("-")[0])
    return max(0.0, (redis_now_ms(client) - ms) / 1000)


def _stream(state: Any) -> str:
    return str(getattr(state.queue, "stream", DEFAULT_STREAM))


def live_worker_names(state: Any) -> list[str] | None:
    """Consumer names of the live workers; None in embedded mode (the worker is in-process)
    or while Redis is unavailable."""
    if state.settings.redis_url is None or state.redis is None:
        return None
    try:
        return [b.consumer for b in live_workers(state.redis, _stream(state))]
    except Exception as exc:  # noqa: BLE001 - readiness reports the Redis check separately
        logger.warning("reading worker heartbeats failed: %r", exc)
        return None


def refresh_distributed(state: Any) -> None:
    """Set the Redis-mode gauges (module docstring); a no-op in embedded mode."""
    client = state.redis
    if state.settings.redis_url is None or client is None:
        return
    try:
        up = bool(client.ping())
    except Exception as exc:  # noqa: BLE001 - that is what the gauge reports
        logger.warning("metrics: Redis ping failed: %r", exc)
        up = False
    metrics.REDIS_UP.set(1 if up else 0)
    if not up:
        return
    stream = _stream(state)
    metrics.WORKERS_LIVE.set(len(live_workers(client, stream)))
    if state.queue is not None and hasattr(state.queue, "stream"):
        metrics.QUEUE_LAG.set(oldest_entry_age_s(client, stream))
    replica = state.replica
    if replica is not None:
        metrics.REPLICA_GAP.set(1 if getattr(replica, "gap", False) else 0)
        metrics.REPLICA_LAG.set(oldest_entry_age_s(client, replica.stream, replica.position))
