"""The model we ship: its weights file matches its named config and the size budget."""

from __future__ import annotations

from models import DEFAULT_MODEL, get_model_config
from models.checkpoint import read_checkpoint
from models.factory import shipped_weights
from models.model import XModal

MAX_SHIPPED_MB = 25  # issue #3: heads (+ tuned top blocks); backbones come from their packages


def test_default_model_ships_weights_within_budget() -> None:
    path = shipped_weights(DEFAULT_MODEL)
    assert path is not None and path.is_file(), f"no shipped weights for {DEFAULT_MODEL}"
    assert path.stat().st_size < MAX_SHIPPED_MB * 2**20


def test_shipped_config_equals_the_named_config() -> None:
    """Serving by name and serving the checkpoint must preprocess identically."""
    path = shipped_weights(DEFAULT_MODEL)
    assert path is not None
    config, state, backbones, _ = read_checkpoint(path)
    assert config == get_model_config(DEFAULT_MODEL)
    assert backbones == [], "shipped weights must not carry whole backbones"
    assert state, "shipped weights hold no tensors"
    # Only the tuned top of a backbone may ride along with the heads: exactly the keys the
    # model saves (heads + `tuned_prefixes`), none of the package trunk.
    model = XModal(config, pretrained=False)
    assert set(state) == set(model.head_state_dict())
    tuned = tuple(f"image_backbone.{p}" for p in model.image_backbone.tuned_prefixes())
    for key in state:
        assert not key.startswith("image_backbone.") or key.startswith(tuned), key
        assert not key.startswith("text_backbone.") or config.text.tune_layers, key
    assert not any(k.startswith("image_backbone.net._conv_stem.") for k in state)
