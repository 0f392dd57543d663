"""Model registry: named configs in `models/configs/*.json`, one `create_model`.

model = create_model()                                   # the shipped default
model = create_model("effnet-lite0-minilm-set")          # another named architecture
model = create_model(checkpoint="runs/x/best.safetensors")  # config comes from the file
model = create_model("my-openclip.json")                 # a config file of your own
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.checkpoint import load_checkpoint
from models.config import ModelConfig, VideoPooling
from models.model import XModal

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_MODEL",
    "WEIGHTS_DIR",
    "create_model",
    "get_model_config",
    "list_models",
    "shipped_weights",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "effnet-lite2-minilm-gpo-tuned"


def list_models() -> list[str]:
    """Names of the shipped model configs (`models/configs/*.json`), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name: str | Path) -> ModelConfig:
    """Config of a registered model name, or of a `.json` config file path."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        candidate = Path(name)
        if candidate.suffix == ".json" and candidate.is_file():
            path = candidate
        else:
            raise ValueError(
                f"unknown model {str(name)!r}; available: {list_models()} "
                "(or give a path to a .json config)"
            )
    return ModelConfig.from_file(path)


def shipped_weights(name: str) -> Path | None:
    """`models/weights/<name>.safetensors` when it exists, else None."""
    path = WEIGHTS_DIR / f"{name}.safetensors"
    return path if path.is_file() else None


def create_model(
    name: str | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    pretrained: bool = True,
    video_pooling: VideoPooling | None = None,
) -> XModal:
    """Build a model by name, optionally loading a checkpoint.

    Args:
        name: a name from `list_models()` or a path to a `.json` config; None = DEFAULT_MODEL.
        checkpoint: a file from `save_checkpoint`; its embedded config wins over `name`.
            Without one, the shipped head weights `models/weights/<name>.safetensors` load
            when that file exists (and `pretrained` is True).
        device: where to put the model (default CPU).
        pretrained: load backbone weights (package / local checkpoint) and shipped heads;
            False builds random weights (fast, for tests).
        video_pooling: how frames are pooled, overriding the config's ``video.pooling``:
            ``"mean"`` always works, ``"gpo"`` needs a model that has a (trained) video GPO;
            None = the model's own (the shipped default: its trained GPO).

    Returns:
        The model in eval mode.

    Raises:
        ValueError: ``video_pooling="gpo"`` for a model without a video GPO.
    """
    if checkpoint is None:
        config = get_model_config(name or DEFAULT_MODEL)
        shipped = shipped_weights(config.name) if pretrained else None
        if shipped is None:
            if pretrained:
                logger.warning("no shipped weights for %s: the head is untrained", config.name)
            model = XModal(config, pretrained=pretrained)
        else:
            checkpoint = shipped
    if checkpoint is not None:
        model = load_checkpoint(checkpoint, pretrained=pretrained)
        if name is not None and Path(name).stem != model.name:
            logger.warning(
                "checkpoint %s holds model %r, not %r: using the checkpoint's config",
                checkpoint,
                model.name,
                name,
            )
        logger.info("loaded %s from %s", model.name, checkpoint)
    if video_pooling is not None:
        model.set_video_pooling(video_pooling)
    if device is not None:
        model.to(torch.device(device))
    return model.eval()
