"""Both ingest queues against the same semantics: real Redis and real SQLite files."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.heartbeat import Heartbeat
from service.queue import IngestQueue, LocalQueue, RedisStreamQueue


@pytest.fixture(params=["redis", "local"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IngestQueue]:
    q: IngestQueue
    if request.param == "redis":
        q = RedisStreamQueue(request.getfixturevalue("redis_url"), spill_bytes=1024)
    else:
        q = LocalQueue(tmp_path / "queue.sqlite3", spill_bytes=1024)
    yield q
    q.close()


def _items(n: int, prefix: str = "t") -> list[dict]:
    return [{"id": f"{prefix}{i}", "modality": "text", "text": f"item {i}"} for i in range(n)]


def test_enqueue_read_ack(queue: IngestQueue) -> None:
    ids = queue.enqueue("job1", _items(5))
    assert len(ids) == 5 and len(set(ids)) == 5
    assert queue.stats() == {"depth": 5, "pending": 0, "dead_letters": 0}
    batch = queue.read("w1", count=3, block_ms=0)
    assert [m.item["id"] for m in batch] == ["t0", "t1", "t2"]
    assert all(m.job_id == "job1" and m.deliveries == 1 for m in batch)
    assert (queue.depth(), queue.pending()) == (2, 3)
    # another consumer gets the rest, never the same messages
    rest = queue.read("w2", count=10, block_ms=0)
    assert [m.item["id"] for m in rest] == ["t3", "t4"]
    queue.ack([m.id for m in batch + rest])
    assert queue.stats() == {"depth": 0, "pending": 0, "dead_letters": 0}
    assert queue.read("w1", count=10, block_ms=0) == []


def test_read_blocks_until_enqueue(queue: IngestQueue) -> None:
    t0 = time.monotonic()
    assert queue.read("w1", count=1, block_ms=150) == []
    assert time.monotonic() - t0 >= 0.12
    threading.Timer(0.1, lambda: queue.enqueue("j", _items(1))).start()
    got = queue.read("w1", count=1, block_ms=3000)
    assert [m.item["id"] for m in got] == ["t0"]


def test_reclaim_counts_deliveries_and_keeps_errors(queue: IngestQueue) -> None:
    queue.enqueue("job", _items(2))
    first = queue.read("crashed", count=2, block_ms=0)
    assert len(first) == 2
    queue.nack(first[0], "boom: CUDA out of memory")
    # not idle long enough yet
    assert queue.reclaim("rescuer", min_idle_ms=60_000, count=10) == []
    again = queue.reclaim("rescuer", min_idle_ms=0, count=10)
    assert sorted(m.item["id"] for m in again) == ["t0", "t1"]
    assert all(m.deliveries == 2 for m in again)
    assert {m.item["id"]: m.last_error for m in again}["t0"] == "boom: CUDA out of memory"
    assert queue.pending() == 2 and queue.depth() == 0
    third = queue.reclaim("third", min_idle_ms=0, count=1)
    assert len(third) == 1 and third[0].deliveries == 3
    queue.ack([m.id for m in again])
    assert queue.pending() == 0


def test_dead_letter(queue: IngestQueue) -> None:
    queue.enqueue("job", _items(2))
    msgs = queue.read("w", count=2, block_ms=0)
    queue.dead_letter(msgs[0], "decoder crashed 3 times")
    assert queue.stats() == {"depth": 0, "pending": 1, "dead_letters": 1}
    [dead] = queue.list_dead_letters()
    assert dead.job_id == "job" and dead.item["id"] == "t0" and "crashed" in dead.error
    assert dead.message_id == msgs[0].id and dead.deliveries == 1
    # a dead-lettered message is never reclaimed
    assert [m.item["id"] for m in queue.reclaim("w2", 0, 10)] == ["t1"]


def test_bytes_the_caller_decoded_spill_without_a_second_decode(
    queue: IngestQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /ingest hands over the bytes it decoded to validate an item (``content``): a
    spilled item stores them as they are; a small one keeps its base64 inline, as before."""
    import service.queue

    def no_decode(*_: object, **__: object) -> bytes:
        raise AssertionError("base64 decoded a second time")

    monkeypatch.setattr(service.queue, "decode_base64", no_decode)
    big, small = os.urandom(50_000), b"tiny"
    queue.enqueue(
        "job",
        [
            {
                "id": "big",
                "modality": "image",
                "data": base64.b64encode(big).decode(),
                "content": big,
            },
            {
                "id": "small",
                "modality": "image",
                "data": base64.b64encode(small).decode(),
                "content": small,
            },
        ],
    )
    msgs = {m.item["id"]: m for m in queue.read("w", count=10, block_ms=0)}
    assert msgs["big"].item["content"] == big and "data" not in msgs["big"].item
    assert msgs["small"].item["data"] == base64.b64encode(small).decode()
    assert "content" not in msgs["small"].item  # the inline copy is the only one
    queue.ack([m.id for m in msgs.values()])


def test_large_payloads_spill_out_of_the_entry(queue: IngestQueue) -> None:
    big = os.urandom(50_000)
    small = b"tiny"
    queue.enqueue(
        "job",
        [
            {"id": "big", "modality": "image", "data": base64.b64encode(big).decode()},
            {"id": "raw", "modality": "image", "data": big},  # bytes always spill
            {"id": "small", "modality": "image", "data": base64.b64encode(small).decode()},
        ],
    )
    msgs = {m.item["id"]: m for m in queue.read("w", count=10, block_ms=0)}
    assert msgs["big"].item["content"] == big and "data" not in msgs["big"].item
    assert msgs["raw"].item["content"] == big
    assert msgs["small"].item["data"] == base64.b64encode(small).decode()
    if isinstance(queue, RedisStreamQueue):
        # the stream entry holds a reference, not the megabytes
        [(_, fields)] = queue.redis.xrange(queue.stream, count=1)
        assert len(fields[b"item"]) < 300
        assert len(queue.redis.keys(queue.blob_prefix + "*")) == 2
    queue.ack([m.id for m in msgs.values()])
    if isinstance(queue, RedisStreamQueue):
        assert queue.redis.keys(queue.blob_prefix + "*") == []


def test_expired_blob_is_reported(redis_url: str) -> None:
    q = RedisStreamQueue(redis_url, spill_bytes=10)
    q.enqueue(
        "job", [{"id": "x", "modality": "image", "data": base64.b64encode(b"x" * 64).decode()}]
    )
    for key in q.redis.keys(q.blob_prefix + "*"):
        q.redis.delete(key)
    [msg] = q.read("w", 1)
    assert msg.item.get("blob_missing") is True and "content" not in msg.item


def test_local_queue_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    q = LocalQueue(path)
    q.enqueue("job", _items(3))
    [m] = q.read("w", 1)
    q.close()  # "crash" with t0 pending
    q2 = LocalQueue(path)
    assert (q2.depth(), q2.pending()) == (2, 1)
    [back] = q2.reclaim("w-restarted", 0, 10)
    assert back.item["id"] == "t0" and back.deliveries == 2
    q2.close()


def test_redis_group_is_created_once_and_recreated(redis_url: str) -> None:
    q1 = RedisStreamQueue(redis_url)
    q2 = RedisStreamQueue(redis_url)  # BUSYGROUP tolerated
    q1.enqueue("j", _items(1))
    assert len(q2.read("w", 5)) == 1
    redis.Redis.from_url(redis_url).flushdb()
    assert q1.read("w", 5, block_ms=10) == []  # NOGROUP: recreated, no crash
    q1.enqueue("j", _items(1))
    assert len(q1.read("w", 5)) == 1


# --- fast reclaim after a crash (issue #15 item 5) --------------------------------------------
def test_a_restarted_embedded_queue_recovers_its_pending_at_once(tmp_path: Path) -> None:
    first = LocalQueue(tmp_path / "q.sqlite3")
    first.enqueue("j", [{"id": f"i{n}", "modality": "text", "text": "x"} for n in range(5)])
    assert len(first.read("w", 3)) == 3  # then the process is SIGKILLed
    first.close()
    again = LocalQueue(tmp_path / "q.sqlite3")
    got = again.recover("w-after-restart", 10)  # any consumer name: the process owns the file
    assert sorted(m.item["id"] for m in got) == ["i0", "i1", "i2"]
    assert all(m.deliveries == 2 for m in got)
    assert again.recover("w-after-restart", 10) == []  # what it reads now is its own
    assert len(again.read("w-after-restart", 10)) == 2
    assert again.recover("w-after-restart", 10) == []
    assert again.mark_solo(got[0]) == 1 and again.mark_solo(got[0]) == 2
    [back] = again.reclaim("w2", 0, 1)
    assert back.solo == 2  # the count of tries alone is durable
    again.close()


def test_a_redis_consumer_recovers_its_own_pending_first(redis_url: str) -> None:
    queue = RedisStreamQueue(redis_url)
    queue.enqueue("j", [{"id": f"i{n}", "modality": "text", "text": "x"} for n in range(7)])
    assert len(queue.read("me", 5)) == 5  # then the worker dies
    restarted = RedisStreamQueue(redis_url)
    page1 = restarted.recover("me", 3)
    page2 = restarted.recover("me", 3)
    assert [m.item["id"] for m in page1 + page2] == ["i0", "i1", "i2", "i3", "i4"]
    assert all(m.deliveries == 2 for m in page1 + page2)
    assert restarted.recover("me", 3) == []
    assert restarted.recover("someone-else", 3) == []
    restarted.ack([m.id for m in page1])
    assert restarted.mark_solo(page2[0]) == 1
    assert restarted.pending() == 2


def test_a_dead_peers_work_is_reclaimed_once_its_heartbeat_expires(redis_url: str) -> None:
    queue = RedisStreamQueue(redis_url)
    queue.enqueue("j", [{"id": f"i{n}", "modality": "text", "text": "x"} for n in range(6)])
    # the workers' heartbeat records (service.heartbeat) are what liveness means here
    Heartbeat(queue.redis, "alive", stream=queue.stream, interval_s=1, ttl_s=60).beat()
    Heartbeat(queue.redis, "dying", stream=queue.stream, interval_s=0.05, ttl_s=0.1).beat()
    assert len(queue.read("alive", 2)) == 2
    assert len(queue.read("dying", 4)) == 4
    assert queue.reclaim_dead("me", 10, min_idle_ms=0) == []  # both still beat
    time.sleep(0.2)  # dying's heartbeat key expires
    got = queue.reclaim_dead("me", 3, min_idle_ms=0)
    assert len(got) == 3 and all(m.deliveries == 2 for m in got)  # a full batch per call
    assert len(queue.reclaim_dead("me", 10, min_idle_ms=0)) == 1
    assert queue.reclaim_dead("me", 10, min_idle_ms=0) == []  # alive's work stays its own
