"""Hostile inputs (issue #15, items 1-2): invalid Unicode and invisible text are 422 on every
text route, a poisoned request fails alone, and ragged / deep / huge / extreme inputs get a
clear 4xx or a correct answer, never a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.encoder import MicroBatcher
from service.text_checks import check_text
from tests.service.test_api_helpers import make_settings, running, wait_job

SURROGATE_JSON = '"dog \\ud800 x"'  # a lone UTF-16 surrogate, as a client would send it
INVISIBLE = "\u200b\u200c\ufeff"


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-media")
    (root / "a.txt").write_text("a dog on the grass")
    return root


@pytest.fixture(scope="module")
def client(
    model: Any, media_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    settings = make_settings(
        tmp_path_factory.mktemp("xmodal-hostile"),
        ingest={"media_root": media_root},
        model={"query_batch_wait_ms": 20.0},  # a wide window: concurrent queries share batches
    )
    with running(settings, model) as c:
        r = c.post(
            "/ingest",
            json={
                "items": [
                    {"id": "t-dog", "modality": "text", "text": "a dog runs on the beach"},
                    {"id": "t-cat", "modality": "text", "text": "a cat sleeps on a sofa"},
                ]
            },
        )
        assert r.status_code == 202, r.text
        assert wait_job(c, r.json()["job_id"])["state"] == "done"
        yield c


def _post_raw(client: TestClient, route: str, body: str) -> Any:
    return client.post(route, content=body.encode(), headers={"content-type": "application/json"})


def _assert_error(r: Any, status: int, fragment: str = "") -> None:
    assert r.status_code == status, (r.status_code, r.text)
    text = json.dumps(r.json()).lower()
    assert fragment.lower() in text, text


# --- 1. text must be valid, visible Unicode ----------------------------------------------------
def test_check_text_rules() -> None:
    assert check_text("dog") == "dog"
    assert check_text("  ") == "  "  # empty text is clean_text's own 422
    assert check_text("caf\u00e9 \u200b dog") == "caf\u00e9 \u200b dog"  # visible text passes
    with pytest.raises(ValueError, match="surrogate"):
        check_text("dog \ud800 x")
    with pytest.raises(ValueError, match="invisible"):
        check_text(INVISIBLE)


@pytest.mark.parametrize("text", [SURROGATE_JSON, json.dumps(INVISIBLE)])
def test_bad_text_is_422_on_every_text_route(client: TestClient, text: str) -> None:
    fragment = "surrogate" if "ud800" in text else "invisible"
    _assert_error(_post_raw(client, "/search", f'{{"text": {text}}}'), 422, fragment)
    item = f'{{"items": [{{"id": "bad", "modality": "text", "text": {text}}}]}}'
    _assert_error(_post_raw(client, "/ingest", item), 422, fragment)
    _assert_error(_post_raw(client, "/querybank", f'{{"texts": ["ok", {text}]}}'), 422, fragment)
    assert client.get("/items/bad").status_code == 404  # nothing was queued


def test_surrogates_in_metadata_and_filter_are_422(client: TestClient) -> None:
    meta = f'{{"k": {SURROGATE_JSON}}}'
    item = f'{{"items": [{{"id": "m", "modality": "text", "text": "dog", "metadata": {meta}}}]}}'
    _assert_error(_post_raw(client, "/ingest", item), 422, "metadata")
    body = f'{{"text": "dog", "filter": {{"k": {SURROGATE_JSON}}}}}'
    _assert_error(_post_raw(client, "/search", body), 422, "filter")
    assert client.get("/items/m").status_code == 404


def test_a_poisoned_search_fails_alone(client: TestClient) -> None:
    def normal(i: int) -> int:
        return client.post("/search", json={"text": f"a dog number {i}"}).status_code

    def poisoned() -> Any:
        return _post_raw(client, "/search", f'{{"text": {SURROGATE_JSON}}}')

    with ThreadPoolExecutor(11) as pool:
        bad = pool.submit(poisoned)
        good = [pool.submit(normal, i) for i in range(10)]
        statuses = [f.result() for f in good]
        bad_response = bad.result()
    assert statuses == [200] * 10
    _assert_error(bad_response, 422, "surrogate")


def test_encoder_retries_a_failed_batch_one_by_one() -> None:
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        if "poison" in texts:
            raise RuntimeError("cannot encode poison")
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)

    texts = ["a", "bb", "poison", "dddd", "eeeee"]

    async def main() -> list[Any]:
        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[str] = MicroBatcher("text", encode, pool, 32, 50.0, 100)
            batcher.start()
            try:
                return await asyncio.gather(
                    *(batcher.submit(t) for t in texts), return_exceptions=True
                )
            finally:
                await batcher.stop()

    out = asyncio.run(main())
    assert len(calls[0]) == len(texts)  # first tried as one batch
    assert sorted(len(c) for c in calls[1:]) == [1] * len(texts)  # then each alone
    for text, result in zip(texts, out, strict=True):
        if text == "poison":
            assert isinstance(result, RuntimeError)
        else:
            assert isinstance(result, np.ndarray) and float(result[0]) == len(text)


# --- 2. unvalidated inputs -----------------------------------------------------------------------
def test_ragged_vector_is_422(client: TestClient) -> None:
    r = client.post("/search", json={"vector": [[0.1, 0.2], [0.3]]})
    _assert_error(r, 422, "differ in length")


def test_deep_filter_is_400_as_on_ingest(client: TestClient) -> None:
    depth = 100_000
    deep = '{"a": ' * depth + "1" + "}" * depth
    r = _post_raw(client, "/search", f'{{"text": "dog", "filter": {deep}}}')
    ingest = _post_raw(client, "/ingest", f'{{"items": [], "x": {deep}}}')
    assert ingest.status_code == 400, ingest.text
    _assert_error(r, 400, "nested too deeply")
    # a multipart form's filter too
    r = client.post("/search", files={"text": (None, "dog"), "filter": (None, deep)})
    _assert_error(r, 400, "nested too deeply")


def test_huge_path_is_422(client: TestClient) -> None:
    item = {"id": "p", "modality": "text", "path": "a" * 5000}
    r = client.post("/ingest", json={"items": [item]})
    _assert_error(r, 422, "invalid path")
    assert len(r.text) < 2000  # the path is not echoed in full


def _item_vector(client: TestClient, item_id: str) -> np.ndarray:
    state = client.app.state.xmodal  # type: ignore[attr-defined]
    return np.asarray(state.galleries["text"].get(item_id).vectors[0], dtype=np.float64)


@pytest.mark.parametrize("scale", [1e20, 1e-30, 1e300])
def test_extreme_vector_scales_give_correct_scores(client: TestClient, scale: float) -> None:
    v = _item_vector(client, "t-dog")
    base = client.post("/search", json={"vector": v.tolist(), "targets": ["text"]})
    scaled = client.post("/search", json={"vector": (v * scale).tolist(), "targets": ["text"]})
    assert base.status_code == scaled.status_code == 200, scaled.text
    hits = scaled.json()["results"]
    assert hits[0]["id"] == "t-dog"
    assert hits[0]["raw_score"] == pytest.approx(1.0, abs=1e-4)
    expected = {h["id"]: h["raw_score"] for h in base.json()["results"]}
    assert {h["id"]: pytest.approx(h["raw_score"], abs=1e-5) for h in hits} == expected


def test_a_uniform_1e20_vector_is_not_all_zero_scores(client: TestClient) -> None:
    dim = len(_item_vector(client, "t-dog"))
    r = client.post("/search", json={"vector": [1e20] * dim, "targets": ["text"]})
    assert r.status_code == 200, r.text
    assert any(h["raw_score"] != 0.0 for h in r.json()["results"])


def test_zero_and_non_finite_vectors_are_422(client: TestClient) -> None:
    dim = len(_item_vector(client, "t-dog"))
    _assert_error(client.post("/search", json={"vector": [0.0] * dim}), 422, "zero norm")
    body = '{"vector": [' + ", ".join(["NaN"] * dim) + "]}"
    _assert_error(_post_raw(client, "/search", body), 422, "nan")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_min_score_is_422(client: TestClient, value: str) -> None:
    r = _post_raw(client, "/search", f'{{"text": "dog", "min_score": {value}}}')
    _assert_error(r, 422, "min_score")


def test_no_500s_after_all_that(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.post("/search", json={"text": "a dog"}).status_code == 200
