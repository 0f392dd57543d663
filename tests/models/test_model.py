"""XModal: encoder shapes and norms, head-only paths, gradients, video pooling, numpy helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.config import HeadConfig, ModelConfig, SimilarityConfig, VideoConfig
from models.factory import get_model_config
from models.model import XModal

CAPTIONS = [
    "A black dog runs across the grass .",
    "Two children play in the fountain on a sunny day .",
    "A man .",
]
POOLINGS = ["gpo", "mean", "max", "set"]


def tiny_config(pooling: Any = "gpo", video: Any = "mean") -> ModelConfig:
    """tiny-random with another pooling head (small set module, so tests stay fast)."""
    cfg = get_model_config("tiny-random")
    head = HeadConfig(
        pooling=pooling,
        num_slots=3,
        depth=2,
        heads=2,
        gpo_d_pe=16,
        gpo_d_hidden=16,
    )
    sim = SimilarityConfig(kind="smooth_chamfer" if pooling == "set" else "cosine")
    return cfg.model_copy(
        update={
            "name": f"tiny-{pooling}",
            "head": head,
            "similarity": sim,
            "video": VideoConfig(pooling=video, max_frames=4),
        }
    )


@pytest.fixture(scope="module")
def photos(flickr_dir: Path) -> list[Image.Image]:
    files = sorted((flickr_dir / "images").glob("*.jpg"))[:5]
    return [Image.open(f).convert("RGB") for f in files]


def synthetic_photos(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (80 + 7 * i, 60 + 5 * i, 3), dtype=np.uint8))
        for i in range(n)
    ]


def ids_mask(model: XModal, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = model.tokenize(texts)
    return batch["input_ids"], batch["attention_mask"]


def expected_shape(model: XModal, n: int) -> tuple[int, ...]:
    return (n, model.num_vectors, model.embed_dim) if model.is_set_model else (n, model.embed_dim)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_encode_shapes_and_unit_norms(pooling: str) -> None:
    model = XModal(tiny_config(pooling)).eval()
    assert model.is_set_model == (pooling == "set")
    assert model.num_vectors == (3 if pooling == "set" else 1)
    pixels = model.preprocess(synthetic_photos(4))
    tokens = model.tokenize(CAPTIONS)
    with torch.no_grad():
        img = model.encode_image(pixels)
        txt = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        frames = pixels[:3].unsqueeze(0).expand(2, 3, -1, -1, -1)  # [2, 3, 3, H, W]
        vid = model.encode_video(frames, torch.tensor([3, 2]))
    assert img.shape == expected_shape(model, 4)
    assert txt.shape == expected_shape(model, 3)
    assert vid.shape == expected_shape(model, 2)
    for emb in (img, txt, vid):
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(emb.shape[:-1]))
    sims = model.similarity(img, txt)
    assert sims.shape == (4, 3)
    assert torch.isfinite(sims).all()


def test_unnormalised_outputs_for_single_vector_models() -> None:
    model = XModal(tiny_config("mean")).eval()
    with torch.no_grad():
        raw = model.encode_text(*ids_mask(model, CAPTIONS), normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("pooling", POOLINGS)
def test_gradients_reach_every_head_parameter(pooling: str) -> None:
    model = XModal(tiny_config(pooling, video="gpo")).train()
    b, n, l_ = 3, 5, 7
    img = model.embed_image_features(torch.randn(b, n, 32), torch.tensor([5, 5, 5]))
    txt = model.embed_text_features(torch.randn(b, l_, 32), torch.tensor([7, 3, 1]))
    frame_embs = torch.nn.functional.normalize(torch.randn(b, 4, *img.shape[1:]), dim=-1)
    vid = model.pool_frames(frame_embs * img.unsqueeze(1), torch.tensor([4, 2, 1]))
    loss = model.similarity(img, txt).diagonal().sum() + model.similarity(vid, txt).sum()
    loss.backward()
    head = {k: p for k, p in model.named_parameters() if not k.startswith(("image_b", "text_b"))}
    assert head
    no_grad = [k for k, p in head.items() if p.grad is None or not torch.any(p.grad != 0)]
    # The video GPO starts exactly at mean pooling (a zero scorer), so on this first step
    # only its scorer learns; its GRU gets gradients once the scorer has moved.
    assert all(k.startswith("video_pool.gpo.gru.") for k in no_grad), no_grad
    assert "video_pool.gpo.linear.weight" not in no_grad
    assert not [k for k in no_grad if not k.startswith("video_pool.")]
    # frozen backbones get nothing
    assert all(not p.requires_grad for p in model.image_backbone.parameters())


def test_train_mode_keeps_backbones_in_eval() -> None:
    model = XModal(tiny_config()).train()
    assert model.training and model.image_proj.training
    assert not model.image_backbone.training and not model.text_backbone.training


def test_padding_never_changes_embeddings() -> None:
    model = XModal(tiny_config("gpo")).eval()
    feats = torch.randn(2, 6, 32)
    lengths = torch.tensor([4, 6])
    noisy = feats.clone()
    noisy[0, 4:] = 1e4  # garbage in the padding of row 0
    with torch.no_grad():
        a = model.embed_text_features(feats, lengths)
        b = model.embed_text_features(noisy, lengths)
        alone = model.embed_text_features(feats[:1, :4], lengths[:1])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:1], alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["gpo", "set"])
def test_batch_invariance_and_order(pooling: str) -> None:
    model = XModal(tiny_config(pooling))
    images = synthetic_photos(5)
    batch = model.embed_images(images, batch_size=2)
    alone = np.concatenate([model.embed_images([im]) for im in images])
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    texts = ["short", "a much longer caption about a dog on the beach", "mid length text"]
    all_at_once = model.embed_texts(texts, batch_size=2)  # sorted by length internally
    one_by_one = np.concatenate([model.embed_texts([t]) for t in texts])
    np.testing.assert_allclose(all_at_once, one_by_one, atol=1e-5)
    assert batch.dtype == np.float32 and batch.shape == expected_shape(model, 5)


def test_video_pooling_over_valid_frames_only() -> None:
    model = XModal(tiny_config("gpo", video="mean")).eval()
    images = synthetic_photos(3)
    pixels = model.preprocess(images)
    frames = torch.stack([pixels, pixels.flip(0)])  # [2, 3, 3, H, W]
    noisy = frames.clone()
    noisy[0, 2] = 50.0  # an invalid frame of clip 0 holds garbage
    with torch.no_grad():
        clean = model.encode_video(frames, torch.tensor([2, 3]))
        dirty = model.encode_video(noisy, torch.tensor([2, 3]))
        single = model.encode_video(frames[:1, :1], torch.tensor([1]))
        image = model.encode_image(pixels[:1])
    torch.testing.assert_close(clean, dirty)
    torch.testing.assert_close(single, image, atol=1e-6, rtol=1e-5)  # mean of one frame
    np.testing.assert_allclose(model.embed_video_frames(images[:2]), clean[:1].numpy(), atol=1e-5)


@pytest.mark.parametrize("pooling", ["gpo", "set"])
def test_video_gpo_and_frame_subsampling(pooling: str) -> None:
    model = XModal(tiny_config(pooling, video="gpo"))
    out = model.embed_video_frames(synthetic_photos(9))  # max_frames=4: subsampled
    assert out.shape == expected_shape(model, 1)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="at least one frame"):
        model.embed_video_frames([])


@pytest.mark.parametrize("video", ["mean", "gpo"])
def test_segments_pool_each_over_its_own_frames(video: str) -> None:
    model = XModal(tiny_config("gpo", video=video)).eval()
    photos = synthetic_photos(7)
    segments = [photos[:3], photos[3:4], photos[4:7]]  # ragged: padding must not leak
    out = model.embed_segments(segments)
    assert out.shape == (3, model.embed_dim) and out.dtype == np.float32
    for row, seg in zip(out, segments, strict=True):  # the same as one clip per segment
        np.testing.assert_allclose(row, model.embed_video_frames(seg)[0], atol=1e-5)
    with pytest.raises(ValueError, match="at least one frame"):
        model.embed_segments([photos[:2], []])
    with pytest.raises(ValueError, match="single-vector"):
        XModal(tiny_config("set")).embed_segments([photos[:2]])


def test_empty_inputs_give_empty_arrays() -> None:
    for pooling in ("gpo", "set"):
        model = XModal(tiny_config(pooling))
        assert model.embed_images([]).shape == expected_shape(model, 0)
        assert model.embed_texts([]).shape == expected_shape(model, 0)


def test_dtype_follows_the_parameters() -> None:
    model = XModal(tiny_config("gpo")).to(torch.float64).eval()
    with torch.no_grad():
        out = model.encode_image(model.preprocess(synthetic_photos(2)))
        txt = model.encode_text(*ids_mask(model, CAPTIONS[:2]))
    assert out.dtype == torch.float64 and txt.dtype == torch.float64
    assert model.embed_texts(CAPTIONS).dtype == np.float32


def test_same_config_same_untrained_model() -> None:
    a, b = XModal(tiny_config("set")), XModal(tiny_config("set"))
    np.testing.assert_array_equal(a.embed_texts(CAPTIONS), b.embed_texts(CAPTIONS))


def test_inconsistent_similarity_is_rejected() -> None:
    cfg = tiny_config("set").model_copy(update={"similarity": SimilarityConfig(kind="cosine")})
    with pytest.raises(ValueError, match="smooth_chamfer"):
        XModal(cfg)


def test_real_photos_through_tiny_model(photos: list[Image.Image]) -> None:
    model = XModal(tiny_config("gpo"))
    emb = model.embed_images(photos)
    assert emb.shape == (5, 64)
    assert np.unique(emb.round(5), axis=0).shape[0] == 5  # distinct photos, distinct vectors
