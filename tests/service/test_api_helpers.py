"""Shared helpers of the API tests (no tests here): settings, a running app, media."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test: temp data dir, no fsync, short batching windows."""
    nested: dict[str, dict[str, Any]] = {
        "index": {"fsync": False},
        "model": {"query_batch_wait_ms": 1.0, "threads": 2},
        "worker": {"batch_wait_ms": 10, "consumer": "test-worker"},
        "ingest": {},
        "auth": {},
    }
    flat: dict[str, Any] = {"data_dir": data_dir, "redis_url": None, "log_json": False}
    for key, value in overrides.items():
        if key in nested:
            nested[key].update(value)
        else:
            flat[key] = value
    return Settings(**flat, **nested)


def wait_ready(client: TestClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return
        assert r.status_code == 503, r.text
        time.sleep(0.05)
    raise AssertionError(f"app not ready: {client.get('/readyz').json()}")


@contextmanager
def running(
    settings: Settings, model: Any, headers: dict[str, str] | None = None
) -> Iterator[TestClient]:
    """The real app (lifespan included) behind a TestClient, once ready."""
    app = create_app(settings, model=model)
    with TestClient(app, headers=headers or {}) as client:
        wait_ready(client)
        yield client


def wait_job(client: TestClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = client.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not done in {timeout}s: {job}")


def image_bytes(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    """A distinct generated picture (noise over a gradient), encoded."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3)[None, None, :]
    noise = rng.integers(0, 80, size=(h, w, 3)).astype(np.float32)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, fmt)
    return buf.getvalue()


def search_ids(client: TestClient, body: dict[str, Any]) -> list[str]:
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    return [hit["id"] for hit in r.json()["results"]]
