"""Typed model configuration: architecture is data (one JSON file per named model).

Follows open_clip's `CLIPVisionCfg` / `CLIPTextCfg` style: every knob is a typed field with a
comment saying what it does. `ModelConfig` round-trips through JSON exactly
(`ModelConfig.from_json(cfg.to_json()) == cfg`), which is how checkpoints carry their config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "HeadConfig",
    "ImageTowerConfig",
    "ModelConfig",
    "SimilarityConfig",
    "TextTowerConfig",
    "VideoConfig",
    "VideoPooling",
]

# ImageNet statistics (torchvision / timm convention).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Inception-style scaling (mean 127, std 128 on 0..255). The EfficientNet-Lite checkpoints were
# trained with it ("edge models use inception-style MEAN and STDDEV for better
# post-quantization", TF efficientnet_lite_builder.py), so the effnet-lite configs use it.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


class _Strict(BaseModel):
    # Unknown keys are an error: a typo in a config file must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class ImageTowerConfig(_Strict):
    # "efficientnet-lite0" | "efficientnet-lite1" | "efficientnet-lite2" (package ImageNet weights),
    # "open_clip:<arch>" (e.g. "open_clip:ViT-B-32", weights from `checkpoint`),
    # "random-conv" (tiny randomly initialised conv net, for tests; no package weights).
    backbone: str = "efficientnet-lite0"
    # Square input resolution fed to the backbone (PIL images are resized to this).
    image_size: int = 224
    # Channels C of the grid features [B, N, C] the backbone returns.
    feature_dim: int = 1280
    # Local checkpoint path for open_clip towers (never downloaded); None = architecture only.
    checkpoint: str | None = None
    # Per-channel normalisation applied after scaling pixels to [0, 1] (ImageNet by default;
    # INCEPTION_MEAN/STD for EfficientNet-Lite, the CLIP statistics for open_clip).
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Fine-tune the backbone (GPU); False = frozen, eval mode, requires_grad False.
    trainable: bool = False
    # EfficientNet-Lite only: the last `tune_blocks` MBConv blocks and the 1x1 head conv are
    # trained with the heads (their BatchNorm statistics stay frozen); the frozen trunk below
    # them is what the feature cache stores, so this trains on CPU. 0 = fully frozen.
    tune_blocks: int = Field(0, ge=0)


class TextTowerConfig(_Strict):
    # "all-MiniLM-L6-v2" (package weights, offline), "open_clip:<arch>" (weights from
    # `checkpoint`), or "random-bytes" (tiny random byte-level transformer, for tests).
    backbone: str = "all-MiniLM-L6-v2"
    # Maximum number of tokens per text (longer texts are truncated).
    max_length: int = 64
    # Width C of the token features [B, L, C] the backbone returns.
    feature_dim: int = 384
    # Local checkpoint path for open_clip towers (never downloaded); None = architecture only.
    checkpoint: str | None = None
    # Fine-tune the backbone (GPU); False = frozen, eval mode, requires_grad False.
    trainable: bool = False
    # all-MiniLM-L6-v2 only: the last `tune_layers` transformer layers are trained with the
    # heads; the feature cache stores the hidden states below them. 0 = fully frozen.
    tune_layers: int = Field(0, ge=0)


class HeadConfig(_Strict):
    # Aggregation of projected token/region features into the embedding:
    # "gpo" (VSE-infinity generalized pooling), "mean", "max" (masked), or
    # "set" (DivE set prediction: K slot embeddings per item).
    pooling: Literal["gpo", "mean", "max", "set"] = "gpo"
    # VSE-infinity projection: fc(x) + MLP(x) with a 2-layer MLP residual; False = fc only.
    mlp_residual: bool = True
    # Hidden width of the residual MLP; None = embed_dim // 2 (as VSE-infinity).
    mlp_hidden: int | None = None
    # Set prediction ("set" pooling): number of slots K, slot-attention depth and heads.
    num_slots: int = 4
    depth: int = 4
    heads: int = 4
    # Width of the set module's feed-forward, as a multiple of embed_dim (DivE: 4). Its cost
    # dominates a set step (every caption's K slots pass it `depth` times), so 1 is ~3x cheaper.
    set_ff_mult: int = Field(4, ge=1)
    # Global feature handed to the set module alongside the tokens (DivE uses a pooled vector).
    set_global: Literal["gpo", "mean"] = "gpo"
    # GPO positional-encoding size and GRU hidden size.
    gpo_d_pe: int = 32
    gpo_d_hidden: int = 32
    # Initial GPO weights: "random" (PyTorch's GRU init: near-uniform rank weights, i.e. close
    # to mean pooling, as VSE-infinity) or "max" (training first fits the weight generator so
    # that every length 1..L pools like max: `gpo_init_rank0` on rank 0, the rest spread evenly;
    # models.gpo.fit_max_pooling). Only training reads it; loading a checkpoint ignores it.
    gpo_init: Literal["random", "max"] = "random"
    gpo_init_rank0: float = Field(0.99, gt=0.0, le=1.0)


class SimilarityConfig(_Strict):
    # "cosine" for single-vector models, "smooth_chamfer" for set models.
    kind: Literal["cosine", "smooth_chamfer"] = "cosine"
    # Smooth-Chamfer inverse temperature (ignored by cosine).
    temperature: float = 16.0


VideoPooling = Literal["mean", "gpo"]


class VideoConfig(_Strict):
    # How per-frame embeddings are pooled over the valid frames of a clip (and of each video
    # segment): "mean", or "gpo" (a GPO over the time axis, trained on synthetic clips by
    # `xmodal video train`; its weights are the model's `video_pool.*` tensors).
    pooling: VideoPooling = "mean"
    # Frames per clip at most; longer frame lists are subsampled uniformly.
    max_frames: int = 32


class ModelConfig(_Strict):
    # Registry name of the model (file stem of models/configs/<name>.json).
    name: str
    # Dimension D of the joint embedding space.
    embed_dim: int = 1024
    image: ImageTowerConfig = ImageTowerConfig()
    text: TextTowerConfig = TextTowerConfig()
    head: HeadConfig = HeadConfig()
    similarity: SimilarityConfig = SimilarityConfig()
    video: VideoConfig = VideoConfig()
    # Seed for the random initialisation of the head (and of random towers): the same
    # config builds the same untrained model in every process.
    seed: int = 0

    def to_json(self, indent: int | None = None) -> str:
        """Serialise to a JSON string (what checkpoints store in their metadata)."""
        return json.dumps(self.model_dump(mode="json"), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Parse a JSON string produced by `to_json` (or a config file's contents)."""
        return cls.model_validate(json.loads(text))

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read a config from a JSON file."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def save(self, path: str | Path) -> None:
        """Write the config as indented JSON."""
        Path(path).write_text(self.to_json(indent=2) + "\n", encoding="utf-8")
