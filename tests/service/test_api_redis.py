"""The API in Redis mode against the real Redis: two API replicas (own data dirs) and one
worker publishing to the vector log. Both replicas answer the same after the same ingests,
deletes reach both, QB-Norm's bank is shared, and a restarted replica answers the same."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.jobs import RedisJobStore
from service.queue import RedisStreamQueue
from service.replication import ReplicationPublisher
from service.worker import EmbeddedWorker, Worker
from tests.service.test_api_helpers import image_bytes, make_settings, running, wait_job

pytestmark = pytest.mark.redis

TEXTS = {
    "r-dog": "a dog catches a frisbee in the air",
    "r-surf": "a surfer rides a large wave",
    "r-market": "people shop at a busy street market",
    "r-train": "an old steam train crosses a bridge",
}
IMAGES = {f"rp{i}": image_bytes(100 + i) for i in range(3)}


@pytest.fixture()
def worker(redis_url: str, model: Any, tmp_path: Path) -> Iterator[EmbeddedWorker]:
    settings = make_settings(tmp_path / "worker", redis_url=redis_url)
    w = Worker(
        model,
        RedisStreamQueue(redis_url),
        RedisJobStore(redis_url),
        ReplicationPublisher(redis_url),
        settings,
        consumer="test-redis-worker",
    )
    running_worker = EmbeddedWorker(w).start()
    yield running_worker
    running_worker.stop()


def _items() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [
        {"id": k, "modality": "text", "text": v, "metadata": {"kind": "caption"}}
        for k, v in TEXTS.items()
    ]
    items += [
        {"id": k, "modality": "image", "data": base64.b64encode(v).decode(), "metadata": {}}
        for k, v in IMAGES.items()
    ]
    return items


def _wait_visible(client: TestClient, item_id: str, present: bool = True) -> None:
    deadline = time.monotonic() + 30
    want = 200 if present else 404
    while client.get(f"/items/{item_id}").status_code != want:
        assert time.monotonic() < deadline, (
            f"{item_id} never became {'visible' if present else 'gone'}"
        )
        time.sleep(0.05)


QUERIES = [
    {"text": TEXTS["r-surf"], "targets": ["text", "image"], "top_k": 7},
    {"item_id": "rp1", "targets": ["image", "text"], "top_k": 5},
    {"image": base64.b64encode(IMAGES["rp2"]).decode(), "targets": ["image"], "top_k": 3},
]


def _answers(client: TestClient) -> list[list[tuple[str, float]]]:
    out = []
    for q in QUERIES:
        r = client.post("/search", json=q)
        assert r.status_code == 200, r.text
        out.append([(h["id"], round(h["score"], 5)) for h in r.json()["results"]])
    return out


def test_two_replicas_and_a_worker_agree(
    redis_url: str, model: Any, worker: EmbeddedWorker, tmp_path: Path
) -> None:
    settings_a = make_settings(tmp_path / "api-a", redis_url=redis_url)
    settings_b = make_settings(tmp_path / "api-b", redis_url=redis_url)
    with running(settings_a, model) as a, running(settings_b, model) as b:
        ready = a.get("/readyz").json()
        assert ready["checks"]["redis"] is True and ready["checks"]["replication"] is True

        r = a.post("/ingest", json={"items": _items()})
        assert r.status_code == 202, r.text
        job = wait_job(b, r.json()["job_id"])  # the job store is shared through Redis
        assert job["state"] == "done", job
        assert all(it["state"] == "indexed" for it in job["items"]), job
        for client in (a, b):
            for item_id in [*TEXTS, *IMAGES]:
                _wait_visible(client, item_id)

        answers = _answers(a)
        assert answers[0][0][0] == "r-surf"
        assert answers[1][0][0] == "rp1"
        assert answers[2][0][0] == "rp2"
        assert _answers(b) == answers

        # the querybank lives in Redis: appended on one replica, applied on both
        bank = {"texts": [f"a picture of item {i}" for i in range(30)]}
        assert a.post("/querybank", json=bank).status_code == 200
        assert b.get("/querybank").json()["size"] == 30
        q = {"text": "a wave", "targets": ["image"], "qbnorm": True}
        on_a = a.post("/search", json=q).json()
        assert on_a["qbnorm_applied"]  # the replica that appended refits at once
        deadline = time.monotonic() + 10  # the other notices the new version within ~1 s
        while not (on_b := b.post("/search", json=q).json())["qbnorm_applied"]:
            assert time.monotonic() < deadline, "replica b never picked up the new bank"
            time.sleep(0.2)
        assert on_a["results"] == on_b["results"]

        # a delete on one replica reaches the other through the vector log
        assert b.delete("/items/r-market").status_code == 200
        assert b.get("/items/r-market").status_code == 404  # read-your-writes on b
        _wait_visible(a, "r-market", present=False)
        after_delete = _answers(a)
        assert _answers(b) == after_delete
        assert all("r-market" not in [i for i, _ in row] for row in after_delete)

    # restart replica a on its data dir: same answers, no re-ingest
    with running(settings_a, model) as a:
        assert _answers(a) == after_delete
    assert worker.alive
