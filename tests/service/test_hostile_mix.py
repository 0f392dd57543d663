"""Issue #15 hostile-input classes beyond items 1-2 (wrong types, bad ids, odd Unicode, path
escapes, bad vectors, hostile headers), each a 4xx with a message and its own request id, and
all of them at once, concurrently, among normal searches: every normal search still 200."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service.test_api_helpers import make_settings, running, wait_job

HOSTILE: list[tuple[str, str, Any, int]] = [
    ("post", "/search", {"text": 42}, 422),
    ("post", "/search", {"text": ["a"]}, 422),
    ("post", "/search", {"text": "a", "top_k": "ten"}, 422),
    ("post", "/search", {"text": "a", "top_k": 10**30}, 422),
    ("post", "/search", {"vector": ["x"] * 64}, 422),
    ("post", "/search", {"vector": [[]]}, 422),
    ("post", "/search", {"vector": []}, 422),
    ("post", "/search", {"text": "a", "targets": "image"}, 422),
    ("post", "/search", {"text": "\u202e\u202d"}, 422),  # direction marks only
    ("post", "/search", {"item_id": "../../etc/passwd"}, 404),
    ("post", "/search", {"text": "a", "filter": {"k": {"$ne": 1}}}, 422),
    ("post", "/ingest", {"items": "all"}, 422),
    ("post", "/ingest", {"items": [{"id": "", "modality": "text", "text": "a"}]}, 422),
    ("post", "/ingest", {"items": [{"id": "x" * 300, "modality": "text", "text": "a"}]}, 422),
    ("post", "/ingest", {"items": [{"id": "caf\u00e9", "modality": "text", "text": "a"}]}, 422),
    ("post", "/ingest", {"items": [{"id": "a", "modality": "text", "text": None}]}, 422),
    ("post", "/ingest", {"items": [{"id": "a", "modality": "image", "path": "/dev/zero"}]}, 400),
    ("post", "/ingest", {"items": [{"id": "a", "modality": "image", "path": "x\x00y"}]}, 400),
    ("post", "/ingest", {"items": [{"id": "a", "modality": "image", "data": 123}]}, 422),
    ("post", "/querybank", {"texts": "one"}, 422),
    ("post", "/querybank", {"texts": [1, 2]}, 422),
    ("get", "/jobs/%00", None, 404),
    ("get", "/items/" + "z" * 5000, None, 404),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from models import create_model

    model = create_model("tiny-random", pretrained=False)
    settings = make_settings(
        tmp_path_factory.mktemp("hostile-mix"),
        ingest={"media_root": tmp_path_factory.mktemp("media")},
        model={"query_batch_wait_ms": 20.0},
    )
    with running(settings, model) as c:
        r = c.post("/ingest", json={"items": [{"id": "d", "modality": "text", "text": "a dog"}]})
        assert wait_job(c, r.json()["job_id"])["state"] == "done"
        yield c


def _call(client: TestClient, method: str, path: str, body: Any) -> Any:
    return client.request(method, path, json=body) if body is not None else client.get(path)


@pytest.mark.parametrize(("method", "path", "body", "status"), HOSTILE)
def test_each_hostile_request_gets_its_4xx(
    client: TestClient, method: str, path: str, body: Any, status: int
) -> None:
    r = _call(client, method, path, body)
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.json()["error"] and r.json()["request_id"] == r.headers["x-request-id"]


def test_hostile_headers(client: TestClient) -> None:
    for bad in ("x" * 500, "a b", "id\twith\ttabs", "../../"):
        r = client.get("/items/nope", headers={"X-Request-ID": bad})
        assert r.status_code == 404
        assert (
            r.headers["x-request-id"] != bad and r.json()["request_id"] == r.headers["x-request-id"]
        )


def test_all_at_once_among_normal_searches(client: TestClient) -> None:
    def normal(i: int) -> int:
        r = client.post("/search", json={"text": f"a dog {i}", "targets": ["text"]})
        return r.status_code

    def hostile(case: tuple[str, str, Any, int]) -> tuple[int, int]:
        return _call(client, case[0], case[1], case[2]).status_code, case[3]

    with ThreadPoolExecutor(16) as pool:
        normals = [pool.submit(normal, i) for i in range(40)]
        hostiles = [pool.submit(hostile, case) for case in HOSTILE * 2]
        assert [f.result() for f in normals] == [200] * 40
        for f in hostiles:
            got, want = f.result()
            assert got == want
    assert 'status="500"' not in client.get("/metrics").text
