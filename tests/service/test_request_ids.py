"""Issue #15 item 3: every response carries its own request id (body and ``X-Request-ID``),
500s included, and a 500 never costs the client's keep-alive connection.

A real uvicorn server on a free port and one ``httpx.Client`` (one pooled connection): a
request that raises is followed by normal ones on the same connection."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from tests.service.test_api_helpers import make_settings


@pytest.fixture(scope="module")
def model() -> Any:
    from models import create_model

    return create_model("tiny-random", pretrained=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def base_url(model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import redis
    import uvicorn

    app = create_app(make_settings(tmp_path_factory.mktemp("rid")), model=model)

    def boom() -> None:
        raise RuntimeError("a bug nobody handled")

    def redis_down() -> None:
        raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1")

    app.add_api_route("/test-boom", boom, methods=["GET", "POST"])
    app.add_api_route("/test-redis-down", redis_down, methods=["GET"])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(30)
    _forget_test_routes()


def _forget_test_routes() -> None:
    """The deliberate 500s/503s of these routes must not show in other tests' metric checks
    (the registry is per process)."""
    from service import metrics
    from service.middleware import STORAGE_UNAVAILABLE

    for route, status in (("/test-boom", "500"), ("/test-redis-down", "503")):
        for method in ("GET", "POST"):
            for family in (metrics.REQUESTS, metrics.REQUEST_LATENCY):
                with contextlib.suppress(KeyError):
                    family.remove(method, route, status)
        with contextlib.suppress(KeyError):
            metrics.ERRORS.remove(route, status)
    with contextlib.suppress(KeyError):
        STORAGE_UNAVAILABLE.remove("/test-redis-down", "redis")


def _check_id(r: httpx.Response) -> str:
    rid = r.headers["x-request-id"]
    assert rid
    if r.headers.get("content-type", "").startswith("application/json") and r.status_code >= 400:
        assert r.json()["request_id"] == rid, (r.json(), rid)
    return rid


def test_a_500_keeps_the_connection_and_its_own_id(base_url: str) -> None:
    connections: set[int] = set()
    with httpx.Client(base_url=base_url, limits=httpx.Limits(max_connections=1)) as client:

        def track(response: httpx.Response) -> None:
            stream = response.extensions.get("network_stream")
            connections.add(id(stream))

        client.event_hooks["response"] = [track]
        ids = []
        for _ in range(3):
            r = client.get("/test-boom")
            assert r.status_code == 500, r.text
            assert r.json()["error"] == "internal error"
            assert r.json()["detail"] == {"type": "RuntimeError"}
            assert r.headers.get("connection", "").lower() != "close"
            ids.append(_check_id(r))
            ok = client.post("/search", json={"text": "a dog", "targets": ["text"]})
            assert ok.status_code == 200, ok.text
            ids.append(_check_id(ok))
        assert len(set(ids)) == len(ids), ids  # each response has its own id
    assert len(connections) == 1, "the 500 cost the client its keep-alive connection"


def test_the_callers_request_id_is_echoed_on_a_500(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:
        r = client.post("/test-boom", headers={"X-Request-ID": "my-req-42"})
        assert r.status_code == 500
        assert r.headers["x-request-id"] == "my-req-42"
        assert r.json()["request_id"] == "my-req-42"
        bad = client.post("/search", content=b"{nope", headers={"content-type": "application/json"})
        assert bad.status_code == 400
        _check_id(bad)


def test_storage_outage_is_503_with_retry_after(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:
        r = client.get("/test-redis-down")
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert "storage unavailable" in r.json()["error"]
        assert "127.0.0.1" not in r.text  # the cause is logged, not answered
        _check_id(r)
        assert client.get("/healthz").status_code == 200


def test_metrics_count_the_500s(base_url: str, tmp_path: Path) -> None:
    text = httpx.get(f"{base_url}/metrics").text
    assert 'route="/test-boom",status="500"' in text or 'status="500"' in text
