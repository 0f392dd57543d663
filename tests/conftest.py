"""Shared fixtures: paths to the real data beside the repo, and the real Redis."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("XMODAL_SHARED_DATA", REPO.parent / "shared" / "data"))
FLICKR = SHARED_DATA / "flickr8k"
VIDEO = SHARED_DATA / "video"
REDIS_URL = os.environ.get("XMODAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def flickr_dir() -> Path:
    if not (FLICKR / "captions.jsonl").exists():
        pytest.skip(f"real data not found at {FLICKR} (needs ../shared/data/flickr8k)")
    return FLICKR


@pytest.fixture(scope="session")
def video_dir() -> Path:
    if not VIDEO.is_dir() or not any(VIDEO.glob("*.mp4")):
        pytest.skip(f"real videos not found at {VIDEO} (needs ../shared/data/video)")
    return VIDEO


@pytest.fixture()
def redis_url() -> str:
    """A real Redis database (db 15 by default), flushed before and after the test."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no Redis answering at {REDIS_URL}")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()
