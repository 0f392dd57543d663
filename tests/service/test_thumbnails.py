"""Thumbnails (service/thumbnails.py, GET /items/{id}/thumbnail) and the page's own routes
(GET /, /static/*, /ui/config): real app, in-process worker, tiny model, temp data dir."""

from __future__ import annotations

import base64
import io
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.media import load_video
from service.settings import IngestSettings, Settings, ThumbnailSettings
from service.thumbnails import (
    JPEG,
    TEXT,
    FileThumbnailStore,
    Preview,
    RedisThumbnailStore,
    ThumbnailWriter,
    make_preview,
)
from tests.service.test_api_helpers import image_bytes, make_settings, running, wait_job

REDIS_URL = os.environ.get("XMODAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="module")
def model() -> Any:
    from models import create_model

    return create_model("tiny-random", pretrained=False)


def _jpeg_size(blob: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(blob)) as img:
        assert img.format == "JPEG"
        return img.size


# ---- making previews ----------------------------------------------------------------------


def test_image_thumbnail_keeps_aspect_and_never_upscales() -> None:
    cfg = ThumbnailSettings(size=64, quality=70)
    big = Image.new("RGB", (400, 200), (200, 30, 30))
    preview = make_preview(big, cfg)
    assert preview is not None and preview.content_type == JPEG
    assert _jpeg_size(preview.parts[0]) == (64, 32)
    assert big.size == (400, 200)  # the caller's image is never resized in place
    small = make_preview(Image.new("L", (20, 10), 128), cfg)  # grey: converted to RGB
    assert small is not None and _jpeg_size(small.parts[0]) == (20, 10)
    fits = Image.new("RGB", (64, 48), (10, 200, 10))  # already small enough: encoded as it is
    same = make_preview(fits, cfg)
    assert same is not None and _jpeg_size(same.parts[0]) == (64, 48)
    with Image.open(io.BytesIO(same.parts[0])) as back:
        assert back.convert("RGB").getpixel((32, 24)) == pytest.approx((10, 200, 10), abs=8)


def test_video_gets_one_poster_per_segment(video_dir: Path) -> None:
    video = load_video(
        video_dir / "sample_demo_3.mp4",
        IngestSettings(video_segment_seconds=2.0, video_frames_per_segment=2),
    )
    preview = make_preview(video, ThumbnailSettings(size=96))
    assert preview is not None and len(preview.parts) == len(video.segments) >= 3
    for blob in preview.parts:
        assert max(_jpeg_size(blob)) == 96


def test_text_preview_is_the_text() -> None:
    preview = make_preview("a dog — on the beach", ThumbnailSettings())
    assert preview == Preview(TEXT, ["a dog — on the beach".encode()])
    assert make_preview(object(), ThumbnailSettings()) is None


# ---- stores ---------------------------------------------------------------------------------


def _exercise(store: Any) -> None:
    item = "img:a/b:" + "x" * 250  # long, with characters no file name may hold
    assert store.get(item) is None and store.count(item) == 0
    store.put(item, Preview(JPEG, [b"one", b"two", b"three"]))
    assert store.count(item) == 3
    assert store.get(item, 1) == (JPEG, b"two")
    assert store.get(item, 3) is None
    store.put(item, Preview(TEXT, [b"now a text"]))  # replaced, old parts gone
    assert store.count(item) == 1
    assert store.get(item) == (TEXT, b"now a text")
    assert store.get(item, 1) is None
    store.delete(item)
    assert store.get(item) is None and store.count(item) == 0
    store.delete(item)  # deleting twice is fine


def test_file_store(tmp_path: Path) -> None:
    store = FileThumbnailStore(tmp_path / "thumbs")
    _exercise(store)
    store.put("k", Preview(JPEG, [b"x"]))
    assert not [p for p in (tmp_path / "thumbs").rglob(".tmp-*")]  # no temp files left
    # a video re-ingested with fewer segments keeps only its new parts; other items untouched
    store.put("v", Preview(JPEG, [b"s0", b"s1", b"s2", b"s3"]))
    store.put("v", Preview(JPEG, [b"t0", b"t1"]))
    assert store.count("v") == 2 and store.get("v", 1) == (JPEG, b"t1")
    assert store.get("v", 2) is None and store.get("k") == (JPEG, b"x")
    store.put("v", Preview(TEXT, [b"a text now"]))
    store.put("v", Preview(JPEG, [b"u0"]))
    assert store.count("v") == 1 and store.get("v") == (JPEG, b"u0")


def test_redis_store() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no Redis answering at {REDIS_URL}")
    prefix = f"xmodal-test-thumbs-{uuid.uuid4().hex}:"
    try:
        _exercise(RedisThumbnailStore(prefix=prefix, client=client))
    finally:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_writer_never_raises(tmp_path: Path) -> None:
    class Broken:
        def put(self, item_id: str, preview: Preview) -> None:
            raise OSError("disk full")

    settings = Settings(data_dir=tmp_path)
    ThumbnailWriter(settings, store=Broken()).save("x", Image.new("RGB", (8, 8)))  # type: ignore[arg-type]
    off = Settings(data_dir=tmp_path, thumbnails=ThumbnailSettings(enabled=False))
    writer = ThumbnailWriter(off)
    writer.save("x", "text")
    assert writer.store is None and not (tmp_path / "thumbnails").exists()


# ---- the route, through the real worker ---------------------------------------------------


def test_thumbnail_route_end_to_end(tmp_path: Path, model: Any, video_dir: Path) -> None:
    settings = make_settings(
        tmp_path,
        thumbnails={"size": 32},
        ingest={"video_segment_seconds": 2.0, "video_frames_per_segment": 2},
    )
    photo = image_bytes(1, size=(120, 60), fmt="JPEG")
    clip = (video_dir / "sample_demo_3.mp4").read_bytes()
    items = [
        {"id": "photo:1", "modality": "image", "data": base64.b64encode(photo).decode()},
        {"id": "clip", "modality": "video", "data": base64.b64encode(clip).decode()},
        {"id": "note", "modality": "text", "text": "  a red kite over the dunes  "},
    ]
    with running(settings, model) as client:
        r = client.post("/ingest", json={"items": items})
        assert r.status_code == 202, r.text
        assert wait_job(client, r.json()["job_id"])["state"] == "done"

        r = client.get("/items/photo:1/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert _jpeg_size(r.content) == (32, 16)
        etag = r.headers["etag"]
        again = client.get("/items/photo:1/thumbnail", headers={"If-None-Match": etag})
        assert again.status_code == 304 and not again.content

        segments = client.get("/items/clip").json()["segments"]
        assert len(segments) >= 3
        posters = [client.get(f"/items/clip/thumbnail?segment={i}") for i in range(len(segments))]
        assert all(p.status_code == 200 for p in posters)
        assert len({p.content for p in posters}) > 1  # different frames, not one poster
        by_time = client.get(f"/items/clip/thumbnail?at={segments[1]['start'] + 0.1}")
        assert by_time.content == posters[1].content
        r = client.get(f"/items/clip/thumbnail?segment={len(segments)}")
        assert r.status_code == 404 and "segment" in r.json()["error"]
        assert client.get("/items/clip/thumbnail?segment=0&at=1").status_code == 400
        assert client.get("/items/clip/thumbnail?at=-1").status_code == 422

        r = client.get("/items/note/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert r.text == "a red kite over the dunes"

        r = client.get("/items/nope/thumbnail")
        assert r.status_code == 404 and r.json()["error"] == "item 'nope' not found"

        assert client.delete("/items/photo:1").status_code == 200
        assert client.get("/items/photo:1/thumbnail").status_code == 404
        store = FileThumbnailStore(tmp_path / "thumbnails")
        assert store.get("photo:1") is None and store.get("note") is not None


def test_thumbnail_missing_for_items_indexed_without_them(tmp_path: Path, model: Any) -> None:
    settings = make_settings(tmp_path, thumbnails={"enabled": False})
    with running(settings, model) as client:
        item = {"id": "t", "modality": "text", "text": "hello"}
        r = client.post("/ingest", json={"items": [item]})
        assert wait_job(client, r.json()["job_id"])["state"] == "done"
        r = client.get("/items/t/thumbnail")
        assert r.status_code == 404 and "no thumbnail" in r.json()["error"]


def test_thumbnail_needs_a_read_key(tmp_path: Path, model: Any) -> None:
    settings = make_settings(tmp_path, auth={"read_keys": ["r1"], "write_keys": ["w1"]})
    with running(settings, model) as client:
        assert client.get("/items/x/thumbnail").status_code == 401
        assert client.get("/items/x/thumbnail", headers={"X-API-Key": "r1"}).status_code == 404
        config = client.get("/ui/config").json()  # open: the page must learn it needs a key
        assert config["auth"] == {"read": True, "write": True}


# ---- the page's routes ----------------------------------------------------------------------


def test_page_and_static_files(tmp_path: Path, model: Any) -> None:
    settings = make_settings(tmp_path, auth={"write_keys": ["w1"]}, qbnorm={"mode": "off"})
    with running(settings, model) as client:
        r = client.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in r.headers["content-security-policy"]
        html = r.text
        assert '<script src="/static/app.js"' in html and "/static/style.css" in html
        # no external assets: nothing is loaded from another origin
        for text in (html, client.get("/static/app.js").text, client.get("/static/style.css").text):
            assert "http://" not in text.replace("https?:", "")
            assert "https://" not in text and "//cdn" not in text
        assert (
            client.get("/static/app.js")
            .headers["content-type"]
            .startswith(("application/javascript", "text/javascript"))
        )
        assert client.get("/static/nope.js").status_code == 404
        assert client.get("/static/..%2Fapp.py").status_code == 404
        assert client.get("/static/.hidden").status_code == 404
        config = client.get("/ui/config").json()
        assert config["auth"] == {"read": False, "write": True}
        assert config["qbnorm_default"] is False and config["max_batch_items"] == 256
        assert "/" not in client.get("/openapi.json").json()["paths"]


def test_store_follows_the_mode(tmp_path: Path) -> None:
    from service.thumbnails import open_thumbnail_store

    embedded = open_thumbnail_store(Settings(data_dir=tmp_path))
    assert isinstance(embedded, FileThumbnailStore) and embedded.root == tmp_path / "thumbnails"
    # Redis mode: workers and API replicas share no disk, so previews live in Redis
    shared = open_thumbnail_store(Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(shared, RedisThumbnailStore)
    shared.close()


@pytest.mark.redis
def test_redis_mode_worker_and_replica_share_previews(
    redis_url: str, model: Any, tmp_path: Path
) -> None:
    """The worker and the API replica have separate data dirs; the preview reaches the API
    through Redis."""
    from service.jobs import RedisJobStore
    from service.queue import RedisStreamQueue
    from service.replication import ReplicationPublisher
    from service.worker import EmbeddedWorker, Worker

    worker_settings = make_settings(tmp_path / "worker", redis_url=redis_url)
    worker = EmbeddedWorker(
        Worker(
            model,
            RedisStreamQueue(redis_url),
            RedisJobStore(redis_url),
            ReplicationPublisher(redis_url),
            worker_settings,
            consumer="test-thumbs-worker",
        )
    ).start()
    try:
        api_settings = make_settings(tmp_path / "api", redis_url=redis_url)
        with running(api_settings, model) as client:
            photo = base64.b64encode(image_bytes(3, size=(300, 100), fmt="JPEG")).decode()
            item = {"id": "shared", "modality": "image", "data": photo}
            r = client.post("/ingest", json={"items": [item]})
            assert wait_job(client, r.json()["job_id"])["state"] == "done"
            deadline = time.monotonic() + 30
            while (r := client.get("/items/shared/thumbnail")).status_code != 200:
                assert time.monotonic() < deadline, r.text  # the vector log applies it
                time.sleep(0.05)
            assert _jpeg_size(r.content) == (256, 85)
            assert not (tmp_path / "worker" / "thumbnails").exists()
            assert client.delete("/items/shared").status_code == 200
            assert RedisThumbnailStore(redis_url).get("shared") is None
    finally:
        worker.stop()
