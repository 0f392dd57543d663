"""The API end to end in embedded mode: real app, in-process worker, tiny model, temp data dir.

Ingests generated images and texts through POST /ingest, waits for the job, then checks
search by text, image (base64 and multipart), item id and raw vector; top_k, offset,
min_score and filter semantics; QB-Norm on/off; idempotent re-ingest; delete; metrics; and
that a restart on the same data dir gives the same answers.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service.test_api_helpers import (
    image_bytes,
    make_settings,
    running,
    search_ids,
    wait_job,
)

TEXTS = {
    "t-dog": "a brown dog runs along the beach",
    "t-kids": "two children eat ice cream in the park",
    "t-bike": "a man rides a red bicycle down a hill",
    "t-snow": "a skier jumps over a snowy ridge",
    "t-cat": "a cat sleeps on a sunny windowsill",
    "t-boat": "a small boat sails across a calm lake",
}
IMAGES = {f"p{i}": image_bytes(i) for i in range(5)}


def _items() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [
        {
            "id": item_id,
            "modality": "text",
            "text": text,
            "metadata": {"group": "a" if i % 2 == 0 else "b", "n": i},
        }
        for i, (item_id, text) in enumerate(TEXTS.items())
    ]
    items += [
        {
            "id": item_id,
            "modality": "image",
            "data": base64.b64encode(raw).decode(),
            "metadata": {"group": "a" if i % 2 == 0 else "b", "n": i},
        }
        for i, (item_id, raw) in enumerate(IMAGES.items())
    ]
    return items


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xmodal-embedded")


@pytest.fixture(scope="module")
def client(model: Any, data_dir: Path) -> Iterator[TestClient]:
    with running(make_settings(data_dir), model) as c:
        r = c.post("/ingest", json={"items": _items()})
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == len(TEXTS) + len(IMAGES)
        job = wait_job(c, r.json()["job_id"])
        assert job["state"] == "done", job
        assert all(it["state"] == "indexed" for it in job["items"]), job
        yield c


def test_job_and_items_are_visible(client: TestClient) -> None:
    for item_id in [*TEXTS, *IMAGES]:
        r = client.get(f"/items/{item_id}")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == item_id
        assert body["modality"] == ("text" if item_id in TEXTS else "image")
        assert body["metadata"]["group"] in ("a", "b")
    assert client.get("/jobs/no-such-job").status_code == 404


def test_search_by_text_finds_the_exact_duplicate_first(client: TestClient) -> None:
    r = client.post("/search", json={"text": TEXTS["t-bike"], "targets": ["text"], "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"][0]["id"] == "t-bike"
    assert body["results"][0]["raw_score"] == pytest.approx(1.0, abs=1e-4)
    assert body["results"][0]["modality"] == "text"
    assert body["model"] == "tiny-random"
    assert body["index_version"] > 0
    assert body["took_ms"] > 0
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_search_by_image_base64_and_upload(client: TestClient) -> None:
    raw = IMAGES["p3"]
    body = {"image": base64.b64encode(raw).decode(), "targets": ["image"], "top_k": 5}
    assert search_ids(client, body)[0] == "p3"
    r = client.post(
        "/search",
        files={"file": ("p3.png", raw, "image/png")},
        data={"targets": "image", "top_k": "2"},
    )
    assert r.status_code == 200, r.text
    assert [hit["id"] for hit in r.json()["results"]][0] == "p3"
    assert len(r.json()["results"]) == 2


def test_search_by_item_id_and_vector(client: TestClient) -> None:
    assert search_ids(client, {"item_id": "p1", "targets": ["image"]})[0] == "p1"
    assert search_ids(client, {"item_id": "t-cat", "targets": ["text"]})[0] == "t-cat"
    r = client.post("/search", json={"item_id": "nope", "targets": ["image"]})
    assert r.status_code == 404
    dim = client.app.state.xmodal.model.embed_dim  # type: ignore[attr-defined]
    vector = client.app.state.xmodal.galleries["text"].get("t-dog").vectors[0]  # type: ignore[attr-defined]
    assert len(vector) == dim
    assert search_ids(client, {"vector": [float(x) for x in vector], "targets": ["text"]})[0] == (
        "t-dog"
    )


def test_default_targets_cross_modalities(client: TestClient) -> None:
    r = client.post("/search", json={"text": "a dog", "top_k": 100})
    assert r.status_code == 200
    assert {hit["modality"] for hit in r.json()["results"]} == {"image"}  # no videos indexed
    r = client.post("/search", json={"item_id": "p0", "top_k": 100})
    assert {hit["modality"] for hit in r.json()["results"]} == {"image", "text"}


def test_top_k_offset_min_score_filter(client: TestClient) -> None:
    query = {"text": TEXTS["t-dog"], "targets": ["text", "image"]}
    full = search_ids(client, {**query, "top_k": 11})
    assert len(full) == 11
    assert search_ids(client, {**query, "top_k": 3}) == full[:3]
    assert search_ids(client, {**query, "top_k": 3, "offset": 2}) == full[2:5]
    assert search_ids(client, {**query, "top_k": 5, "offset": 10}) == full[10:]
    assert search_ids(client, {**query, "top_k": 5, "offset": 50}) == []

    r = client.post("/search", json={**query, "top_k": 11, "min_score": 0.999})
    assert [hit["id"] for hit in r.json()["results"]] == ["t-dog"]
    r = client.post("/search", json={**query, "top_k": 11, "min_score": -1.5})
    assert len(r.json()["results"]) == 11

    r = client.post("/search", json={**query, "top_k": 100, "filter": {"group": "b"}})
    hits = r.json()["results"]
    assert hits and all(hit["metadata"]["group"] == "b" for hit in hits)
    assert "t-dog" not in [hit["id"] for hit in hits]  # t-dog is group "a"
    r = client.post("/search", json={**query, "top_k": 100, "filter": {"group": "b", "n": 1}})
    assert sorted(hit["id"] for hit in r.json()["results"]) == ["p1", "t-kids"]
    r = client.post("/search", json={**query, "filter": {"group": "zzz"}})
    assert r.status_code == 200 and r.json()["results"] == []


def test_qbnorm_flag_is_reflected(client: TestClient) -> None:
    query = {"text": "a dog plays in the snow", "targets": ["image"], "top_k": 5}
    r = client.post("/search", json={**query, "qbnorm": True})
    assert r.status_code == 200
    assert r.json()["qbnorm_applied"] is False  # no bank yet: nothing to normalise with

    bank = [f"a photo of thing number {i}" for i in range(40)] + list(TEXTS.values())
    r = client.post("/querybank", json={"texts": bank})
    assert r.status_code == 200, r.text
    assert r.json()["size"] == len(bank)
    assert r.json()["model"] == "tiny-random"
    version = r.json()["version"]
    assert client.get("/querybank").json() == {
        "size": len(bank),
        "version": version,
        "model": "tiny-random",
    }

    on = client.post("/search", json={**query, "qbnorm": True}).json()
    assert on["qbnorm_applied"] is True
    assert on["querybank_version"] == version
    assert any(abs(h["score"] - h["raw_score"]) > 1e-6 for h in on["results"])
    off = client.post("/search", json={**query, "qbnorm": False}).json()
    assert off["qbnorm_applied"] is False
    assert all(h["score"] == h["raw_score"] for h in off["results"])
    default = client.post("/search", json=query).json()  # server default: mode "dis" -> on
    assert default["qbnorm_applied"] is True
    # QB-Norm never applies to text targets (the bank is text->visual)
    text_side = client.post("/search", json={**query, "targets": ["text"], "qbnorm": True})
    assert text_side.json()["qbnorm_applied"] is False


def test_reingest_same_content_is_a_noop(client: TestClient) -> None:
    before = client.post("/search", json={"text": TEXTS["t-boat"], "targets": ["text"]}).json()
    item = next(it for it in _items() if it["id"] == "t-boat")
    r = client.post("/ingest", json={"items": [item]})
    assert r.status_code == 202
    job = wait_job(client, r.json()["job_id"])
    assert job["state"] == "done" and job["items"][0]["state"] == "indexed"
    after = client.post("/search", json={"text": TEXTS["t-boat"], "targets": ["text"]}).json()
    assert after["results"] == before["results"]
    assert after["index_version"] == before["index_version"]


def test_new_content_replaces_and_delete_removes(client: TestClient) -> None:
    item = {"id": "t-new", "modality": "text", "text": "a red kite over green hills"}
    wait_job(client, client.post("/ingest", json={"items": [item]}).json()["job_id"])
    assert search_ids(client, {"text": item["text"], "targets": ["text"]})[0] == "t-new"
    item2 = {**item, "text": "an old lighthouse at dusk", "metadata": {"v": 2}}
    wait_job(client, client.post("/ingest", json={"items": [item2]}).json()["job_id"])
    assert client.get("/items/t-new").json()["metadata"] == {"v": 2}
    assert search_ids(client, {"text": item2["text"], "targets": ["text"]})[0] == "t-new"

    r = client.delete("/items/t-new")
    assert r.status_code == 200 and r.json() == {
        "id": "t-new",
        "deleted": True,
        "modalities": ["text"],
    }
    assert client.get("/items/t-new").status_code == 404
    assert client.delete("/items/t-new").status_code == 404
    ids = search_ids(client, {"text": item2["text"], "targets": ["text"], "top_k": 100})
    assert "t-new" not in ids


def test_metrics_expose_the_named_series(client: TestClient) -> None:
    client.post("/search", json={"text": "warm up", "targets": ["image"]})
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "xmodal_http_requests_total",
        "xmodal_http_request_duration_seconds_bucket",
        'xmodal_search_stage_seconds_bucket{le="0.001",stage="encode"}',
        'stage="search"',
        'stage="qbnorm"',
        'stage="rerank"',
        "xmodal_ingest_queue_depth",
        "xmodal_ingest_queue_pending",
        "xmodal_ingest_dead_letters",
        "xmodal_items_indexed_total",
        "xmodal_ingest_batch_size_bucket",
        "xmodal_encoded_items_total",
        "xmodal_query_batch_size_bucket",
        'xmodal_index_items{modality="image"} 5.0',
        'xmodal_index_items{modality="video"} 0.0',
        "xmodal_querybank_queries",
        "xmodal_querybank_version",
    ):
        assert name in text, f"{name} missing from /metrics"
    for gone in ("xmodal_index_size", "xmodal_encode_throughput", "xmodal_querybank_size"):
        assert gone not in text, f"{gone} was renamed or dropped (issue 14)"
    assert 'route="/search"' in text
    assert client.get("/healthz").json() == {"status": "ok"}


def test_restart_on_the_same_data_dir_gives_the_same_results(model: Any, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    queries = [
        {"text": TEXTS["t-kids"], "targets": ["text", "image"], "top_k": 8},
        {"image": base64.b64encode(IMAGES["p2"]).decode(), "targets": ["image"], "top_k": 3},
    ]
    with running(settings, model) as c:
        r = c.post("/ingest", json={"items": _items()})
        assert wait_job(c, r.json()["job_id"])["state"] == "done"
        before = [c.post("/search", json=q).json() for q in queries]
        version = before[0]["index_version"]
    with running(settings, model) as c:
        after = [c.post("/search", json=q).json() for q in queries]
        assert c.get("/items/p4").status_code == 200
    for a, b in zip(before, after, strict=True):
        assert a["results"] == b["results"]
    assert after[0]["index_version"] == version


def test_video_by_path_and_search_by_video(model: Any, video_dir: Path, tmp_path: Path) -> None:
    clip = video_dir / "sample_demo_3.mp4"
    if not clip.is_file():
        clip = min(video_dir.glob("*.mp4"), key=lambda p: p.stat().st_size)
    settings = make_settings(tmp_path, ingest={"media_root": video_dir, "max_body_mb": 16})
    with running(settings, model) as c:
        item = {"id": "clip", "modality": "video", "path": clip.name, "metadata": {"src": "real"}}
        r = c.post("/ingest", json={"items": [item]})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["job_id"], timeout=120)
        assert job["items"][0]["state"] == "indexed", job
        body = c.get("/items/clip").json()
        assert body["modality"] == "video" and body["num_vectors"] == len(body["segments"]) >= 1
        r = c.post(
            "/search",
            files={"file": (clip.name, clip.read_bytes(), "video/mp4")},
            data={"targets": "video"},
        )
        assert r.status_code == 200, r.text
        top = r.json()["results"][0]
        assert top["id"] == "clip" and top["metadata"] == {"src": "real"}
        assert top["start"] is not None and top["end"] > top["start"]
        r = c.post("/search", json={"text": "a person talking", "targets": ["video"]})
        hit = r.json()["results"][0]
        assert (hit["start"], hit["end"]) in {(s["start"], s["end"]) for s in body["segments"]}
