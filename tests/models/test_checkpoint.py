"""Checkpoints: round trips, config carried, heads only, strict loading with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from models.config import HeadConfig, ImageTowerConfig, ModelConfig, SimilarityConfig
from models.factory import get_model_config
from models.model import XModal

TEXTS = ["a dog jumps over a log", "two girls on a swing", "x"]


def tiny(pooling: Any = "gpo", **updates: Any) -> ModelConfig:
    cfg = get_model_config("tiny-random")
    head = HeadConfig(pooling=pooling, num_slots=3, depth=1, heads=2, gpo_d_pe=16, gpo_d_hidden=16)
    sim = SimilarityConfig(kind="smooth_chamfer" if pooling == "set" else "cosine")
    return cfg.model_copy(
        update={"name": f"tiny-{pooling}", "head": head, "similarity": sim, **updates}
    )


def perturb(model: XModal) -> XModal:
    """Move the head away from its seeded init, so a round trip proves weights were loaded."""
    with torch.no_grad():
        for k, p in model.named_parameters():
            if not k.startswith(("image_backbone", "text_backbone")):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def keys_in(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("pooling", ["gpo", "set"])
def test_round_trip_identical_embeddings(tmp_path: Path, pooling: str) -> None:
    model = perturb(XModal(tiny(pooling)))
    path = save_checkpoint(model, tmp_path / "m.safetensors", extra={"step": 7, "rsum": 1.5})
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert loaded.checkpoint_extra == {"step": 7, "rsum": 1.5}
    assert not loaded.training
    np.testing.assert_array_equal(loaded.embed_texts(TEXTS), model.embed_texts(TEXTS))
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels))


def test_half_precision_file_is_half_the_size_and_loads_as_float32(tmp_path: Path) -> None:
    model = perturb(XModal(tiny("gpo")))
    full = save_checkpoint(model, tmp_path / "full.safetensors")
    half = save_checkpoint(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    a, b = loaded.embed_texts(TEXTS), model.embed_texts(TEXTS)
    assert not np.array_equal(a, b)  # rounded...
    np.testing.assert_allclose(a, b, atol=5e-3)  # ...by no more than fp16 rounding


def test_torch_format_round_trip(tmp_path: Path) -> None:
    model = perturb(XModal(tiny("mean")))
    path = save_checkpoint(model, tmp_path / "m.pt", extra={"note": "pt"})
    payload = torch.load(path, weights_only=True)  # loads without unpickling code
    assert json.loads(payload["config"])["name"] == "tiny-mean"
    loaded = load_checkpoint(path)
    assert loaded.checkpoint_extra == {"note": "pt"}
    np.testing.assert_array_equal(loaded.embed_texts(TEXTS), model.embed_texts(TEXTS))


def test_heads_only_for_package_backbones(tmp_path: Path) -> None:
    # EfficientNet-Lite0 comes from its package (left out); the random text tower is kept.
    image = ImageTowerConfig(
        backbone="efficientnet-lite0",
        image_size=64,
        feature_dim=1280,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )
    model = perturb(XModal(tiny("gpo", image=image)))
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    keys = keys_in(path)
    assert not any(k.startswith("image_backbone.") for k in keys)
    assert any(k.startswith("text_backbone.") for k in keys)
    assert any(k.startswith("image_proj.") for k in keys)
    config, _, backbones, _ = read_checkpoint(path)
    assert backbones == ["text_backbone."] and config.image.backbone == "efficientnet-lite0"
    loaded = load_checkpoint(path)
    assert loaded.image_backbone.external_weights
    pixels = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels))


def test_trainable_backbone_is_saved(tmp_path: Path) -> None:
    cfg = tiny("gpo")
    cfg = cfg.model_copy(update={"image": cfg.image.model_copy(update={"trainable": True})})
    model = XModal(cfg)
    assert any(p.requires_grad for p in model.image_backbone.parameters())
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    assert any(k.startswith("image_backbone.") for k in keys_in(path))
    assert load_checkpoint(path).config.image.trainable


def _rewrite(path: Path, out: Path, drop: str | None = None, add: str | None = None) -> Path:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(3)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_missing_or_unexpected_keys_fail_clearly(tmp_path: Path) -> None:
    path = save_checkpoint(XModal(tiny("gpo")), tmp_path / "m.safetensors")
    missing = _rewrite(path, tmp_path / "missing.safetensors", drop="image_proj.fc.weight")
    with pytest.raises(ValueError, match=r"missing keys \['image_proj.fc.weight'\]"):
        load_checkpoint(missing)
    extra = _rewrite(path, tmp_path / "extra.safetensors", add="text_proj.bogus")
    with pytest.raises(ValueError, match=r"unexpected keys \['text_proj.bogus'\]"):
        load_checkpoint(extra)


def test_shape_mismatch_fails_clearly(tmp_path: Path) -> None:
    path = save_checkpoint(XModal(tiny("gpo")), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    cfg = json.loads(meta["xmodal.config"])
    cfg["embed_dim"] = 32  # config no longer matches the tensors
    meta["xmodal.config"] = json.dumps(cfg)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_not_an_xmodal_checkpoint(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an xmodal checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not an xmodal checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_open_clip_towers_from_local_file(tmp_path: Path) -> None:
    import open_clip

    arch_json = tmp_path / "tiny-clip-ckpt.json"
    arch_json.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
                "text_cfg": {
                    "context_length": 16,
                    "vocab_size": 49408,
                    "width": 32,
                    "heads": 2,
                    "layers": 1,
                },
            }
        )
    )
    open_clip.add_model_config(arch_json)
    torch.manual_seed(3)
    clip_path = tmp_path / "clip.pt"
    torch.save(open_clip.create_model(arch_json.stem).state_dict(), clip_path)  # CLIP layout
    arch = f"open_clip:{arch_json}"
    base = tiny("gpo")
    cfg = base.model_copy(
        update={
            "image": ImageTowerConfig(
                backbone=arch, image_size=32, feature_dim=64, checkpoint=str(clip_path)
            ),
            "text": base.text.model_copy(
                update={
                    "backbone": arch,
                    "feature_dim": 32,
                    "max_length": 16,
                    "checkpoint": str(clip_path),
                }
            ),
        }
    )
    model = perturb(XModal(cfg))
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    assert not any(k.startswith(("image_backbone.", "text_backbone.")) for k in keys_in(path))
    loaded = load_checkpoint(path)
    np.testing.assert_array_equal(loaded.embed_texts(TEXTS), model.embed_texts(TEXTS))
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels))
