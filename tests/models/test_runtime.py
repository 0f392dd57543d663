"""The ONNX Runtime engine encodes what eager PyTorch encodes, and caches by weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import create_model, get_model_config
from models.model import XModal
from models.runtime import OnnxRuntimeEncoder, enable_onnx, weights_hash

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the eager path runs)")

REL_TOL = 1e-3  # issue 12: outputs match eager within 1e-3 relative


def _max_rel(fast: np.ndarray, eager: np.ndarray) -> float:
    return float(np.abs(fast - eager).max() / np.abs(eager).max())


def _tiny(pooling: str = "gpo") -> XModal:
    cfg = get_model_config("tiny-random")
    if pooling == "set":
        cfg = get_model_config("tiny-random").model_copy(
            update={
                "head": cfg.head.model_copy(update={"pooling": "set"}),
                "similarity": cfg.similarity.model_copy(update={"kind": "smooth_chamfer"}),
            }
        )
    return XModal(cfg, pretrained=False).eval()


def _images(n: int, size: int = 80) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (size, size + 7 * i, 3), dtype=np.uint8))
        for i in range(n)
    ]


TEXTS = ["a dog", "two children play football on a wide green field", "x", "a red car"]


@pytest.mark.parametrize("pooling", ["gpo", "set"])
def test_tiny_model_matches_eager_at_other_batch_and_lengths(tmp_path: Path, pooling: str) -> None:
    model = _tiny(pooling)
    images = _images(5)
    eager_img, eager_txt = model.embed_images(images), model.embed_texts(TEXTS)
    assert enable_onnx(model, tmp_path)
    assert model.runtime is not None
    # other batch sizes and token lengths than the export's (dynamic axes)
    fast_img, fast_txt = model.embed_images(images, batch_size=3), model.embed_texts(TEXTS)
    assert fast_img.shape == eager_img.shape and fast_txt.shape == eager_txt.shape
    assert _max_rel(fast_img, eager_img) < REL_TOL
    assert _max_rel(fast_txt, eager_txt) < REL_TOL


def test_graphs_are_cached_by_weights(tmp_path: Path) -> None:
    model = _tiny()
    first = OnnxRuntimeEncoder(model, tmp_path)
    stamp = (first.folder / "image.onnx").stat().st_mtime_ns
    again = OnnxRuntimeEncoder(model, tmp_path)  # same weights: the cached graphs load
    assert again.folder == first.folder
    assert (again.folder / "image.onnx").stat().st_mtime_ns == stamp
    assert json.loads((first.folder / "meta.json").read_text())["model"] == "tiny-random"

    before = weights_hash(model)
    with torch.no_grad():
        model.image_proj.fc.weight.add_(0.01)  # new weights: a new key, a new export
    assert weights_hash(model) != before
    changed = OnnxRuntimeEncoder(model, tmp_path)
    assert changed.folder != first.folder
    x = model.preprocess(_images(2))
    eager = model.encode_image(x).detach().numpy()
    assert _max_rel(changed.encode_image(x).numpy(), eager) < REL_TOL


def test_a_model_on_another_device_or_dtype_stays_eager(tmp_path: Path) -> None:
    model = _tiny().to(torch.float64)
    assert not enable_onnx(model, tmp_path)
    assert model.runtime is None


def test_shipped_model_matches_eager_on_real_photos_and_captions(
    tmp_path: Path, flickr_dir: Path
) -> None:
    from PIL import Image

    rows = [json.loads(line) for line in (flickr_dir / "captions.jsonl").open()][:8]
    images = [Image.open(flickr_dir / "images" / r["image"]).convert("RGB") for r in rows]
    captions = [c for r in rows for c in r["captions"][:2]]
    model = create_model(device="cpu")
    eager_img, eager_txt = model.embed_images(images), model.embed_texts(captions)
    assert enable_onnx(model, tmp_path)
    fast_img, fast_txt = model.embed_images(images), model.embed_texts(captions)
    assert _max_rel(fast_img, eager_img) < REL_TOL
    assert _max_rel(fast_txt, eager_txt) < REL_TOL
    # and it ranks the same: each photo's nearest caption is unchanged
    assert ((fast_img @ fast_txt.T).argmax(1) == (eager_img @ eager_txt.T).argmax(1)).all()


def test_the_weights_hash_covers_the_encoders_not_the_video_pooling() -> None:
    """Banks and calibrations record it: retraining the video GPO must not orphan them."""
    model = _tiny()
    before = weights_hash(model)
    model.new_video_gpo()  # a video GPO joins the state dict; the config says gpo
    assert any(k.startswith("video_pool.") for k in model.state_dict())
    assert weights_hash(model) == before
    with torch.no_grad():
        next(iter(model.video_pool.parameters())).add_(0.5)  # type: ignore[union-attr]
    assert weights_hash(model) == before
    with torch.no_grad():
        model.text_proj.fc.bias.add_(0.01)  # an encoder tensor: a new hash
    assert weights_hash(model) != before


# -- the opt-in bf16 path (OpenVINO on AMX) ---------------------------------------------------

# bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.0039 per rounding), and the image tower
# rounds through ~60 layers, so single components move by up to ~0.1 of the largest one
# (bench/encoder.py measured 0.09-0.12 on the shipped model). What retrieval sees is the
# direction: the worst of 128 dev photos kept cosine 0.987 to its eager embedding (captions
# 0.9999), and the dev RSUM moved by under 1 point of 600 (docs/BENCHMARKS.md); 0.98 leaves
# room for other photos without letting a broken graph (cosine ~0 or ~0.9) through.
BF16_MIN_COSINE = 0.98


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_bf16_on_real_photos_and_captions_stays_close_to_eager(
    tmp_path: Path, flickr_dir: Path
) -> None:
    from PIL import Image

    from models.runtime_bf16 import bf16_unavailable

    why = bf16_unavailable()
    if why is not None:
        pytest.skip(f"bf16 path not available here: {why}")
    rows = [json.loads(line) for line in (flickr_dir / "captions.jsonl").open()][:8]
    images = [Image.open(flickr_dir / "images" / r["image"]).convert("RGB") for r in rows]
    captions = [c for r in rows for c in r["captions"][:2]]
    model = create_model(device="cpu")
    eager_img, eager_txt = model.embed_images(images), model.embed_texts(captions)
    assert enable_onnx(model, tmp_path, precision="bf16")
    assert getattr(model.runtime, "precision", None) == "bf16"
    # a batch size other than the export's, and captions of other lengths (dynamic shapes)
    fast_img, fast_txt = model.embed_images(images, batch_size=3), model.embed_texts(captions)
    assert fast_img.dtype == np.float32 and fast_img.shape == eager_img.shape
    assert _cosines(fast_img, eager_img).min() > BF16_MIN_COSINE
    assert _cosines(fast_txt, eager_txt).min() > BF16_MIN_COSINE
    assert np.allclose(np.linalg.norm(fast_img, axis=1), 1.0, atol=1e-3)
    # each photo's nearest caption still belongs to the same photo (2 captions per photo)
    nearest = (fast_img @ fast_txt.T).argmax(1) // 2
    assert (nearest == (eager_img @ eager_txt.T).argmax(1) // 2).all()


def test_bf16_without_amx_or_openvino_falls_back_to_float32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.runtime_bf16 as bf16

    monkeypatch.setattr(bf16, "cpu_flags", lambda: {"avx2", "avx512f"})  # e.g. an AMD EPYC
    assert bf16.bf16_unavailable() == "the CPU lacks amx_bf16, amx_tile"
    model = _tiny()
    images = _images(3)
    eager = model.embed_images(images)
    assert enable_onnx(model, tmp_path, precision="bf16")
    assert isinstance(model.runtime, OnnxRuntimeEncoder) and model.runtime.precision == "fp32"
    assert _max_rel(model.embed_images(images), eager) < REL_TOL


@pytest.mark.parametrize("pooling", ["gpo", "set"])
def test_large_batches_run_as_shards_and_give_the_one_run_rows(
    tmp_path: Path, pooling: str
) -> None:
    """Data-parallel shards: a batch of >= MIN_SHARD rows per thread is cut into one shard per
    thread, and the rows come back in order, as one run of the wide session gives them."""
    from models.runtime import MIN_SHARD

    model = _tiny(pooling)
    two = OnnxRuntimeEncoder(model, tmp_path, threads=2)
    assert two.image.shards(2 * MIN_SHARD - 1) == 1 and two.image.shards(2 * MIN_SHARD) == 2
    one = OnnxRuntimeEncoder(model, tmp_path, threads=1)
    assert one.image.narrow is None and one.image.shards(1000) == 1
    rows = 2 * MIN_SHARD + 3  # uneven shards
    x = model.preprocess(_images(rows, size=48))
    feeds = {"pixels": x.numpy()}
    whole = two.image.wide.run(None, feeds)[0]
    sharded = two.encode_image(x).numpy()
    assert sharded.shape == whole.shape
    np.testing.assert_allclose(sharded, whole, rtol=0, atol=1e-6)
    eager = model.encode_image(x).detach().numpy()
    assert _max_rel(sharded, eager) < REL_TOL
    tok = model.tokenize([TEXTS[i % len(TEXTS)] for i in range(rows)])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    text_whole = two.text.wide.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    np.testing.assert_allclose(two.encode_text(ids, mask).numpy(), text_whole[0], atol=1e-6)


def test_the_serving_model_runs_blas_on_one_thread(tmp_path: Path) -> None:
    """With the ONNX engine on, numpy's BLAS pool is limited to the calling thread (its idle
    threads spin on the encoder's cores)."""
    from threadpoolctl import threadpool_info

    from service.loading import load_serving_model
    from service.settings import ModelSettings

    model = load_serving_model(
        ModelSettings(name="tiny-random", device="cpu", onnx_cache_dir=tmp_path)
    )
    assert model.runtime is not None
    blas = [p for p in threadpool_info() if p["user_api"] == "blas"]
    assert blas and all(p["num_threads"] == 1 for p in blas)


def test_the_thread_pool_stops_spinning_when_a_run_returns(tmp_path: Path) -> None:
    """ONNX Runtime's workers spin on for ~65 ms after every run by default: a core burnt per
    query, taken from the event loop, the search and the decoding threads. Here they stop when
    the run returns: the process uses (almost) no CPU while it sleeps straight after a run."""
    import statistics
    import time

    model = _tiny()
    engine = OnnxRuntimeEncoder(model, tmp_path, threads=2)
    pixels = model.preprocess(_images(4, size=48))
    tok = model.tokenize(TEXTS)
    runs = {
        "image": lambda: engine.encode_image(pixels),
        "text": lambda: engine.encode_text(tok["input_ids"], tok["attention_mask"]),
    }
    for kind, run in runs.items():
        burnt = []
        for _ in range(5):
            run()
            cpu = time.process_time()
            time.sleep(0.1)
            burnt.append(time.process_time() - cpu)
        # spinning burns ~0.065 s of the 0.1 s; stopped, ~0.0001 s (the median absorbs a
        # stray wake-up of another thread)
        assert statistics.median(burnt) < 0.02, (kind, burnt)
