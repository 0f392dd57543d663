"""Scrape-time probes of Redis mode (service.monitoring) against the real Redis: queue lag and
replica log lag from real streams, live workers from real heartbeats, and ``xmodal_redis_up 0``
against a port where no Redis listens. Unique stream names in db 12 (shared Redis: no FLUSH).
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from service import metrics
from service.heartbeat import Heartbeat
from service.monitoring import live_worker_names, oldest_entry_age_s, refresh_distributed
from tests.service.test_heartbeat import PROM_REDIS_URL, _client, delete_keys

pytestmark = pytest.mark.redis


@pytest.fixture()
def names() -> Iterator[tuple[Any, str, str]]:
    client = _client()
    tag = f"test-prom-{uuid.uuid4().hex[:10]}"
    yield client, f"{tag}:ingest", f"{tag}:vectors"
    delete_keys(client, f"{tag}*")
    client.close()


def _state(client: Any, ingest: str, vectors: str, position: str = "0-0") -> SimpleNamespace:
    return SimpleNamespace(
        settings=SimpleNamespace(redis_url=PROM_REDIS_URL),
        redis=client,
        queue=SimpleNamespace(stream=ingest),
        replica=SimpleNamespace(stream=vectors, position=position, gap=False),
    )


def _value(gauge: Any) -> float:
    return float(gauge._value.get())


def test_lags_and_workers_from_real_streams(names: tuple[Any, str, str]) -> None:
    client, ingest, vectors = names
    state = _state(client, ingest, vectors)
    refresh_distributed(state)  # empty streams: nothing waits
    assert _value(metrics.REDIS_UP) == 1
    assert _value(metrics.QUEUE_LAG) == 0 and _value(metrics.REPLICA_LAG) == 0
    assert _value(metrics.WORKERS_LIVE) == 0
    assert live_worker_names(state) == []

    first = client.xadd(vectors, {"op": "u"}).decode()
    client.xadd(ingest, {"job": "j"})
    time.sleep(0.3)
    second = client.xadd(vectors, {"op": "u"}).decode()
    Heartbeat(client, "w-probe", stream=ingest, interval_s=1, ttl_s=30).beat()
    refresh_distributed(state)
    assert 0.25 <= _value(metrics.QUEUE_LAG) < 30
    assert 0.25 <= _value(metrics.REPLICA_LAG) < 30  # the first entry is not applied
    assert _value(metrics.WORKERS_LIVE) == 1
    assert live_worker_names(state) == ["w-probe"]

    state.replica.position = first  # applied the first: the second is younger
    refresh_distributed(state)
    assert _value(metrics.REPLICA_LAG) < 0.25
    state.replica.position = second  # caught up
    state.replica.gap = True
    refresh_distributed(state)
    assert _value(metrics.REPLICA_LAG) == 0 and _value(metrics.REPLICA_GAP) == 1
    assert oldest_entry_age_s(client, vectors, after=second) == 0.0


def test_redis_unreachable_reads_zero() -> None:
    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    dead = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=1)
    metrics.REDIS_UP.set(1)
    state = _state(dead, "x:ingest", "x:vectors")
    refresh_distributed(state)
    assert _value(metrics.REDIS_UP) == 0
    assert live_worker_names(state) is None
    embedded = SimpleNamespace(settings=SimpleNamespace(redis_url=None), redis=None)
    assert live_worker_names(embedded) is None
