"""End to end, as deployed: an API process and a worker process on the real Redis.

Ingests the 1,000 Flickr8k dev photos and one caption per photo, then searches with a
*different* caption of each photo (text -> image) and with each photo (image -> text), and
checks jobs, idempotency, delete, restart and bad input on the way. Uses the shipped default
model, so it also proves that the model we ship retrieves on real data.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.redis]

N_QUERIES = 200  # searches per direction (all 1,000 items are indexed)
MOST = 0.5  # the "right item in the top 10 for most queries"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited early:\n{log.read_text()[-4000:]}"
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"API not ready in time:\n{log.read_text()[-4000:]}")


def _wait_job(client: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not done in {timeout}s: {job}")


@pytest.fixture(scope="module")
def dev_set(flickr_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (flickr_dir / "captions.jsonl").open()]
    dev = [r for r in rows if r["split"] == "dev"]
    assert len(dev) == 1000
    return dev


@pytest.fixture()
def cluster(redis_url: str, tmp_path: Path) -> Iterator[dict]:
    port = _free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_")}
    base_env.update(
        XMODAL_REDIS_URL=redis_url,
        XMODAL_LOG_JSON="true",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    api_env = dict(base_env, XMODAL_DATA_DIR=str(tmp_path / "api"), XMODAL_WORKER__EMBEDDED="false")
    worker_env = dict(
        base_env, XMODAL_DATA_DIR=str(tmp_path / "worker"), XMODAL_WORKER__METRICS_PORT="0"
    )
    api_args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    state = {
        "api": _start(api_args, api_env, tmp_path / "api.log"),
        "worker": _start(["worker"], worker_env, tmp_path / "worker.log"),
        "api_args": api_args,
        "api_env": api_env,
        "log": tmp_path / "api.log",
        "client": httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120),
    }
    try:
        _wait_ready(state["client"], state["api"], state["log"])
        yield state
    finally:
        state["client"].close()
        _stop(state["api"])
        _stop(state["worker"])


def _search(client: httpx.Client, body: dict) -> list[str]:
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    return [hit["id"] for hit in r.json()["results"]]


def test_flickr_dev_end_to_end(cluster: dict, dev_set: list[dict], flickr_dir: Path) -> None:
    client: httpx.Client = cluster["client"]

    # Ingest every dev photo and its first caption, in batches, through the real queue.
    job_ids = []
    for start in range(0, len(dev_set), 100):
        items = []
        for row in dev_set[start : start + 100]:
            data = base64.b64encode((flickr_dir / "images" / row["image"]).read_bytes()).decode()
            items.append(
                {
                    "id": f"img:{row['image']}",
                    "modality": "image",
                    "data": data,
                    "metadata": {"split": "dev"},
                }
            )
            items.append(
                {
                    "id": f"txt:{row['image']}",
                    "modality": "text",
                    "text": row["captions"][0],
                    "metadata": {"split": "dev"},
                }
            )
        r = client.post("/ingest", json={"items": items})
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == len(items)
        job_ids.append(r.json()["job_id"])
    for job_id in job_ids:
        job = _wait_job(client, job_id)
        assert job["state"] == "done"
        assert all(item["state"] == "indexed" for item in job["items"]), job

    # Replication reaches the API replica: every item becomes searchable.
    deadline = time.monotonic() + 120
    while client.get(f"/items/img:{dev_set[-1]['image']}").status_code != 200:
        assert time.monotonic() < deadline, "last item never became visible on the API replica"
        time.sleep(0.5)

    # Text -> image with a caption that was NOT ingested.
    queries = dev_set[:N_QUERIES]
    t2i_hits = sum(
        f"img:{row['image']}"
        in _search(client, {"text": row["captions"][1], "targets": ["image"], "top_k": 10})
        for row in queries
    )
    # Image -> text by indexed item id.
    i2t_hits = sum(
        f"txt:{row['image']}"
        in _search(client, {"item_id": f"img:{row['image']}", "targets": ["text"], "top_k": 10})
        for row in queries
    )
    # "Most queries": the shipped model's dev t2i R@10 is ~71% (docs/RESULTS.md); chance is 1%.
    recall = f"text->image R@10 {t2i_hits / N_QUERIES:.2f}, image->text {i2t_hits / N_QUERIES:.2f}"
    assert t2i_hits / N_QUERIES > MOST, recall
    assert i2t_hits / N_QUERIES > MOST, recall

    # Idempotent re-ingest: same id, same content -> job done, results unchanged.
    probe = {"text": queries[0]["captions"][1], "targets": ["image"], "top_k": 10}
    before = _search(client, probe)
    row = queries[0]
    again = [
        {
            "id": f"txt:{row['image']}",
            "modality": "text",
            "text": row["captions"][0],
            "metadata": {"split": "dev"},
        }
    ]
    job = _wait_job(client, client.post("/ingest", json={"items": again}).json()["job_id"])
    assert job["state"] == "done"
    assert _search(client, probe) == before

    # Bad input is a clear 4xx and the service stays healthy.
    bad = {
        "items": [
            {
                "id": "broken",
                "modality": "image",
                "data": base64.b64encode(b"\xff\xd8junk").decode(),
            }
        ]
    }
    r = client.post("/ingest", json=bad)
    if r.status_code == 202:  # validation may happen in the worker: the item must fail, not vanish
        job = _wait_job(client, r.json()["job_id"])
        assert job["items"][0]["state"] == "failed" and job["items"][0]["error"]
    else:
        assert 400 <= r.status_code < 500 and r.json()
    assert client.post("/search", json={"text": "", "targets": ["image"]}).status_code in (400, 422)
    assert client.get("/healthz").status_code == 200

    # Delete: the item disappears from GET and from search.
    victim = f"img:{row['image']}"
    assert client.delete(f"/items/{victim}").status_code in (200, 202, 204)
    deadline = time.monotonic() + 60
    while client.get(f"/items/{victim}").status_code != 404:
        assert time.monotonic() < deadline, "deleted item still visible"
        time.sleep(0.5)
    assert victim not in _search(client, probe)
    after_delete = _search(client, probe)

    # Restart the API on the same data dir: the same answers.
    _stop(cluster["api"])
    cluster["api"] = _start(cluster["api_args"], cluster["api_env"], cluster["log"])
    _wait_ready(client, cluster["api"], cluster["log"])
    assert _search(client, probe) == after_delete
