"""Tuning the top blocks of EfficientNet-Lite on cached trunk features (`tune_blocks`).

The cache stores what the frozen trunk gives; the tuned blocks run inside the model, train with
the heads, go into checkpoints, and the serving path (pixels -> full backbone) must give the
same embeddings as the cached training path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.backbones import build_image_backbone, build_text_backbone
from models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from models.config import ImageTowerConfig, TextTowerConfig
from models.data import load_dataset
from models.evaluate import embed_cached
from models.model import XModal
from models.train import TrainConfig, load_split_features, model_config_for, train

LITE0_64 = {"backbone": "efficientnet-lite0", "image_size": 64, "feature_dim": 1280}
MINILM_TUNE1 = {"backbone": "all-MiniLM-L6-v2", "feature_dim": 384, "tune_layers": 1}


def _tower(tune_blocks: int) -> ImageTowerConfig:
    return ImageTowerConfig(**LITE0_64, tune_blocks=tune_blocks)


def test_trunk_then_top_is_the_full_backbone() -> None:
    frozen = build_image_backbone(_tower(0), pretrained=False)
    tuned = build_image_backbone(_tower(3), pretrained=False)
    tuned.load_state_dict(frozen.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full, lengths = frozen(pixels)
        cut = tuned.trunk(pixels)
        top = tuned.top(cut)
    assert cut.shape[-1] == 192  # input channels of block 13 (7x7 stage), not the 1280 of the head
    assert torch.allclose(top, full, atol=1e-5)
    assert torch.allclose(tuned(pixels)[0], full, atol=1e-5)
    assert lengths.tolist() == [full.shape[1]] * 2


def test_only_the_top_blocks_train_and_batchnorm_stays_frozen() -> None:
    tower = build_image_backbone(_tower(2), pretrained=False)
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable, "tune_blocks=2 must unfreeze something"
    assert all(n.startswith(tower.tuned_prefixes()) for n in trainable)
    assert any(n.startswith("net._blocks.15.") for n in trainable)
    assert any(n.startswith("net._conv_head.") for n in trainable)
    assert not any(n.startswith(("net._blocks.13.", "net._conv_stem.")) for n in trainable)
    tower.train()
    assert not tower.training  # BatchNorm statistics and drop-connect stay as in inference
    out = tower.top(tower.trunk(torch.randn(2, 3, 64, 64)))
    out.square().mean().backward()
    grads = {n for n, p in tower.named_parameters() if p.grad is not None}
    assert grads == trainable


def test_minilm_trunk_then_top_is_the_full_encoder() -> None:
    frozen = build_text_backbone(TextTowerConfig())
    tuned = build_text_backbone(TextTowerConfig(tune_layers=2))
    tok = frozen.tokenize(["a dog runs on the beach", "two men", "a child in a red coat jumps"])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    with torch.no_grad():
        full, lengths = frozen(ids, mask)
        cut = tuned.trunk(ids, mask)
        top = tuned.top(cut, lengths)
    real = mask.bool()
    assert not torch.allclose(cut[real], full[real], atol=1e-2)  # the cut is lower down
    assert torch.allclose(top[real], full[real], atol=1e-4)
    # Padding after a caption does not change its tuned features (padded keys are masked).
    with torch.no_grad():
        alone = tuned.top(cut[1:2, : int(lengths[1])], lengths[1:2])
    assert torch.allclose(alone[0], top[1, : int(lengths[1])], atol=1e-5)
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("net.encoder.layer.4.", "net.encoder.layer.5.")) for n in trainable
    )


def test_tune_blocks_is_rejected_where_it_cannot_work() -> None:
    with pytest.raises(ValueError, match="EfficientNet-Lite"):
        build_image_backbone(ImageTowerConfig(backbone="random-conv", tune_blocks=1))
    with pytest.raises(ValueError, match="16 blocks"):
        build_image_backbone(_tower(17), pretrained=False)
    with pytest.raises(ValueError, match="tune_layers"):
        build_text_backbone(TextTowerConfig(backbone="random-bytes", tune_layers=1))


def test_checkpoint_carries_the_tuned_blocks_only(tmp_path: Path) -> None:
    cfg = model_config_for(
        TrainConfig(model="tiny-random", model_overrides={"image": {**LITE0_64, "tune_blocks": 2}})
    )
    model = XModal(cfg, image_pretrained=True, text_pretrained=False)  # package trunk weights
    with torch.no_grad():  # make the tuned weights differ from the package's
        model.image_backbone.net._conv_head.weight.mul_(1.5)
    path = save_checkpoint(model, tmp_path / "tuned.safetensors")
    _, state, backbones, _ = read_checkpoint(path)
    assert "image_backbone." not in backbones  # the trunk is not in the file...
    backbone_keys = [k for k in state if k.startswith("image_backbone.")]
    assert "image_backbone.net._conv_head.weight" in backbone_keys  # ...the tuned top is
    assert not any(k.startswith("image_backbone.net._blocks.13.") for k in backbone_keys)
    assert not any(k.startswith("image_backbone.net._conv_stem.") for k in backbone_keys)

    reloaded = load_checkpoint(path)  # trunk from the package, top and heads from the file
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(reloaded.encode_image(pixels), model.encode_image(pixels), atol=1e-5)
        untuned = XModal(cfg, image_pretrained=True, text_pretrained=False)
        untuned.load_state_dict(model.head_state_dict(), strict=False)
        untuned.image_backbone.net._conv_head.weight.div_(1.5)
        assert not torch.allclose(untuned.encode_image(pixels), model.encode_image(pixels))


def _photo_dataset(root: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        base = rng.integers(0, 255, size=3)
        noise = rng.integers(0, 60, size=(48, 48, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        colour = "red green blue"
        caps = [f"a picture number {i} with tone {base.tolist()} {colour}", f"photo {i}"]
        rows.append({"image": f"{i}.png", "split": "train" if i < 16 else "dev", "captions": caps})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_training_tunes_the_top_and_serving_matches_the_cache(tmp_path: Path) -> None:
    data = _photo_dataset(tmp_path / "data")
    cfg = TrainConfig(
        model="tiny-random",
        model_overrides={"image": {**LITE0_64, "tune_blocks": 2}, "text": MINILM_TUNE1},
        data=data,
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "run",
        epochs=2,
        batch_size=8,
        lr=1e-3,
        backbone_lr_scale=1.0,
        progress=False,
        num_threads=1,
    )
    best = train(cfg)
    caches = sorted(p.name for p in (tmp_path / "cache").glob("*/img-*"))
    assert caches and all("-cut2-" in name for name in caches)
    text_caches = sorted(p.name for p in (tmp_path / "cache").glob("*/txt-*"))
    assert text_caches and all("-cut1-" in name for name in text_caches)

    model = load_checkpoint(best)  # package trunk weights + tuned top from the file
    fresh = XModal(model.config, pretrained=True)
    tuned_key = "image_backbone.net._conv_head.weight"
    assert not torch.equal(model.state_dict()[tuned_key], fresh.state_dict()[tuned_key])
    trunk_key = "image_backbone.net._blocks.0._depthwise_conv.weight"
    assert torch.equal(model.state_dict()[trunk_key], fresh.state_dict()[trunk_key])

    dev = load_dataset(data, "dev")
    feats = load_split_features(dev, model.config, cfg.cache_dir, progress=False)
    cached, _ = embed_cached(model, feats)  # fp16 trunk cache -> tuned top -> heads
    served = model.embed_images([Image.open(p) for p in dev.images])  # pixels, full backbone
    assert np.allclose(cached.numpy(), served, atol=2e-2)
    assert (cached.numpy() * served).sum(axis=1).min() > 0.999

    text_key = "text_backbone.net.encoder.layer.5.output.dense.weight"
    assert not torch.equal(model.state_dict()[text_key], fresh.state_dict()[text_key])
    _, cached_txt = embed_cached(model, feats)
    served_txt = model.embed_texts(dev.captions)
    assert (cached_txt.numpy() * served_txt).sum(axis=1).min() > 0.999
