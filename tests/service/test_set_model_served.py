"""The shipped set model (DivE) served as a user would: `XMODAL_MODEL__NAME=<set model>`.

Loads the registry's set model through the serving path (ONNX Runtime engine by default),
ingests real Flickr8k dev photos as multi-vector items (K slot vectors each), and searches with
a caption of each photo: results are ranked by exact Smooth-Chamfer over the item's slots.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from models.data import load_dataset
from models.factory import shipped_weights
from service.loading import load_serving_model
from service.settings import ModelSettings
from tests.service.test_api_helpers import make_settings, running, wait_job

SET_MODEL = "effnet-lite0-minilm-set"
N_PHOTOS = 40


@pytest.fixture(scope="module")
def set_model() -> Any:
    if shipped_weights(SET_MODEL) is None:
        pytest.skip(f"no shipped weights for {SET_MODEL} (models/weights/{SET_MODEL}.safetensors)")
    return load_serving_model(ModelSettings(name=SET_MODEL, threads=2))


@pytest.fixture(scope="module")
def served(
    set_model: Any, flickr_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Any]]:
    dev = load_dataset(flickr_dir, "dev").subset(N_PHOTOS)
    settings = make_settings(tmp_path_factory.mktemp("set-served"), model={"name": SET_MODEL})
    with running(settings, set_model) as client:
        items = [
            {
                "id": f"photo-{i}",
                "modality": "image",
                "data": base64.b64encode(p.read_bytes()).decode(),
            }
            for i, p in enumerate(dev.images)
        ]
        r = client.post("/ingest", json={"items": items})
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"], timeout=300)
        assert job["state"] == "done", job
        assert all(item["state"] == "indexed" for item in job["items"]), job
        yield client, dev


def test_items_are_stored_as_slot_sets(served: tuple[TestClient, Any], set_model: Any) -> None:
    client, _ = served
    assert set_model.is_set_model and set_model.num_vectors == 4
    r = client.get("/items/photo-0")
    assert r.status_code == 200, r.text
    assert r.json()["num_vectors"] == set_model.num_vectors


def test_captions_find_their_photo(served: tuple[TestClient, Any]) -> None:
    client, dev = served
    first_caption = {int(img): i for i, img in reversed(list(enumerate(dev.caption_to_image)))}
    ranks = []
    for photo in range(N_PHOTOS):
        caption = dev.captions[first_caption[photo]]
        r = client.post("/search", json={"text": caption, "targets": ["image"], "top_k": 10})
        assert r.status_code == 200, r.text
        hits = r.json()["results"]
        scores = [h["raw_score"] for h in hits]
        assert scores == sorted(scores, reverse=True)  # exact Smooth-Chamfer order
        ids = [h["id"] for h in hits]
        ranks.append(ids.index(f"photo-{photo}") if f"photo-{photo}" in ids else 10)
    # 40 candidates: chance of a top-5 hit is 1/8; the trained set model does far better.
    assert sum(rank < 5 for rank in ranks) >= 0.6 * N_PHOTOS, ranks
