"""open_backends: the one embedded-vs-Redis choice, configured from Settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from index.querybank import FileQueryBankStore, RedisQueryBankStore
from service.backends import backend_mode, open_backends
from service.jobs import LocalJobStore, RedisJobStore
from service.queue import LocalQueue, RedisStreamQueue
from service.replication import ReplicationPublisher
from service.sinks import GallerySink
from tests.service.test_api_helpers import make_settings


def test_embedded_backends_follow_the_settings(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, queue={"spill_bytes": 123, "job_ttl_s": 45}, ingest={"max_body_mb": 0.5}
    )
    assert backend_mode(settings) == "embedded"
    assert settings.ingest.max_body_bytes == 2**19
    b = open_backends(settings, galleries={})
    try:
        assert isinstance(b.queue, LocalQueue) and b.queue.spill_bytes == 123
        assert isinstance(b.jobs, LocalJobStore) and b.jobs.ttl_s == 45
        assert isinstance(b.querybank, FileQueryBankStore)
        assert isinstance(b.sink, GallerySink)
    finally:
        b.close()
    only = open_backends(settings, parts=("querybank",))
    assert only.queue is None and only.jobs is None and only.sink is None
    with pytest.raises(ValueError, match="unknown backend parts"):
        open_backends(settings, parts=("queues",))


def test_redis_backends_follow_the_settings(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(
        tmp_path, redis_url=redis_url, queue={"stream_maxlen": 77, "job_ttl_s": 46}
    )
    assert backend_mode(settings) == "redis"
    b = open_backends(settings)
    try:
        assert isinstance(b.queue, RedisStreamQueue) and b.queue.maxlen == 77
        assert isinstance(b.jobs, RedisJobStore) and b.jobs.ttl_s == 46
        assert isinstance(b.querybank, RedisQueryBankStore)
        assert isinstance(b.sink, ReplicationPublisher)
    finally:
        b.close()
