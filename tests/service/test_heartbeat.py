"""Worker heartbeats against the real Redis: a worker is live while it beats, gone when it
stops or its TTL runs out; the API reports live workers in /readyz and /metrics, and a job
waiting with no live worker says so in GET /jobs/{id} until a real worker picks it up.

Redis: ``XMODAL_TEST_PROM_REDIS_URL`` (default db 12 of 127.0.0.1:6379, so the shared db 15
other tests flush is not used). Unit tests use a unique stream name; the API test needs the
service's fixed ``xmodal:*`` keys and deletes only those, in that db, before and after.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.heartbeat import (
    Heartbeat,
    beat_prefix,
    live_workers,
    start_worker_heartbeat,
    waiting_hint,
    workers_key,
)
from tests.service.test_api_helpers import make_settings, running, wait_job

pytestmark = pytest.mark.redis

PROM_REDIS_URL = os.environ.get("XMODAL_TEST_PROM_REDIS_URL", "redis://127.0.0.1:6379/12")


def _client() -> Any:
    import redis

    client = redis.Redis.from_url(PROM_REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no Redis answering at {PROM_REDIS_URL}")
    return client


def delete_keys(client: Any, pattern: str) -> None:
    """Delete the keys matching ``pattern`` (SCAN, never FLUSH: the Redis is shared)."""
    batch = []
    for key in client.scan_iter(match=pattern, count=500):
        batch.append(key)
        if len(batch) >= 500:
            client.delete(*batch)
            batch = []
    if batch:
        client.delete(*batch)


@pytest.fixture()
def stream() -> Iterator[tuple[Any, str]]:
    client = _client()
    name = f"test-prom-{uuid.uuid4().hex[:10]}:ingest"
    yield client, name
    delete_keys(client, f"{name}*")
    client.close()


def test_a_beating_worker_is_live_and_gone_after_stop(stream: tuple[Any, str]) -> None:
    client, name = stream
    hb = Heartbeat(client, "w-a", stream=name, interval_s=0.1, ttl_s=2.0, info={"device": "cpu"})
    assert live_workers(client, name) == []
    hb.start()
    try:
        beats = live_workers(client, name)
        assert [b.consumer for b in beats] == ["w-a"]
        assert beats[0].device == "cpu" and beats[0].pid == os.getpid()
        hb.on_batch(type("Report", (), {"read": 7})())
        first = beats[0].beat_at
        deadline = time.monotonic() + 5
        while live_workers(client, name)[0].items != 7:  # the thread keeps beating
            assert time.monotonic() < deadline
            time.sleep(0.05)
        again = live_workers(client, name)[0]
        assert again.batches == 1 and again.beat_at > first and again.last_batch_at
        ttl_ms = client.pttl(beat_prefix(name) + "w-a")
        assert 0 < ttl_ms <= 2000
    finally:
        hb.stop()
    assert live_workers(client, name) == []
    assert not client.exists(beat_prefix(name) + "w-a")
    assert not client.sismember(workers_key(name), "w-a")


def test_a_silent_worker_expires_with_its_ttl(stream: tuple[Any, str]) -> None:
    client, name = stream
    crashed = Heartbeat(client, "w-crashed", stream=name, interval_s=0.1, ttl_s=0.4)
    alive = Heartbeat(client, "w-alive", stream=name, interval_s=0.1, ttl_s=30.0)
    crashed.beat()  # one beat, then silence: a killed process never calls stop()
    alive.beat()
    assert [b.consumer for b in live_workers(client, name)] == ["w-alive", "w-crashed"]
    time.sleep(0.6)
    assert [b.consumer for b in live_workers(client, name)] == ["w-alive"]
    assert not client.sismember(workers_key(name), "w-crashed")  # pruned from the index
    other = f"{name}-other"
    try:
        Heartbeat(client, "w-other", stream=other, interval_s=0.1, ttl_s=30.0).beat()
        assert [b.consumer for b in live_workers(client, name)] == ["w-alive"]
    finally:
        delete_keys(client, f"{other}*")


def test_heartbeat_rejects_a_ttl_shorter_than_its_interval() -> None:
    with pytest.raises(ValueError, match="must exceed"):
        Heartbeat(None, "w", interval_s=5.0, ttl_s=5.0)


def test_waiting_hint() -> None:
    assert waiting_hint(["queued", "indexed"], live=0) is not None
    assert "xmodal worker" in (waiting_hint(["queued"], live=0) or "")
    assert waiting_hint(["queued"], live=1) is None
    assert waiting_hint(["indexed", "failed"], live=0) is None


@pytest.fixture()
def service_keys() -> Iterator[str]:
    """PROM_REDIS_URL with the service's fixed keys (xmodal:*) absent before and after."""
    client = _client()
    delete_keys(client, "xmodal:*")
    yield PROM_REDIS_URL
    delete_keys(client, "xmodal:*")
    client.close()


def test_api_reports_live_workers_and_a_job_without_one(service_keys: str, tmp_path: Path) -> None:
    from models import create_model
    from service.commands.worker import build_worker
    from service.worker import EmbeddedWorker

    url = service_keys
    model = create_model("tiny-random", pretrained=False)
    settings = make_settings(
        tmp_path / "api",
        redis_url=url,
        worker={"embedded": False, "heartbeat_interval_s": 0.2, "heartbeat_ttl_s": 1.0},
    )
    with running(settings, model) as client:
        ready = client.get("/readyz").json()
        assert ready["workers"] == [], ready
        assert "xmodal_workers_live 0.0" in client.get("/metrics").text

        r = client.post(
            "/ingest", json={"items": [{"id": "hb-1", "modality": "text", "text": "a red kite"}]}
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        job = client.get(f"/jobs/{job_id}").json()
        assert job["state"] == "queued" and job["live_workers"] == 0
        assert "no live ingest worker" in job["detail"], job

        # A real Redis-mode worker (what `xmodal worker` builds), with its heartbeat.
        worker_settings = make_settings(
            tmp_path / "worker",
            redis_url=url,
            model={"name": "tiny-random"},
            worker={
                "consumer": "hb-worker",
                "heartbeat_interval_s": 0.2,
                "heartbeat_ttl_s": 1.0,
                "metrics_port": 0,
            },
        )
        worker = build_worker(worker_settings)
        heartbeat = start_worker_heartbeat(worker_settings, worker)
        running_worker = EmbeddedWorker(worker).start()
        try:
            assert client.get("/readyz").json()["workers"] == ["hb-worker"]
            done = wait_job(client, job_id)
            assert done["state"] == "done" and done["live_workers"] == 1
            assert done["detail"] is None
            assert "xmodal_workers_live 1.0" in client.get("/metrics").text
            deadline = time.monotonic() + 10
            while (beat := live_workers(worker.queue.redis)[0]).items < 1:  # the next beat
                assert time.monotonic() < deadline, beat
                time.sleep(0.05)
            assert beat.consumer == "hb-worker" and beat.batches >= 1 and beat.last_batch_at
        finally:
            running_worker.stop()
            heartbeat.stop()
        assert client.get("/readyz").json()["workers"] == []
        job = client.get(f"/jobs/{job_id}").json()
        assert job["detail"] is None  # done: nothing waits, whatever the workers
