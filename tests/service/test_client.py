"""service.client against the real app (tiny model, temp data dir, worker off where the test
needs a queue that does not drain): limits, batch splitting, Retry-After, typed errors."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from service.client import (
    Client,
    InvalidRequest,
    Limits,
    NotFound,
    Overloaded,
    Unauthorized,
    Unreachable,
    split_batches,
)
from tests.service.test_api_helpers import image_bytes, make_settings, running


@pytest.fixture(scope="module")
def model() -> Any:
    from models import create_model

    return create_model("tiny-random", pretrained=False)


def test_split_batches_respects_items_and_bytes() -> None:
    items = [{"id": f"t{i}", "modality": "text", "text": "x" * 100} for i in range(10)]
    by_count = list(split_batches(items, Limits(max_batch_items=4, max_body_bytes=10**9)))
    assert [len(b) for b in by_count] == [4, 4, 2]
    # ~140 bytes an item: a 1,000-byte cap (90% usable, less the envelope) holds 5 per request
    by_size = list(split_batches(items, Limits(max_batch_items=100, max_body_bytes=1000)))
    assert sum(len(b) for b in by_size) == 10 and max(len(b) for b in by_size) <= 5
    assert len(by_size) >= 2


def test_ingest_splits_at_the_server_limit_and_drops_refused_items(
    model: Any, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, ingest={"max_batch_items": 3})
    with running(settings, model) as http:
        xm = Client(http=http)
        assert xm.limits().max_batch_items == 3
        items: list[dict[str, Any]] = [
            {"id": f"t{i}", "modality": "text", "text": f"caption number {i}"} for i in range(5)
        ]
        good = image_bytes(1)
        items.append({"id": "img", "modality": "image", "data": good})
        items.insert(2, {"id": "bad", "modality": "image", "data": good[: len(good) // 2]})
        report = xm.ingest(items, progress=False, timeout=60)
        assert sorted(report.indexed) == sorted([f"t{i}" for i in range(5)] + ["img"])
        assert list(report.failed) == ["bad"]
        assert "corrupt" in report.failed["bad"] or "truncated" in report.failed["bad"]
        # [t0 t1 bad] refused for `bad` and resent as [t0 t1]; then [t2 t3 t4]; then [img]
        assert len(report.jobs) == 3
        assert xm.content_hashes(["t0", "nope"]).keys() == {"t0"}
        jobs = xm.jobs(10)
        assert {j["job_id"] for j in jobs} == set(report.jobs)
        with pytest.raises(NotFound, match="not found"):
            xm.job("no-such-job")
        with pytest.raises(InvalidRequest) as err:
            xm.search("x", top_k=0)
        assert err.value.status == 422 and "top_k" in err.value.message


def test_429_is_retried_after_retry_after_then_raised(model: Any, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ingest={"max_queue_depth": 1}, worker={"embedded": False})
    with running(settings, model) as http:
        xm = Client(http=http, retries=3)
        waits: list[float] = []
        xm.sleep = waits.append
        xm.submit([{"id": "a", "modality": "text", "text": "fills the queue"}])
        with pytest.raises(Overloaded, match="ingest queue holds 1 items") as err:
            xm.submit([{"id": "b", "modality": "text", "text": "one too many"}])
        assert err.value.status == 429 and err.value.request_id
        assert waits == [5.0, 5.0, 5.0]  # the server's Retry-After, once per retry


def test_api_key_errors_are_typed(model: Any, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, auth={"read_keys": ["r"], "write_keys": ["w"]})
    with running(settings, model) as http:
        with pytest.raises(Unauthorized, match="missing API key"):
            Client(http=http).jobs()
        with pytest.raises(Unauthorized, match="may not write"):
            Client(http=http, api_key="r").requeue()
        assert Client(http=http, api_key="w").requeue()["requeued"] == []
        b64 = base64.b64encode(image_bytes(2)).decode()
        assert Client(http=http, api_key="w").submit(
            [{"id": "i", "modality": "image", "data": b64}]
        )


def test_unreachable_server_is_a_typed_error() -> None:
    xm = Client("http://127.0.0.1:9", retries=1)
    xm.sleep = lambda s: None
    with pytest.raises(Unreachable):
        xm.jobs()


def test_admin_routes_refuse_bad_input_and_snapshot_verifies(model: Any, tmp_path: Path) -> None:
    from service.snapshots import SnapshotError, read_manifest

    with running(make_settings(tmp_path / "data"), model) as http:
        xm = Client(http=http)
        for path, body in (("/dead-letters/requeue", {}), ("/items/hashes", {"ids": []})):
            r = http.post(path, json=body)
            assert r.status_code == 422, r.text
        assert "give either ids or all=true" in http.post("/dead-letters/requeue", json={}).text
        assert http.get("/jobs", params={"limit": 0}).status_code == 422
        report = xm.ingest([{"id": "t", "modality": "text", "text": "a boat"}], progress=False)
        assert report.indexed == ["t"]
        manifest = xm.snapshot(tmp_path / "snap")
    assert manifest["galleries"]["text"]["items"] == 1
    assert read_manifest(tmp_path / "snap")["files"] == manifest["files"]
    assert not list((tmp_path / "data" / "snapshots").iterdir())  # staging cleaned up
    victim = next(p for p in (tmp_path / "snap").rglob("snapshot.*.bin"))
    raw = victim.read_bytes()
    victim.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        read_manifest(tmp_path / "snap")
