"""QB-Norm on out of the box: shipped querybank files seed an empty store on first start, in
embedded mode (file store) and distributed mode (real Redis), and then normalise searches in
both directions; a user's bank is never overwritten, another checkpoint's file never applied."""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index.bankfile import bank_filename, write_bank_file
from index.querybank import FileQueryBankStore, RedisQueryBankStore
from service.loading import model_weights_hash
from service.seeding import seed_querybanks
from tests.service.test_api_helpers import image_bytes, make_settings, running, wait_job

TEXTS = {
    "s-dog": "a dog runs on the beach",
    "s-kids": "two children eat ice cream",
    "s-boat": "a red boat on a calm lake",
}
IMAGES = {f"sp{i}": image_bytes(300 + i) for i in range(3)}


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _ship(folder: Path, model: Any, weights_hash: str | None = None) -> None:
    """Shipped text and image banks for ``model`` (random rows; the hash of ``model``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for modality, n, seed in (("text", 30, 1), ("image", 12, 2)):
        write_bank_file(
            folder / bank_filename(model.name, modality),
            _unit(n, model.embed_dim, seed),
            [f"{modality} row {i}" for i in range(n)],
            model=model.name,
            modality=modality,
            weights_hash=weights_hash or str(model_weights_hash(model)),
            source="test",
        )


def _items() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [
        {"id": k, "modality": "text", "text": v} for k, v in TEXTS.items()
    ]
    items += [
        {"id": k, "modality": "image", "data": base64.b64encode(v).decode()}
        for k, v in IMAGES.items()
    ]
    return items


def test_a_fresh_embedded_service_normalises_from_its_first_query(
    model: Any, tmp_path: Path
) -> None:
    _ship(tmp_path / "banks", model)
    settings = make_settings(tmp_path / "data", qbnorm={"bank_dir": tmp_path / "banks"})
    with running(settings, model) as client:
        r = client.post("/ingest", json={"items": _items()})
        assert wait_job(client, r.json()["job_id"])["state"] == "done"
        text = client.post("/search", json={"text": "a dog", "targets": ["image"]}).json()
        assert text["qbnorm_applied"] is True and text["querybank_version"] == 1
        image = base64.b64encode(IMAGES["sp1"]).decode()
        i2t = client.post("/search", json={"image": image, "targets": ["text"]}).json()
        assert i2t["qbnorm_applied"] is True and i2t["querybank_version"] == 1
        assert any(abs(h["score"] - h["raw_score"]) > 1e-6 for h in i2t["results"])
        # an image query of images has no bank that normalises it
        same = client.post("/search", json={"image": image, "targets": ["image"]}).json()
        assert same["qbnorm_applied"] is False
    store = FileQueryBankStore(tmp_path / "data" / "querybank", fsync=False)
    text_bank, image_bank = store.get(model.name, "t2v"), store.get(model.name, "i2t")
    assert text_bank is not None and len(text_bank) == 30 and text_bank.version == 1
    assert image_bank is not None and image_bank.texts[0] == "image row 0"
    assert text_bank.weights_hash == model_weights_hash(model)
    # a bank the user built replaces the seeded one, and a restart keeps the user's bank
    store.replace(model.name, "t2v", _unit(5, model.embed_dim, 9), [f"u{i}" for i in range(5)])
    with running(settings, model) as client:
        r = client.post("/search", json={"text": "a dog", "targets": ["image"]}).json()
        assert r["qbnorm_applied"] is True and r["querybank_version"] == 2
    assert store.get(model.name, "t2v").texts == [f"u{i}" for i in range(5)]  # type: ignore[union-attr]


def test_a_bank_of_another_checkpoint_is_skipped(
    model: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _ship(tmp_path / "banks", model, weights_hash="0" * 64)
    store = FileQueryBankStore(tmp_path / "qb", fsync=False)
    assert seed_querybanks(store, model, tmp_path / "banks") == {"text": None, "image": None}
    assert store.version(model.name, "t2v") == 0 and "another checkpoint" in caplog.text
    # and a bank in the service's store that records other weights is not applied either
    served = FileQueryBankStore(tmp_path / "data" / "querybank", fsync=False)
    served.replace(model.name, "t2v", _unit(8, model.embed_dim, 3), list("abcdefgh"), "1" * 64)
    settings = make_settings(tmp_path / "data", qbnorm={"seed_shipped": False})
    with running(settings, model) as client:
        state = client.app.state.xmodal  # type: ignore[attr-defined]
        assert "text" not in state.normalizers and state.skipped_banks == {"text": 1}
        r = client.post("/search", json={"text": "a dog", "targets": ["image"]}).json()
        assert r["querybank_version"] is None and r["qbnorm_applied"] is False


@pytest.mark.redis
def test_replicas_starting_at_once_seed_redis_once(
    redis_url: str, model: Any, tmp_path: Path
) -> None:
    _ship(tmp_path / "banks", model)
    stores = [RedisQueryBankStore(redis_url) for _ in range(4)]
    results: list[dict[str, int | None]] = [{} for _ in stores]
    barrier = threading.Barrier(len(stores))

    def start(i: int) -> None:
        barrier.wait()
        results[i] = seed_querybanks(stores[i], model, tmp_path / "banks")

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for modality in ("text", "image"):
        assert sorted(str(r[modality]) for r in results) == ["1", "None", "None", "None"]
    assert stores[0].version(model.name, "t2v") == 1
    # a service started now finds the banks there and serves them (version 1, not re-seeded)
    settings = make_settings(
        tmp_path / "api", redis_url=redis_url, qbnorm={"bank_dir": tmp_path / "banks"}
    )
    with running(settings, model) as client:
        r = client.post("/search", json={"text": "a dog", "targets": ["image"]}).json()
        assert r["querybank_version"] == 1
        state = client.app.state.xmodal  # type: ignore[attr-defined]
        assert set(state.normalizers) == {"text", "image"}
    for s in stores:
        s.close()


@pytest.mark.redis
def test_a_user_built_redis_bank_is_not_overwritten(
    redis_url: str, model: Any, tmp_path: Path
) -> None:
    _ship(tmp_path / "banks", model)
    user = RedisQueryBankStore(redis_url)
    user.replace(model.name, "t2v", _unit(4, model.embed_dim, 5), ["u0", "u1", "u2", "u3"])
    settings = make_settings(
        tmp_path / "api", redis_url=redis_url, qbnorm={"bank_dir": tmp_path / "banks"}
    )
    with running(settings, model) as client:
        assert client.get("/querybank").json()["size"] == 4
        state = client.app.state.xmodal  # type: ignore[attr-defined]
        assert state.serving_bank("text") == (4, 1) and state.serving_bank("image") == (12, 1)
    assert user.get(model.name, "t2v").texts == ["u0", "u1", "u2", "u3"]  # type: ignore[union-attr]
    user.close()


def test_a_shipped_calibration_gives_each_normalised_hit_a_probability(
    model: Any, tmp_path: Path
) -> None:
    from index.calibration import ScoreCalibration, calibration_filename, pair_features, sigmoid

    _ship(tmp_path / "banks", model)
    w, b = np.array([4.0, 8.0, 6.0]), -1.0
    ScoreCalibration(
        model.name, str(model_weights_hash(model)), {"text": (w, b), "image": (w, b)}
    ).save(tmp_path / "banks" / calibration_filename(model.name))
    settings = make_settings(tmp_path / "data", qbnorm={"bank_dir": tmp_path / "banks"})
    with running(settings, model) as client:
        r = client.post("/ingest", json={"items": _items()})
        assert wait_job(client, r.json()["job_id"])["state"] == "done"
        body = {"text": "a dog", "targets": ["image"], "top_k": 3}
        hits = client.post("/search", json=body).json()["results"]
        assert len(hits) == 3 and all(0 < h["probability"] < 1 for h in hits)
        # P = sigmoid(w . [raw, qbnorm, margin to the best other hit] + b), hit by hit
        raw = np.array([h["raw_score"] for h in hits])
        norm = np.array([h["score"] for h in hits])
        want = sigmoid(pair_features(raw, norm) @ w + b)
        np.testing.assert_allclose([h["probability"] for h in hits], want, atol=1e-6)
        # min_probability keeps the hits at or above it
        cut = float(np.median(want))
        kept = client.post("/search", json={**body, "min_probability": cut}).json()["results"]
        assert [h["id"] for h in kept] == [h["id"] for h in hits if h["probability"] >= cut]
        # no QB-Norm -> no probability, and min_probability then keeps nothing
        off = client.post("/search", json={**body, "qbnorm": False}).json()["results"]
        assert off and all(h["probability"] is None for h in off)
        none = client.post("/search", json={**body, "qbnorm": False, "min_probability": 0.0})
        assert none.json()["results"] == []
        bad = client.post("/search", json={**body, "min_probability": 1.5})
        assert bad.status_code == 422
