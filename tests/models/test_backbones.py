"""Backbones on real photos and captions: shapes, lengths, batch invariance, freezing, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.backbones import (
    ImageBackbone,
    TextBackbone,
    build_image_backbone,
    build_text_backbone,
)
from models.config import ImageTowerConfig, TextTowerConfig

CAPTIONS = [
    "A black dog runs across the grass .",
    "Two children play in the fountain on a sunny day near the old brick church .",
    "A man .",
]

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def photos(flickr_dir: Path) -> list[Image.Image]:
    files = sorted((flickr_dir / "images").glob("*.jpg"))[:3]
    assert len(files) == 3
    return [Image.open(f).convert("RGB") for f in files]


@pytest.fixture(scope="module")
def lite0() -> ImageBackbone:
    return build_image_backbone(ImageTowerConfig(backbone="efficientnet-lite0", image_size=224))


@pytest.fixture(scope="module")
def minilm() -> TextBackbone:
    return build_text_backbone(TextTowerConfig(backbone="all-MiniLM-L6-v2", max_length=32))


@pytest.fixture()
def tiny_clip_json(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-clip-test.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    return path


def test_lite0_grid_features_on_real_photos(
    lite0: ImageBackbone, photos: list[Image.Image]
) -> None:
    pixels = lite0.preprocess(photos)
    assert pixels.shape == (3, 3, 224, 224) and pixels.dtype == torch.float32
    with torch.no_grad():
        feats, lengths = lite0(pixels)
    assert feats.shape == (3, 49, 1280)
    assert lengths.tolist() == [49, 49, 49]
    assert lite0.feature_dim == 1280
    assert torch.isfinite(feats).all() and feats.std() > 0
    # different photos give different features
    assert not torch.allclose(feats[0], feats[1])


def test_lite0_same_image_alone_and_in_batch(
    lite0: ImageBackbone, photos: list[Image.Image]
) -> None:
    with torch.no_grad():
        batch, _ = lite0(lite0.preprocess(photos))
        alone, _ = lite0(lite0.preprocess(photos[1:2]))
        again, _ = lite0(lite0.preprocess(photos[1:2]))
    assert torch.equal(alone, again)  # deterministic per input
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=1e-4)


def test_lite2_larger_grid(photos: list[Image.Image]) -> None:
    backbone = build_image_backbone(
        ImageTowerConfig(backbone="efficientnet-lite2", image_size=260), pretrained=False
    )
    with torch.no_grad():
        feats, lengths = backbone(backbone.preprocess(photos[:1]))
    assert feats.shape == (1, 81, 1280) and lengths.tolist() == [81]


def test_minilm_token_features(minilm: TextBackbone) -> None:
    batch = minilm.tokenize(CAPTIONS)
    assert set(batch) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        feats, lengths = minilm(**batch)
    b, n = batch["input_ids"].shape
    assert feats.shape == (3, n, 384)
    assert torch.equal(lengths, batch["attention_mask"].sum(1))
    assert lengths[1] > lengths[0] > lengths[2]  # longer caption, more tokens
    # batch invariance on the valid tokens
    alone = minilm.tokenize(CAPTIONS[:1])
    with torch.no_grad():
        feats1, len1 = minilm(**alone)
    torch.testing.assert_close(feats[0, : len1[0]], feats1[0], atol=1e-5, rtol=1e-4)


def test_minilm_truncates_to_max_length(minilm: TextBackbone) -> None:
    batch = minilm.tokenize(["dog " * 200])
    assert batch["input_ids"].shape[1] == 32


def test_backbones_frozen_by_default(lite0: ImageBackbone, minilm: TextBackbone) -> None:
    for backbone in (lite0, minilm):
        assert all(not p.requires_grad for p in backbone.parameters())
        backbone.train()
        assert not backbone.training  # stays in eval: BatchNorm stats never move
        assert backbone.external_weights


def test_trainable_backbone_unfreezes() -> None:
    cfg = ImageTowerConfig(backbone="random-conv", image_size=32, feature_dim=16, trainable=True)
    backbone = build_image_backbone(cfg)
    assert all(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert backbone.training
    feats, _ = backbone(torch.randn(2, 3, 32, 32))
    feats.sum().backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_open_clip_tiny_random_loads_by_path(tmp_path: Path, tiny_clip_json: Path) -> None:
    import open_clip

    arch = f"open_clip:{tiny_clip_json}"
    open_clip.add_model_config(tiny_clip_json)
    torch.manual_seed(1)
    reference = open_clip.create_model(tiny_clip_json.stem, force_custom_text=True)
    ckpt = tmp_path / "tiny.pt"
    torch.save(reference.state_dict(), ckpt)

    img_cfg = ImageTowerConfig(backbone=arch, image_size=32, feature_dim=64, checkpoint=str(ckpt))
    txt_cfg = TextTowerConfig(backbone=arch, feature_dim=32, max_length=16, checkpoint=str(ckpt))
    image, text = build_image_backbone(img_cfg), build_text_backbone(txt_cfg)
    assert image.external_weights and text.external_weights
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, lengths = image(pixels)
        reference.visual.output_tokens = True
        _, ref_tokens = reference.eval().visual(pixels)
    assert feats.shape == (2, 16, 64) and lengths.tolist() == [16, 16]
    torch.testing.assert_close(feats, ref_tokens)

    batch = text.tokenize(CAPTIONS)
    with torch.no_grad():
        tfeats, tlengths = text(**batch)
    assert tfeats.shape[0] == 3 and tfeats.shape[2] == 32
    assert torch.equal(tlengths, batch["attention_mask"].sum(1))
    with torch.no_grad():
        random_text = build_text_backbone(txt_cfg, pretrained=False)
        other, _ = random_text(**batch)
    assert not torch.allclose(tfeats, other)  # the checkpoint really was loaded


def test_open_clip_missing_checkpoint_is_clear(tiny_clip_json: Path) -> None:
    cfg = ImageTowerConfig(
        backbone=f"open_clip:{tiny_clip_json}",
        image_size=32,
        feature_dim=64,
        checkpoint="/nonexistent/clip.pt",
    )
    with pytest.raises(FileNotFoundError, match="never"):
        build_image_backbone(cfg)


def test_random_towers_accept_real_inputs(photos: list[Image.Image]) -> None:
    image = build_image_backbone(
        ImageTowerConfig(backbone="random-conv", image_size=64, feature_dim=32)
    )
    text = build_text_backbone(
        TextTowerConfig(backbone="random-bytes", feature_dim=32, max_length=48)
    )
    assert not image.external_weights and not text.external_weights
    with torch.no_grad():
        feats, lengths = image(image.preprocess(photos))
        batch = text.tokenize([*CAPTIONS, "ünïcödé ✓"])
        tfeats, tlengths = text(**batch)
        alone, _ = text(**text.tokenize(CAPTIONS[2:3]))
    assert feats.shape == (3, 64, 32) and lengths.tolist() == [64] * 3
    assert tfeats.shape[0] == 4 and tfeats.shape[2] == 32
    torch.testing.assert_close(tfeats[2, : tlengths[2]], alone[0], atol=1e-5, rtol=1e-4)


def test_wrong_feature_dim_and_unknown_backbone_fail() -> None:
    with pytest.raises(ValueError, match="feature_dim"):
        build_image_backbone(ImageTowerConfig(feature_dim=512), pretrained=False)
    with pytest.raises(ValueError, match="unknown image backbone"):
        build_image_backbone(ImageTowerConfig(backbone="resnet9000"))
    with pytest.raises(ValueError, match="unknown text backbone"):
        build_text_backbone(TextTowerConfig(backbone="bert-huge"))
