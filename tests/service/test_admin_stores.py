"""The store methods behind the admin routes, on both backends: recent jobs, and re-queueing
dead letters (payload kept: text, Redis blobs and embedded blobs)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.deadletters import requeue_dead_letters
from service.jobs import LocalJobStore, RedisJobStore
from service.queue import LocalQueue, RedisStreamQueue

REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture()
def redis_prefix() -> Iterator[str]:
    """A unique key prefix on the real Redis (its keys are deleted after; no FLUSHDB)."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(f"no Redis answering at {REDIS_URL}")
    prefix = f"xmodal-cli-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def _stores(kind: str, tmp_path: Path, prefix: str | None) -> tuple[Any, Any]:
    if kind == "local":
        return LocalQueue(tmp_path / "q.sqlite3"), LocalJobStore(tmp_path / "j.sqlite3")
    assert prefix is not None
    return (
        RedisStreamQueue(REDIS_URL, stream=f"{prefix}:ingest", spill_bytes=16),
        RedisJobStore(REDIS_URL, prefix=f"{prefix}:job:"),
    )


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_recent_jobs_newest_first(kind: str, tmp_path: Path, request: Any) -> None:
    prefix = request.getfixturevalue("redis_prefix") if kind == "redis" else None
    queue, jobs = _stores(kind, tmp_path, prefix)
    for name in ("j1", "j2", "j3"):
        jobs.create(name, ["a"])
        time.sleep(0.01)
    assert [j for j, _ in jobs.recent(2)] == ["j3", "j2"]
    assert len(jobs.recent(10)) == 3
    queue.close()
    jobs.close()


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_requeue_dead_letters(kind: str, tmp_path: Path, request: Any) -> None:
    prefix = request.getfixturevalue("redis_prefix") if kind == "redis" else None
    queue, jobs = _stores(kind, tmp_path, prefix)
    media = b"\x89PNG fake bytes long enough to spill into the blob store"
    items = [
        {"id": "txt", "modality": "text", "text": "a caption", "metadata": {"k": 1}},
        {"id": "img", "modality": "image", "data": media, "metadata": {}},
    ]
    jobs.create("old", ["txt", "img"])
    queue.enqueue("old", items)
    for m in queue.read("w", 10):
        queue.dead_letter(m, "boom")
    letters = queue.list_dead_letters()
    assert [d.item["id"] for d in letters] == ["txt", "img"]
    by_item = {d.item["id"]: d.message_id for d in letters}

    assert requeue_dead_letters(queue, jobs, ["nope"]).not_found == ["nope"]
    result = requeue_dead_letters(queue, jobs, None)
    assert result.job_id is not None
    again = {m.item["id"]: m for m in queue.read("w2", 10)}
    assert again["txt"].item["text"] == "a caption" and again["txt"].job_id == result.job_id
    status = jobs.get(result.job_id)
    assert status is not None
    # the spilled payload outlives the dead letter (Redis: until its TTL; embedded: until the
    # dead letter is deleted): the image is back, with its bytes
    assert sorted(result.requeued) == sorted(by_item.values())
    assert again["img"].item["content"] == media
    assert [it.id for it in status.items] == ["txt", "img"]
    assert queue.dead_letters() == 0
    if kind == "local":  # the requeue deleted the dead letters and the blob they kept
        assert queue.load_blob("local:1") is None
    queue.close()
    jobs.close()
