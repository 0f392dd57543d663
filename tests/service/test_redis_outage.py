"""Issue #15 item 4: a Redis outage answers 503 + Retry-After, never a bare 500, and leaves
nothing half-accepted; search goes on with the cached querybank and says it may be stale;
after Redis returns (append-only file) the queued jobs and the querybank are all there and
processing resumes.

Runs its own redis-server on a free port (tests/service/redis_server.py), SIGKILLs it while
ingest requests are in flight, and starts it again on the same directory."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.jobs import RedisJobStore
from service.queue import RedisStreamQueue
from service.replication import ReplicationPublisher
from service.worker import EmbeddedWorker, Worker
from tests.service.redis_server import OwnRedis
from tests.service.test_api_helpers import image_bytes, make_settings, running, wait_job


@pytest.fixture(scope="module")
def model() -> Any:
    from models import create_model

    return create_model("tiny-random", pretrained=False)


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis").start()
    yield server
    server.stop()


def _worker(url: str, model: Any, tmp_path: Path) -> EmbeddedWorker:
    settings = make_settings(tmp_path / "worker", redis_url=url)
    w = Worker(
        model,
        RedisStreamQueue(url),
        RedisJobStore(url),
        ReplicationPublisher(url),
        settings,
        consumer="outage-worker",
        record_metrics=False,
    )
    return EmbeddedWorker(w).start()


def _text_items(prefix: str, n: int) -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}-{i}", "modality": "text", "text": f"caption {prefix} number {i}"}
        for i in range(n)
    ]


def _assert_503(r: Any) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert int(r.headers["retry-after"]) >= 1
    body = r.json()
    assert body["request_id"] == r.headers["x-request-id"]
    assert "127.0.0.1" not in r.text and "Error 111" not in r.text


def test_outage_is_503_nothing_half_accepted_and_everything_resumes(
    own_redis: OwnRedis, model: Any, tmp_path: Path
) -> None:
    import redis

    url = own_redis.url
    settings = make_settings(tmp_path / "api", redis_url=url)
    with running(settings, model) as c:
        # before: a querybank, a few indexed items (needs a worker), QB-Norm applied
        worker = _worker(url, model, tmp_path)
        images = [
            {
                "id": f"img-{i}",
                "modality": "image",
                "data": base64.b64encode(image_bytes(i)).decode(),
            }
            for i in range(4)
        ]
        r = c.post("/ingest", json={"items": _text_items("pre", 6) + images})
        assert r.status_code == 202, r.text
        assert wait_job(c, r.json()["job_id"])["state"] == "done"
        texts = [f"a query about things {i}" for i in range(20)]
        assert c.post("/querybank", json={"texts": texts}).status_code == 200
        bank_before = c.get("/querybank").json()
        assert bank_before["size"] == 20
        worker.stop()  # from here on, accepted jobs stay queued until the worker is back

        accepted: list[str] = []  # job ids answered 202
        statuses: list[int] = []
        stop = threading.Event()

        def flood() -> None:
            n = 0
            while not stop.is_set():
                resp = c.post("/ingest", json={"items": _text_items(f"f{n}", 3)})
                statuses.append(resp.status_code)
                if resp.status_code == 202:
                    accepted.append(resp.json()["job_id"])
                else:
                    _assert_503(resp)
                n += 1

        flooder = threading.Thread(target=flood)
        flooder.start()
        time.sleep(1.0)
        own_redis.kill()  # a crash, with ingests in flight
        time.sleep(1.0)
        stop.set()
        flooder.join(30)
        assert 500 not in statuses, statuses
        assert accepted and 503 in statuses, statuses

        # during the outage: every Redis route is 503 + Retry-After
        _assert_503(c.post("/ingest", json={"items": _text_items("down", 2)}))
        _assert_503(c.get(f"/jobs/{accepted[0]}"))
        _assert_503(c.get("/querybank"))
        _assert_503(c.post("/querybank", json={"texts": ["more"]}))
        # search answers with the cached bank, and says it may be stale
        q = {"text": "caption pre number 2", "targets": ["text"], "top_k": 3}
        plain = c.post("/search", json=q)
        assert plain.status_code == 200 and plain.json()["results"][0]["id"] == "pre-2"
        time.sleep(1.1)  # past the bank version check interval
        qb = c.post("/search", json={"text": "a query", "targets": ["image"], "qbnorm": True})
        assert qb.status_code == 200, qb.text
        assert qb.json()["qbnorm_applied"] and qb.json()["querybank_stale"] is True
        metrics = c.get("/metrics").text
        assert "xmodal_querybank_stale 1.0" in metrics
        assert "xmodal_storage_unavailable_total" in metrics
        assert 'status="500"' not in metrics

        own_redis.start()  # the same port and directory: the AOF brings everything back
        deadline = time.monotonic() + 15
        while c.get("/querybank").status_code != 200:
            assert time.monotonic() < deadline, "the API did not recover after Redis returned"
            time.sleep(0.2)
        assert c.get("/querybank").json() == bank_before

        # nothing half-accepted: every job in Redis has all its items in the stream, and
        # every 202'd job is there
        raw = redis.Redis.from_url(url)
        jobs = {k.decode().split(":")[-1]: k for k in raw.scan_iter("xmodal:job:*")}
        queued: dict[str, int] = {}
        for _, f in raw.xrange("xmodal:ingest"):
            queued[f[b"job"].decode()] = queued.get(f[b"job"].decode(), 0) + 1
        assert set(accepted) <= set(jobs), "a 202'd job is missing after the restart"
        for job_id, key in jobs.items():
            n_items = len(json.loads(raw.hget(key, "_items")))
            states = {raw.hget(key, f"s:{i}") for i in json.loads(raw.hget(key, "_items"))}
            if states == {b"indexed"}:
                continue  # the job from before the outage
            assert queued.get(job_id, 0) == n_items, (job_id, queued.get(job_id), n_items)
        assert set(queued) <= set(jobs), "queued messages of a job that does not exist"
        raw.close()

        # processing resumes: the queued jobs finish, and search is fresh again
        worker = _worker(url, model, tmp_path)
        try:
            for job_id in accepted:
                assert wait_job(c, job_id)["state"] == "done"
        finally:
            worker.stop()
        r = c.post("/ingest", json={"items": _text_items("post", 2)})
        assert r.status_code == 202, r.text
        time.sleep(1.1)
        qb = c.post("/search", json={"text": "a query", "targets": ["image"], "qbnorm": True})
        assert qb.status_code == 200 and qb.json()["qbnorm_applied"]
        assert qb.json()["querybank_stale"] is False
        assert "xmodal_querybank_stale 0.0" in c.get("/metrics").text
