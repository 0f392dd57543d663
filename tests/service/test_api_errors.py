"""Every bad input gets its explicit 4xx (never a 500), the service stays healthy; API keys;
503 while loading; 429 with Retry-After when the ingest backlog is over its cap."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from tests.service.test_api_helpers import image_bytes, make_settings, running, wait_ready

MAX_PIXELS = 100_000


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "ok.png").write_bytes(image_bytes(7))
    (root.parent / "secret.txt").write_text("not for you")
    return root


@pytest.fixture(scope="module")
def client(
    model: Any, media_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    settings = make_settings(
        tmp_path_factory.mktemp("xmodal-errors"),
        ingest={
            "max_batch_items": 4,
            "max_body_mb": 0.25,
            "max_image_pixels": MAX_PIXELS,
            "max_text_chars": 50,
            "media_root": media_root,
            "max_queue_depth": 6,
        },
        worker={"embedded": False},  # nothing drains the queue: the backlog cap is testable
    )
    with running(settings, model) as c:
        yield c


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    raw = io.BytesIO()
    Image.new("L", (1, 1)).save(raw, "PNG")
    data = bytearray(raw.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _flat_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (9, 99, 199)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(seed: int = 1) -> bytes:
    return image_bytes(seed, size=(64, 64), fmt="JPEG")


def _image_item(raw: bytes, item_id: str = "img") -> dict[str, Any]:
    return {"id": item_id, "modality": "image", "data": _b64(raw)}


def _ingest(client: TestClient, *items: dict[str, Any]) -> Any:
    return client.post("/ingest", json={"items": list(items)})


def _assert_error(r: Any, status: int, fragment: str = "") -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body["error"], str) and body["error"]
    assert fragment.lower() in body["error"].lower(), body["error"]
    assert body["request_id"] == r.headers["x-request-id"]


def _ppm() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PPM")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("item", "status", "fragment"),
    [
        (_image_item(b"\x00\x01garbage" * 20), 415, "not a recognised image"),
        (_image_item(_jpeg()[:400]), 422, "truncated"),
        (_image_item(_ppm()), 415, "unsupported image format"),
        (_image_item(_png_claiming(20_000, 20_000)), 413, "pixel"),
        (_image_item(_flat_png(400, 400)), 413, "pixel"),
        ({"id": "b", "modality": "image", "data": "@@not base64@@"}, 400, "base64"),
        ({"id": "v", "modality": "video", "data": _b64(b"\x00" * 64)}, 415, "video"),
        ({"id": "t", "modality": "text", "text": "   "}, 422, "empty"),
        ({"id": "t", "modality": "text", "text": "x" * 51}, 422, "over the 50"),
        ({"id": "t", "modality": "text"}, 422, "exactly one of"),
        ({"id": "t", "modality": "text", "text": "a", "data": "YQ=="}, 422, "exactly one of"),
        ({"id": "t", "modality": "audio", "text": "a"}, 422, "modality"),
        ({"id": "a/b", "modality": "text", "text": "a"}, 422, "id"),
        ({"id": "x", "modality": "text", "text": "a", "extra": 1}, 422, "extra"),
        ({"id": "p", "modality": "image", "path": "../secret.txt"}, 400, "outside the media root"),
        ({"id": "p", "modality": "image", "path": "/etc/passwd"}, 400, "outside the media root"),
        ({"id": "p", "modality": "image", "path": "missing.png"}, 400, "not found"),
    ],
)
def test_bad_items_get_their_4xx(
    client: TestClient, item: dict[str, Any], status: int, fragment: str
) -> None:
    _assert_error(_ingest(client, item), status, fragment)
    assert client.get("/healthz").status_code == 200


def test_a_bad_item_rejects_its_whole_batch_by_name(client: TestClient) -> None:
    good = {"id": "fine", "modality": "text", "text": "a fine caption"}
    r = _ingest(client, good, _image_item(b"junk" * 10, "broken-one"))
    _assert_error(r, 415, "broken-one")
    assert client.get("/items/fine").status_code == 404


def test_batch_and_body_limits(client: TestClient) -> None:
    items = [{"id": f"t{i}", "modality": "text", "text": "hello"} for i in range(5)]
    _assert_error(_ingest(client, *items), 413, "over the limit of 4")
    _assert_error(client.post("/ingest", json={"items": []}), 422, "items")
    _assert_error(_ingest(client, items[0], items[0]), 422, "duplicate")
    big = {"id": "big", "modality": "image", "data": "A" * 300_000}
    r = _ingest(client, big)
    assert r.status_code == 413, r.text
    assert client.get("/healthz").status_code == 200


def test_path_inside_the_media_root_is_accepted(client: TestClient) -> None:
    r = _ingest(client, {"id": "from-path", "modality": "image", "path": "ok.png"})
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == 1
    job = client.get(f"/jobs/{r.json()['job_id']}").json()
    assert job["items"] == [{"id": "from-path", "state": "queued", "error": None}]


def test_queue_backlog_over_the_cap_is_429(client: TestClient) -> None:
    for i in range(10):
        r = _ingest(client, {"id": f"fill{i}", "modality": "text", "text": "fill"})
        if r.status_code == 429:
            break
        assert r.status_code == 202, r.text
    _assert_error(r, 429, "overloaded")
    assert int(r.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"vector": [0.5] * 5}, 422, "expected [64]"),
        ({"vector": [0.0] * 64}, 422, "zero norm"),
        ({"text": ""}, 422, "empty"),
        ({"text": "y" * 51}, 422, "over the 50"),
        ({}, 422, "exactly one of"),
        ({"text": "a", "item_id": "b"}, 422, "exactly one of"),
        ({"text": "a", "top_k": 0}, 422, "top_k"),
        ({"text": "a", "top_k": 1001}, 422, "top_k"),
        ({"text": "a", "offset": -1}, 422, "offset"),
        ({"text": "a", "targets": ["audio"]}, 422, "targets"),
        ({"text": "a", "targets": []}, 422, "targets"),
        ({"text": "a", "filter": {"k": [1, 2]}}, 422, "filter"),
        ({"text": "a", "bogus": 1}, 422, "extra"),
        ({"item_id": "unknown-item"}, 404, "not found"),
        ({"image": _b64(b"definitely not an image")}, 415, "image"),
        ({"image": _b64(_jpeg()[:300])}, 422, "truncated"),
        ({"image": _b64(_png_claiming(50_000, 50_000))}, 413, "pixel"),
        ({"image": "%%%"}, 400, "base64"),
        ({"video": _b64(b"nope" * 10)}, 415, "video"),
    ],
)
def test_bad_searches_get_their_4xx(
    client: TestClient, body: dict[str, Any], status: int, fragment: str
) -> None:
    _assert_error(client.post("/search", json=body), status, fragment)


def test_malformed_requests(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    _assert_error(client.post("/search", content=b"{not json", headers=headers), 400, "json")
    _assert_error(client.post("/search", content=b"[1, 2]", headers=headers), 400, "object")
    _assert_error(client.post("/ingest", content=b"{not json", headers=headers), 400, "json")
    r = client.post("/search", content=b"text", headers={"content-type": "text/plain"})
    _assert_error(r, 415, "content type")
    r = client.post("/search", files={"file": ("x.bin", b"\x00\x01\x02", "image/png")})
    _assert_error(r, 415, "image")
    _assert_error(client.get("/items/nope"), 404, "not found")
    _assert_error(client.delete("/items/nope"), 404, "not found")
    _assert_error(client.get("/jobs/nope"), 404, "not found")
    _assert_error(client.post("/querybank", json={"texts": []}), 422, "texts")
    _assert_error(client.post("/querybank", json={"texts": ["ok", " "]}), 422, "texts[1]")


def test_still_healthy_and_no_500s(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics


def test_api_keys(model: Any, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, auth={"read_keys": ["r-key"], "write_keys": ["w-key"]})
    item = {"items": [{"id": "k1", "modality": "text", "text": "a key test"}]}
    query = {"text": "a key test", "targets": ["text"]}
    with running(settings, model) as c:
        assert c.get("/healthz").status_code == 200  # probes stay open
        assert c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200
        _assert_error(c.post("/search", json=query), 401, "missing API key")
        _assert_error(c.post("/search", json=query, headers={"X-API-Key": "bad"}), 401, "invalid")
        assert c.post("/search", json=query, headers={"X-API-Key": "r-key"}).status_code == 200
        bearer = {"Authorization": "Bearer r-key"}
        assert c.post("/search", json=query, headers=bearer).status_code == 200
        assert c.get("/querybank", headers=bearer).status_code == 200
        _assert_error(c.post("/ingest", json=item, headers=bearer), 403, "may not write")
        _assert_error(c.post("/ingest", json=item), 401, "missing")
        _assert_error(c.delete("/items/k1", headers=bearer), 403, "may not write")
        r = c.post("/querybank", json={"texts": ["q"]}, headers=bearer)
        _assert_error(r, 403, "may not write")
        writer = {"Authorization": "Bearer w-key"}
        assert c.post("/ingest", json=item, headers=writer).status_code == 202
        assert (
            c.post("/search", json=query, headers=writer).status_code == 200
        )  # write implies read


class _SlowModel:
    """Delegates to the real model; ``eval()`` blocks until released (a slow start-up)."""

    def __init__(self, model: Any, release: threading.Event) -> None:
        self._model = model
        self._release = release

    def eval(self) -> Any:
        assert self._release.wait(30)
        return self._model.eval()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def test_not_ready_is_503_then_ready(model: Any, tmp_path: Path) -> None:
    release = threading.Event()
    app = create_app(make_settings(tmp_path), model=_SlowModel(model, release))
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        assert r.headers["retry-after"]
        _assert_error(c.post("/search", json={"text": "early"}), 503, "not ready")
        _assert_error(c.post("/ingest", json={"items": []}), 503, "not ready")
        release.set()
        wait_ready(c)
        assert c.post("/search", json={"text": "now"}).status_code == 200
    time.sleep(0)  # lifespan shut down cleanly (the context manager would raise otherwise)
