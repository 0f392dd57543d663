"""Checkpoints: safetensors head weights with the model config in the metadata.

A checkpoint holds the head (projections, pooling, set module) and only those backbone weights
that cannot come from their package: a fine-tuned (`trainable`) tower, or one without external
weights (random towers). It reloads with no flags: `load_checkpoint(path)` rebuilds the model
from the embedded config and loads the tensors strictly.

Non-safetensors files (`.pt`) are read with `torch.load(..., weights_only=True)` and hold
`{"config": <json str>, "state_dict": {...}, "extra": {...}, "backbones": [...]}`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from models.config import ModelConfig
from models.model import XModal

logger = logging.getLogger(__name__)

__all__ = ["load_checkpoint", "load_state_into", "read_checkpoint", "save_checkpoint"]

FORMAT_VERSION = "1"
META_FORMAT = "xmodal.format"
META_CONFIG = "xmodal.config"
META_EXTRA = "xmodal.extra"
META_BACKBONES = "xmodal.backbones"  # backbone prefixes whose weights are in the file
SAFETENSORS_SUFFIX = ".safetensors"


def _saved_backbones(model: XModal) -> list[str]:
    towers = (("image_backbone.", model.image_backbone), ("text_backbone.", model.text_backbone))
    return [prefix for prefix, tower in towers if tower.trainable or not tower.external_weights]


def save_checkpoint(
    model: XModal,
    path: str | Path,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save the head weights (plus any backbone that has no external weights) and the config.

    Args:
        model: the model to save.
        path: destination; `.safetensors` (recommended) or anything else for `torch.save`.
        extra: JSON-serialisable extras (step, metrics...) stored beside the config.
        dtype: store floating-point tensors in this dtype (e.g. `torch.float16` halves a
            shipped file); loading casts them back to the model's dtype. None = as they are.

    Returns:
        The path written (atomically: a temporary file renamed into place).
    """
    path = Path(path)
    backbones = _saved_backbones(model)
    # clone: safetensors refuses tensors that share storage
    tensors = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in model.head_state_dict(backbones).items()
    }
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    config_json = model.config.to_json()
    extra_json = json.dumps(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if path.suffix == SAFETENSORS_SUFFIX:
        metadata = {
            META_FORMAT: FORMAT_VERSION,
            META_CONFIG: config_json,
            META_EXTRA: extra_json,
            META_BACKBONES: json.dumps(backbones),
        }
        save_file(tensors, str(tmp), metadata=metadata)
    else:
        payload = {
            "format": FORMAT_VERSION,
            "config": config_json,
            "extra": extra_json,
            "backbones": backbones,
            "state_dict": tensors,
        }
        torch.save(payload, tmp)
    os.replace(tmp, path)
    logger.info(
        "saved %s (%d tensors, backbones in file: %s) to %s",
        model.name,
        len(tensors),
        backbones or "none",
        path,
    )
    return path


def read_checkpoint(
    path: str | Path,
) -> tuple[ModelConfig, dict[str, Tensor], list[str], dict[str, Any]]:
    """Read `(config, state_dict, saved backbone prefixes, extra)` from a checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == SAFETENSORS_SUFFIX:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        if META_CONFIG not in meta:
            raise ValueError(f"{path} has no '{META_CONFIG}' metadata: not an xmodal checkpoint")
        config_json = meta[META_CONFIG]
        extra = json.loads(meta.get(META_EXTRA, "{}"))
        backbones = json.loads(meta.get(META_BACKBONES, "[]"))
    else:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
            raise ValueError(
                f"{path} is not an xmodal checkpoint (needs 'config' and 'state_dict' entries)"
            )
        config_json = payload["config"]
        if isinstance(config_json, dict):
            config_json = json.dumps(config_json)
        extra = payload.get("extra", {})
        if isinstance(extra, str):
            extra = json.loads(extra)
        backbones = list(payload.get("backbones", []))
        state = dict(payload["state_dict"])
    return ModelConfig.from_json(config_json), state, backbones, extra


def load_state_into(
    model: XModal, state: dict[str, Tensor], backbones: list[str], source: str | Path = "<state>"
) -> None:
    """Strictly load head weights (and the listed backbones) into `model`.

    Raises:
        ValueError: keys missing from or unexpected in `state`, or shapes that differ; the
            message lists them.
    """
    expected = model.head_state_dict(backbones)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"checkpoint {source} does not match model {model.name!r}: "
            f"missing keys {missing}; unexpected keys {unexpected}; shape mismatches {wrong_shape}"
        )
    model.load_state_dict(state, strict=False)  # every head key checked above


def load_checkpoint(
    path: str | Path, device: str | torch.device | None = None, pretrained: bool = True
) -> XModal:
    """Rebuild a model from a checkpoint's embedded config and load its weights strictly.

    Args:
        path: a file written by `save_checkpoint`.
        device: where to move the model (default: stays on CPU).
        pretrained: load the backbones that are not in the file from their packages / local
            checkpoints (False: random backbones, for tests).

    Returns:
        The model in eval mode; `model.checkpoint_extra` holds the saved extras.
    """
    config, state, backbones, extra = read_checkpoint(path)
    model = XModal(
        config,
        pretrained=pretrained,
        image_pretrained=pretrained and "image_backbone." not in backbones,
        text_pretrained=pretrained and "text_backbone." not in backbones,
    )
    load_state_into(model, state, backbones, source=path)
    model.checkpoint_extra = extra
    if device is not None:
        model.to(torch.device(device))
    return model.eval()
