"""Issue #15 item 7: the API key is checked before the body is parsed, the OpenAPI declares
its security schemes, /metrics can be protected, a start-up failure's 503 leaks no path, and
OPTIONS / 405 list every method of a path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.test_api_helpers import make_settings, running

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def model() -> Any:
    from models import create_model

    return create_model("tiny-random", pretrained=False)


@pytest.fixture(scope="module")
def keyed(model: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    settings = make_settings(
        tmp_path_factory.mktemp("edges"),
        auth={"read_keys": ["r-key"], "write_keys": ["w-key"], "protect_metrics": True},
    )
    with running(settings, model) as c:
        yield c


def _err(r: Any, status: int, fragment: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert fragment.lower() in r.json()["error"].lower(), r.json()
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_the_key_is_checked_before_the_body_is_parsed(keyed: TestClient) -> None:
    bad = b"{not json"
    _err(keyed.post("/ingest", content=bad, headers=JSON), 401, "missing API key")
    _err(keyed.post("/ingest", content=bad, headers={**JSON, "X-API-Key": "nope"}), 401, "invalid")
    _err(keyed.post("/ingest", content=bad, headers={**JSON, "X-API-Key": "r-key"}), 403, "write")
    _err(keyed.post("/ingest", content=bad, headers={**JSON, "X-API-Key": "w-key"}), 400, "json")
    _err(keyed.post("/search", content=bad, headers=JSON), 401, "missing API key")
    r = keyed.post("/search", content=bad, headers={**JSON, "Authorization": "Bearer r-key"})
    _err(r, 400, "json")
    _err(keyed.post("/querybank", content=b"[", headers=JSON), 401, "missing")
    _err(keyed.delete("/items/x"), 401, "missing")
    assert keyed.get("/healthz").status_code == 200  # probes stay open


def test_openapi_declares_its_security_schemes(keyed: TestClient) -> None:
    spec = keyed.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    kinds = {(s["type"], s.get("scheme"), s.get("name")) for s in schemes.values()}
    assert ("http", "bearer", None) in kinds and ("apiKey", None, "X-API-Key") in kinds
    for path, method in (("/ingest", "post"), ("/search", "post"), ("/items/{item_id}", "delete")):
        assert spec["paths"][path][method]["security"], (path, method)
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_metrics_can_be_protected(keyed: TestClient) -> None:
    _err(keyed.get("/metrics"), 401, "api key")
    assert keyed.get("/metrics", headers={"X-API-Key": "r-key"}).status_code == 200
    assert keyed.get("/metrics", headers={"Authorization": "Bearer w-key"}).status_code == 200


def test_options_and_405_list_every_method(keyed: TestClient) -> None:
    r = keyed.options("/items/some-id")
    assert r.status_code == 204, r.text
    assert set(r.headers["allow"].split(", ")) == {"GET", "DELETE", "OPTIONS"}
    r = keyed.put("/items/some-id")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) >= {"GET", "DELETE"}
    assert r.json()["request_id"] == r.headers["x-request-id"]
    assert set(keyed.options("/ingest").headers["allow"].split(", ")) == {"POST", "OPTIONS"}
    assert keyed.options("/no-such-route").status_code == 404


def test_a_start_up_failure_leaks_no_path(tmp_path: Path) -> None:
    secret = tmp_path / "secret-dir" / "missing.safetensors"
    settings = make_settings(tmp_path, model={"checkpoint": secret})
    with TestClient(create_app(settings)) as c:
        import time

        deadline = time.monotonic() + 60
        while c.app.state.xmodal.error is None:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "start-up never failed"
            time.sleep(0.05)
        ready = c.get("/readyz")
        assert ready.status_code == 503
        search = c.post("/search", json={"text": "a dog"})
        assert search.status_code == 503 and search.headers["retry-after"]
        for r in (ready, search):
            assert "secret-dir" not in r.text and str(tmp_path) not in r.text, r.text
        assert "start-up failed" in search.json()["error"]
