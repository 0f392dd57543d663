"""The hand-off of photos POST /ingest decoded to the in-process worker (service/handoff.py):
bounded, taken once, refused batches leave nothing, the worker encodes what it is handed and
decodes what it is not, and the API end to end indexes the same vectors with it as without."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service import media
from service.handoff import DecodedPhotos
from service.jobs import LocalJobStore
from service.queue import LocalQueue
from service.settings import IngestSettings
from service.thumbnails import FileThumbnailStore
from service.worker import GallerySink, Worker
from tests.service.test_api_helpers import image_bytes, running, wait_job
from tests.service.test_api_helpers import make_settings as api_settings
from tests.service.test_worker import drain, make_settings, open_galleries


def _photo(color: tuple[int, int, int], size: tuple[int, int] = (10, 10)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_kept_within_the_budget_oldest_out_first_taken_once() -> None:
    photos = DecodedPhotos(max_bytes=8 * 300)  # a photo may take up to 300 bytes: 10x10 RGB
    assert photos.wants(10, 10) and not photos.wants(10, 11) and not photos.wants(0, 5)
    for i in range(9):
        photos.put(f"d{i}", _photo((i, 0, 0)))
    assert len(photos) == 8 and photos.nbytes == 8 * 300  # d0 went first
    assert photos.take("d0") is None
    taken = photos.take("d8")
    assert taken is not None and taken.getpixel((0, 0)) == (8, 0, 0)
    assert photos.take("d8") is None  # once
    photos.put("big", _photo((1, 1, 1), (20, 20)))  # over an eighth of the budget: not kept
    assert photos.take("big") is None
    photos.put("d1", _photo((7, 7, 7)))  # the same bytes again: replaced, counted once
    photos.discard(["d1", "d2", "unknown"])
    assert len(photos) == 5 and photos.nbytes == 5 * 300
    assert DecodedPhotos(0).wants(1, 1) is False


def test_the_worker_encodes_the_handed_picture_and_decodes_the_rest(
    tmp_path: Path, model: Any
) -> None:
    settings = make_settings(tmp_path, None)
    galleries = open_galleries(tmp_path / "index", model)
    queue, jobs = LocalQueue(tmp_path / "q.sqlite3"), LocalJobStore(tmp_path / "j.sqlite3")
    handoff = DecodedPhotos(64 * 2**20)
    raw_a, raw_b = image_bytes(1), image_bytes(2)
    # a stand-in under a's hash, to see which picture the worker encoded
    handoff.put(media.content_hash(raw_a), _photo((0, 200, 0), (48, 40)))
    items = [
        {"id": "a", "modality": "image", "data": base64.b64encode(raw_a).decode()},
        {"id": "b", "modality": "image", "data": base64.b64encode(raw_b).decode()},
    ]
    jobs.create("j", ["a", "b"])
    queue.enqueue("j", items)
    worker = Worker(model, queue, jobs, GallerySink(galleries), settings, handoff=handoff)
    try:
        drain(worker, queue)
    finally:
        worker.close()
    assert [i.state for i in jobs.get("j").items] == ["indexed", "indexed"]  # type: ignore[union-attr]
    assert len(handoff) == 0
    image = galleries["image"]
    handed = model.embed_images([_photo((0, 200, 0), (48, 40))])[0]
    decoded = model.embed_images([media.load_image(raw_b, IngestSettings())])[0]
    assert np.allclose(image.get("a").vectors[0], handed, atol=1e-5)  # type: ignore[union-attr]
    assert np.allclose(image.get("b").vectors[0], decoded, atol=1e-5)  # type: ignore[union-attr]
    thumb = FileThumbnailStore(settings.data_dir / "thumbnails").get("a")
    assert thumb is not None
    with Image.open(io.BytesIO(thumb[1])) as back:  # the thumbnail of the handed picture too
        assert np.allclose(back.convert("RGB").getpixel((5, 5)), (0, 200, 0), atol=8)
    queue.close()
    jobs.close()
    for g in galleries.values():
        g.close()


def _post(client: Any, items: list[dict[str, Any]]) -> Any:
    return client.post("/ingest", json={"items": items})


def test_api_end_to_end_same_vectors_with_and_without_the_handoff(
    tmp_path: Path, model: Any, flickr_dir: Path
) -> None:
    raws = [p.read_bytes() for p in sorted((flickr_dir / "images").glob("*.jpg"))[:4]]
    good = [
        {"id": f"p{i}", "modality": "image", "data": base64.b64encode(r).decode()}
        for i, r in enumerate(raws)
    ]
    corrupt = {"id": "bad", "modality": "image", "data": base64.b64encode(raws[0][:5000]).decode()}
    vectors: dict[float, list[np.ndarray]] = {}
    for handoff_mb in (64.0, 0.0):
        settings = api_settings(tmp_path / f"data-{handoff_mb}", worker={"handoff_mb": handoff_mb})
        with running(settings, model) as client:
            state = client.app.state.xmodal  # type: ignore[attr-defined]
            assert (state.handoff is not None) == (handoff_mb > 0)
            # a corrupt photo refuses its batch at once; nothing of the batch is kept
            r = _post(client, [good[0], corrupt])
            assert r.status_code == 422 and "item 'bad'" in r.json()["error"]
            assert state.handoff is None or len(state.handoff) == 0
            job = _post(client, good).json()["job_id"]
            assert [it["state"] for it in wait_job(client, job)["items"]] == ["indexed"] * 4
            assert state.handoff is None or len(state.handoff) == 0  # all taken
            for item in good:
                assert client.get(f"/items/{item['id']}/thumbnail").status_code == 200
            gallery = state.galleries["image"]
            vectors[handoff_mb] = [gallery.get(it["id"]).vectors[0] for it in good]
    for with_handoff, without in zip(vectors[64.0], vectors[0.0], strict=True):
        assert np.array_equal(with_handoff, without)
