"""Registry and create_model: configs, defaults, checkpoints, shipped weights, real photos."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models
from models import factory
from models.checkpoint import save_checkpoint
from models.config import ModelConfig
from models.factory import DEFAULT_MODEL, create_model, get_model_config, list_models

SHIPPED = {
    "effnet-lite0-minilm-gpo",
    "effnet-lite0-minilm-gpo-tuned",
    "effnet-lite0-minilm-mean",
    "effnet-lite0-minilm-max",
    "effnet-lite0-minilm-max-tuned",
    "effnet-lite0-minilm-set",
    "effnet-lite2-minilm-gpo",
    "effnet-lite2-minilm-gpo-tuned",
    "openclip-vit-b-32-gpo",
    "tiny-random",
}


def test_list_models_contains_the_configs() -> None:
    names = list_models()
    assert set(names) >= SHIPPED
    assert names == sorted(names)
    assert DEFAULT_MODEL == "effnet-lite2-minilm-gpo-tuned"
    assert get_model_config(DEFAULT_MODEL).embed_dim == 1024


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_configs_round_trip_json(name: str) -> None:
    cfg = get_model_config(name)
    assert cfg.name == name
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert (cfg.head.pooling == "set") == (cfg.similarity.kind == "smooth_chamfer")


def test_unknown_name_and_bad_config_fail() -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ValueError, match="extra"):
        ModelConfig.from_json('{"name": "x", "embedd_dim": 3}')  # typo is not ignored


def test_tiny_random_builds_fast_and_encodes_real_inputs(flickr_dir: Path) -> None:
    start = time.perf_counter()
    model = create_model("tiny-random")
    assert time.perf_counter() - start < 1.0
    assert model.embed_dim == 64 and not model.training
    files = sorted((flickr_dir / "images").glob("*.jpg"))[:3]
    images = [Image.open(f) for f in files]
    emb = model.embed_images(images)
    txt = model.embed_texts(["A dog runs on the beach .", "Ein Hund läuft 🐕"])
    vid = model.embed_video_frames(images)
    assert emb.shape == (3, 64) and txt.shape == (2, 64) and vid.shape == (1, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # the same untrained model in every process
    np.testing.assert_array_equal(create_model("tiny-random").embed_images(images), emb)


def test_checkpoint_config_wins_over_name(tmp_path: Path) -> None:
    cfg = get_model_config("tiny-random").model_copy(update={"name": "tiny-other", "embed_dim": 48})
    path = save_checkpoint(models.XModal(cfg), tmp_path / "other.safetensors")
    model = create_model("tiny-random", checkpoint=path, device="cpu")
    assert model.name == "tiny-other" and model.embed_dim == 48
    assert model.device == torch.device("cpu")


def test_shipped_weights_load_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "WEIGHTS_DIR", tmp_path)
    untrained = create_model("tiny-random")
    trained = create_model("tiny-random")
    with torch.no_grad():
        trained.text_proj.fc.weight.mul_(-1.0)
    save_checkpoint(trained, tmp_path / "tiny-random.safetensors")
    texts = ["a red car", "a cat"]
    shipped = create_model("tiny-random")
    np.testing.assert_array_equal(shipped.embed_texts(texts), trained.embed_texts(texts))
    assert not np.allclose(shipped.embed_texts(texts), untrained.embed_texts(texts))
    # pretrained=False skips shipped weights too
    np.testing.assert_array_equal(
        create_model("tiny-random", pretrained=False).embed_texts(texts),
        untrained.embed_texts(texts),
    )


def test_name_may_be_a_config_file(tmp_path: Path) -> None:
    cfg = get_model_config("tiny-random").model_copy(update={"name": "my-tiny", "embed_dim": 16})
    cfg.save(tmp_path / "my-tiny.json")
    assert create_model(str(tmp_path / "my-tiny.json")).embed_dim == 16


def test_open_clip_config_needs_a_local_checkpoint() -> None:
    with pytest.raises(ValueError, match="local checkpoint"):
        create_model("openclip-vit-b-32-gpo")


def test_default_model_on_real_photos(flickr_dir: Path) -> None:
    model = create_model()  # package weights: EfficientNet-Lite2 + all-MiniLM-L6-v2
    assert model.name == DEFAULT_MODEL and model.embed_dim == 1024
    assert model.image_backbone.external_weights and model.text_backbone.external_weights
    files = sorted((flickr_dir / "images").glob("*.jpg"))[:2]
    images = [Image.open(f) for f in files]
    with torch.no_grad():
        pixels = model.preprocess(images)
        size = model.config.image.image_size  # 260 for the Lite2 default
        assert pixels.shape == (2, 3, size, size)
        emb = model.encode_image(pixels)
        batch = model.tokenize(["A dog runs .", "A child climbs the stairs ."])
        txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert emb.shape == (2, 1024) and txt.shape == (2, 1024)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert model.similarity(emb, txt).shape == (2, 2)
