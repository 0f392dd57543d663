"""xmodal models: backbones, heads, losses and training for cross-modal embeddings."""

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ModelConfig
from models.factory import DEFAULT_MODEL, create_model, get_model_config, list_models
from models.model import XModal

__all__ = [
    "DEFAULT_MODEL",
    "ModelConfig",
    "XModal",
    "create_model",
    "get_model_config",
    "list_models",
    "load_checkpoint",
    "save_checkpoint",
]
