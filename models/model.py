"""XModal: two backbones, a VSE-infinity projection and a pooling head per modality.

    image pixels -> backbone grid [B,N,C] -> projection [B,N,D] -> pool -> L2 norm -> [B,D]
    text tokens  -> backbone tokens [B,L,C] -> projection [B,L,D] -> pool -> L2 norm -> [B,D]
    video frames -> image path per valid frame -> pool over frames -> L2 norm -> [B,D]

Pooling is GPO (VSE-infinity), masked mean or max, or DivE's set prediction (K unit vectors per
item, `[B,K,D]`, compared with Smooth-Chamfer). The head-only paths `embed_*_features` take
cached backbone features, which is how training runs on CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from PIL import Image
from torch import Tensor, nn

from models.backbones import (
    ImageBackbone,
    TextBackbone,
    build_image_backbone,
    build_text_backbone,
    full_lengths,
)
from models.config import HeadConfig, ModelConfig, VideoPooling
from models.gpo import GPO, init_mean_pooling, length_mask
from models.set_embedding import SetPredictionModule
from models.similarity import cosine, smooth_chamfer

logger = logging.getLogger(__name__)

__all__ = ["BACKBONE_PREFIXES", "MaskedPool", "Projection", "SetHead", "XModal", "frame_picks"]


class EncoderRuntime(Protocol):
    """A faster inference engine for the full encoders (`models.runtime`): same inputs and
    outputs as `XModal.encode_image` / `encode_text` with normalisation, CPU tensors."""

    def encode_image(self, pixels: Tensor) -> Tensor: ...

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...


# State-dict prefixes of the backbones; everything else is the (trained) head.
BACKBONE_PREFIXES = ("image_backbone.", "text_backbone.")


class Projection(nn.Module):
    """VSE-infinity projection of backbone features: `fc(x) + mlp(x)` (residual 2-layer MLP).

    VSE-infinity's MLP uses BatchNorm1d over all tokens; LayerNorm is used here instead so an
    embedding never depends on the other items (or the padding) of its batch.
    """

    def __init__(self, d_in: int, d_out: int, mlp_residual: bool, d_hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.mlp = (
            nn.Sequential(
                nn.Linear(d_in, d_hidden),
                nn.LayerNorm(d_hidden),
                nn.ReLU(inplace=True),
                nn.Linear(d_hidden, d_out),
            )
            if mlp_residual
            else None
        )
        # Xavier-uniform fc, zero bias, as VSE-infinity's `init_weights`.
        bound = math.sqrt(6.0) / math.sqrt(d_in + d_out)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(x)
        if self.mlp is not None:
            out = out + self.mlp(x)
        return out


class MaskedPool(nn.Module):
    """Mean or max over the valid positions: `[B,N,D], lengths [B] -> [B,D]`."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in ("mean", "max"):
            raise ValueError(f"unknown masked pooling {kind!r}")
        self.kind = kind

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        mask = length_mask(lengths, x.shape[1]).unsqueeze(-1)  # [B, N, 1]
        if self.kind == "max":
            return x.masked_fill(~mask, torch.finfo(x.dtype).min).amax(dim=1)
        summed = x.masked_fill(~mask, 0.0).sum(dim=1)
        return summed / lengths.clamp(min=1).unsqueeze(-1).to(x.dtype)


class GPOPool(nn.Module):
    """GPO pooling that returns only the pooled vectors."""

    def __init__(self, head: HeadConfig) -> None:
        super().__init__()
        self.gpo = GPO(d_pe=head.gpo_d_pe, d_hidden=head.gpo_d_hidden)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        pooled, _ = self.gpo(x, lengths)
        return pooled


class SetHead(nn.Module):
    """DivE set prediction: K slot vectors from the tokens, plus a pooled global feature."""

    def __init__(self, d_model: int, head: HeadConfig, pos_enc: bool) -> None:
        super().__init__()
        self.set = SetPredictionModule(
            d_model,
            num_slots=head.num_slots,
            depth=head.depth,
            heads=head.heads,
            d_ff=head.set_ff_mult * d_model,
            pos_enc=pos_enc,
        )
        self.global_pool: nn.Module = (
            GPOPool(head) if head.set_global == "gpo" else MaskedPool("mean")
        )

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        return self.set(x, lengths, self.global_pool(x, lengths))  # [B, K, D], unit vectors


def _build_pool(head: HeadConfig, d_model: int, pos_enc: bool) -> nn.Module:
    if head.pooling == "gpo":
        return GPOPool(head)
    if head.pooling == "set":
        return SetHead(d_model, head, pos_enc=pos_enc)
    return MaskedPool(head.pooling)


def frame_picks(n: int, max_frames: int) -> np.ndarray:
    """Indices of the frames a clip of ``n`` frames keeps: all of them up to ``max_frames``,
    else ``max_frames`` spread uniformly (first and last included)."""
    if n <= max_frames:
        return np.arange(n)
    return np.linspace(0, n - 1, max_frames).round().astype(np.int64)


def _mean_video_gpo(head: HeadConfig) -> GPOPool:
    """A video GPO (over the time axis) that pools exactly like the mean until trained."""
    pool = GPOPool(head)
    init_mean_pooling(pool.gpo)
    return pool


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    if not was_training:  # serving (`.eval()` once): toggling walks every submodule twice per
        yield  # call, which cost more than the ONNX text encode itself
        return
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class XModal(nn.Module):
    """Cross-modal embedding model (see docs/ARCHITECTURE.md, `models.model.XModal`).

    Args:
        config: the architecture.
        pretrained: load backbone weights from their packages / local checkpoints;
            False builds random backbones (fast, for tests).
        image_pretrained, text_pretrained: per-tower override of `pretrained` (used by
            `load_checkpoint` when a checkpoint carries a tower's weights itself).
    """

    def __init__(
        self,
        config: ModelConfig,
        pretrained: bool = True,
        *,
        image_pretrained: bool | None = None,
        text_pretrained: bool | None = None,
    ) -> None:
        super().__init__()
        head = config.head
        if (head.pooling == "set") != (config.similarity.kind == "smooth_chamfer"):
            raise ValueError(
                f"{config.name}: pooling={head.pooling!r} needs similarity "
                f"{'smooth_chamfer' if head.pooling == 'set' else 'cosine'!r}, "
                f"got {config.similarity.kind!r}"
            )
        self.config = config
        self.name = config.name
        self.embed_dim = config.embed_dim
        self.is_set_model = head.pooling == "set"
        self.num_vectors = head.num_slots if self.is_set_model else 1
        self.checkpoint_extra: dict[str, Any] = {}  # extras of the checkpoint it came from
        # Serving engine for embed_* (models.runtime.enable_onnx); None = eager PyTorch.
        self.runtime: EncoderRuntime | None = None
        d = config.embed_dim
        d_hidden = head.mlp_hidden or d // 2

        # Same config -> same untrained model in every process (random towers included).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.image_backbone: ImageBackbone = build_image_backbone(
                config.image, pretrained if image_pretrained is None else image_pretrained
            )
            self.text_backbone: TextBackbone = build_text_backbone(
                config.text, pretrained if text_pretrained is None else text_pretrained
            )
            self.image_proj = Projection(config.image.feature_dim, d, head.mlp_residual, d_hidden)
            self.text_proj = Projection(config.text.feature_dim, d, head.mlp_residual, d_hidden)
            self.image_pool = _build_pool(head, d, pos_enc=False)
            self.text_pool = _build_pool(head, d, pos_enc=True)  # DivE encodes text positions
            # Video GPO over the time axis; untrained it pools exactly like the mean
            # (`init_mean_pooling`), so a fresh one is never worse than mean pooling.
            self.video_pool: GPOPool | None = (
                _mean_video_gpo(head) if config.video.pooling == "gpo" else None
            )

    # -- inputs -------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images -> normalised pixels `[B,3,H,W]` (CPU float32)."""
        return self.image_backbone.preprocess(images)

    def fit_image(self, image: Image.Image) -> Image.Image:
        """One PIL image -> RGB at the image tower's input size (what `preprocess` resizes to;
        a fitted image passes `preprocess` unchanged, so this can run ahead of encoding)."""
        return self.image_backbone.fit(image)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Texts -> `{"input_ids": [B,L], "attention_mask": [B,L]}` (CPU long)."""
        return self.text_backbone.tokenize(texts)

    @property
    def device(self) -> torch.device:
        return self.image_proj.fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_proj.fc.weight.dtype

    # -- head-only paths (cached backbone features) -------------------------------------------

    def _finish(self, pooled: Tensor, normalize: bool) -> Tensor:
        # Set heads already return unit vectors; single vectors are normalised on request.
        if normalize and not self.is_set_model:
            return F.normalize(pooled, dim=-1)
        return pooled

    def image_top(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Cached trunk features -> backbone grid features: runs the tuned top layers of the
        image backbone (`tune_blocks`); identity for a frozen tower."""
        backbone = self.image_backbone
        if not backbone.tuned_prefixes():
            return feats, lengths
        grid = backbone.top(feats.to(self.device, self.dtype))
        return grid, full_lengths(grid)

    def embed_image_features(
        self, feats: Tensor, lengths: Tensor, normalize: bool = True
    ) -> Tensor:
        """Backbone grid features `[B,N,C]`, lengths `[B]` -> `[B,D]` or `[B,K,D]`."""
        x = self.image_proj(feats.to(self.dtype))  # [B, N, D]
        return self._finish(self.image_pool(x, lengths.to(x.device)), normalize)

    def embed_image_cache(self, feats: Tensor, lengths: Tensor, normalize: bool = True) -> Tensor:
        """Cached image features (the backbone trunk's output, see `features.py`) ->
        `[B,D]` or `[B,K,D]`: `image_top`, then `embed_image_features`."""
        return self.embed_image_features(*self.image_top(feats, lengths), normalize=normalize)

    def embed_text_features(self, feats: Tensor, lengths: Tensor, normalize: bool = True) -> Tensor:
        """Backbone token features `[B,L,C]`, lengths `[B]` -> `[B,D]` or `[B,K,D]`."""
        x = self.text_proj(feats.to(self.dtype))  # [B, L, D]
        return self._finish(self.text_pool(x, lengths.to(x.device)), normalize)

    def text_top(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Cached trunk token features -> backbone token features: runs the tuned top layers
        of the text backbone (`tune_layers`); identity for a frozen tower."""
        backbone = self.text_backbone
        if not backbone.tuned_prefixes():
            return feats, lengths
        lengths = lengths.to(self.device)
        return backbone.top(feats.to(self.device, self.dtype), lengths), lengths

    def embed_text_cache(self, feats: Tensor, lengths: Tensor, normalize: bool = True) -> Tensor:
        """Cached text features (the trunk's output) -> `[B,D]` or `[B,K,D]`."""
        return self.embed_text_features(*self.text_top(feats, lengths), normalize=normalize)

    # -- full encoders ------------------------------------------------------------------------

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """Pixels `[B,3,H,W]` (from `preprocess`) -> `[B,D]` or `[B,K,D]`."""
        backbone = self.image_backbone
        with torch.set_grad_enabled(torch.is_grad_enabled() and backbone.trainable):
            feats, lengths = backbone(pixels.to(self.device, self.dtype))
        return self.embed_image_features(feats, lengths, normalize)

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor, normalize: bool = True
    ) -> Tensor:
        """Token ids and mask `[B,L]` (from `tokenize`) -> `[B,D]` or `[B,K,D]`."""
        backbone = self.text_backbone
        with torch.set_grad_enabled(torch.is_grad_enabled() and backbone.trainable):
            feats, lengths = backbone(input_ids.to(self.device), attention_mask.to(self.device))
        return self.embed_text_features(feats, lengths, normalize)

    def set_video_pooling(self, pooling: VideoPooling) -> None:
        """Choose how frames are pooled from now on (``config.video.pooling`` follows).

        ``"mean"`` always works (a trained video GPO is dropped); ``"gpo"`` needs the model
        to have one already (its config says ``video.pooling: "gpo"``, so its checkpoint
        carries the trained weights).

        Raises:
            ValueError: ``"gpo"`` asked of a model without a video GPO.
        """
        if pooling == self.config.video.pooling:
            return
        if pooling == "gpo":
            raise ValueError(
                f"model {self.name!r} has no trained video GPO (its config says video.pooling "
                "'mean'); train one with `xmodal video train`, or use 'mean'"
            )
        video = self.config.video.model_copy(update={"pooling": pooling})
        self.config = self.config.model_copy(update={"video": video})
        self.video_pool = None

    def new_video_gpo(self) -> None:
        """Give the model a fresh video GPO at mean pooling (``video.pooling`` becomes
        ``"gpo"``), replacing any it had: where training a video GPO starts."""
        video = self.config.video.model_copy(update={"pooling": "gpo"})
        self.config = self.config.model_copy(update={"video": video})
        with torch.random.fork_rng(devices=[]):  # the same GRU init in every process
            torch.manual_seed(self.config.seed)
            pool = _mean_video_gpo(self.config.head)
        self.video_pool = pool.to(self.device, self.dtype)

    def pool_frames(
        self,
        frame_embs: Tensor,
        lengths: Tensor,
        normalize: bool = True,
        pooling: VideoPooling | None = None,
    ) -> Tensor:
        """Per-frame unit embeddings `[B,T,D]` (or `[B,T,K,D]`) -> clip embeddings `[B,D]`
        (or `[B,K,D]`), pooled over the first `lengths[b]` frames.

        ``pooling`` overrides ``config.video.pooling`` for this call (``"mean"`` on a GPO
        model compares the two over the same frame embeddings)."""
        b, t = frame_embs.shape[:2]
        lengths = lengths.to(frame_embs.device)
        pooling = pooling or self.config.video.pooling
        gpo = self.video_pool
        if pooling == "gpo" and gpo is None:
            raise ValueError(f"model {self.name!r} has no video GPO: use pooling 'mean'")
        if pooling == "mean" or gpo is None:  # masked mean over frames (slot-wise for sets)
            mask = length_mask(lengths, t).to(frame_embs.dtype)  # [B, T]
            mask = mask.view(b, t, *([1] * (frame_embs.dim() - 2)))
            denom = (
                lengths.clamp(min=1).to(frame_embs.dtype).view(b, *([1] * (frame_embs.dim() - 2)))
            )
            pooled = (frame_embs * mask).sum(dim=1) / denom
        elif self.is_set_model:  # GPO per slot over time
            k = frame_embs.shape[2]
            flat = rearrange(frame_embs, "b t k d -> (b k) t d")
            pooled = gpo(flat, repeat(lengths, "b -> (b k)", k=k))
            pooled = rearrange(pooled, "(b k) d -> b k d", b=b)
        else:
            pooled = gpo(frame_embs, lengths)
        if normalize or self.is_set_model:
            pooled = F.normalize(pooled, dim=-1)
        return pooled

    def encode_video(self, frames: Tensor, lengths: Tensor, normalize: bool = True) -> Tensor:
        """Frames `[B,T,3,H,W]` with `lengths [B]` valid frames -> `[B,D]` or `[B,K,D]`.

        Only valid frames run through the image path; their unit embeddings are pooled
        (`config.video.pooling`: mean by default, or GPO).
        """
        b, t = frames.shape[:2]
        lengths = lengths.to(self.device)
        mask = length_mask(lengths, t)  # [B, T]
        per_frame = self.encode_image(frames.to(self.device)[mask], normalize=True)
        frame_embs = per_frame.new_zeros(b, t, *per_frame.shape[1:])
        frame_embs[mask] = per_frame
        return self.pool_frames(frame_embs, lengths, normalize)

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        """`[N,D] x [M,D]` cosine, or `[N,K,D] x [M,K,D]` Smooth-Chamfer -> `[N,M]`."""
        if self.is_set_model:
            return smooth_chamfer(a, b, temperature=self.config.similarity.temperature)
        return cosine(a, b)

    # -- numpy convenience (serving) ----------------------------------------------------------

    def _empty(self) -> np.ndarray:
        shape = (0, self.num_vectors, self.embed_dim) if self.is_set_model else (0, self.embed_dim)
        return np.zeros(shape, dtype=np.float32)

    def _fast(self) -> EncoderRuntime | None:
        # The runtime serves CPU inference only; a model moved to a GPU encodes eagerly.
        return self.runtime if self.device.type == "cpu" else None

    def _infer_image(self, pixels: Tensor) -> Tensor:
        fast = self._fast()
        return fast.encode_image(pixels) if fast is not None else self.encode_image(pixels)

    def _infer_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        fast = self._fast()
        if fast is not None:
            return fast.encode_text(input_ids, attention_mask)
        return self.encode_text(input_ids, attention_mask)

    @staticmethod
    def _numpy(x: Tensor) -> np.ndarray:
        return np.ascontiguousarray(x.detach().float().cpu().numpy())

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """PIL images -> float32 unit embeddings `[n,D]` (or `[n,K,D]`), batched, no grad."""
        if not images:
            return self._empty()
        out = []
        with _eval_mode(self):
            for i in range(0, len(images), batch_size):
                out.append(
                    self._numpy(self._infer_image(self.preprocess(images[i : i + batch_size])))
                )
        return np.concatenate(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """Texts -> float32 unit embeddings `[n,D]` (or `[n,K,D]`), batched, no grad.

        Texts are batched by length (less padding); the output keeps the input order.
        """
        if not texts:
            return self._empty()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), *self._empty().shape[1:]), dtype=np.float32)
        with _eval_mode(self):
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                batch = self.tokenize([texts[j] for j in idx])
                out[idx] = self._numpy(
                    self._infer_text(batch["input_ids"], batch["attention_mask"])
                )
        return out

    @torch.no_grad()
    def embed_video_frames(self, frames: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """The frames of one clip (or segment) -> float32 `[1,D]` (or `[1,K,D]`).

        More than `config.video.max_frames` frames are subsampled uniformly.
        """
        if not frames:
            raise ValueError("embed_video_frames needs at least one frame")
        frames = [frames[i] for i in frame_picks(len(frames), self.config.video.max_frames)]
        with _eval_mode(self):
            per_frame = torch.cat(
                [
                    self._infer_image(self.preprocess(frames[i : i + batch_size]))
                    for i in range(0, len(frames), batch_size)
                ]
            )  # [T, D] or [T, K, D]
            per_frame = per_frame.to(self.device, self.dtype)
            lengths = torch.tensor([len(frames)], device=per_frame.device)
            return self._numpy(self.pool_frames(per_frame.unsqueeze(0), lengths))

    @torch.no_grad()
    def embed_segments(
        self, segments: Sequence[Sequence[Image.Image]], batch_size: int = 32
    ) -> np.ndarray:
        """The frames of each video segment -> float32 ``[S,D]``: one vector per segment.

        Every frame of every segment goes through the image path in one batch
        (:meth:`embed_images`), then :meth:`pool_frames` pools each segment over its own
        frames (``config.video.pooling``). Single-vector models only; a set model embeds a
        whole clip with :meth:`embed_video_frames`.
        """
        if self.is_set_model:
            raise ValueError("embed_segments is for single-vector models (set: embed_video_frames)")
        if not segments or any(len(s) == 0 for s in segments):
            raise ValueError("embed_segments needs at least one frame per segment")
        frames = [f for s in segments for f in s]
        per_frame = torch.from_numpy(self.embed_images(frames, batch_size))  # [F, D]
        t = max(len(s) for s in segments)
        padded = per_frame.new_zeros(len(segments), t, per_frame.shape[-1])
        lengths = torch.tensor([len(s) for s in segments])
        start = 0
        for i, s in enumerate(segments):
            padded[i, : len(s)] = per_frame[start : start + len(s)]
            start += len(s)
        with _eval_mode(self):
            pooled = self.pool_frames(padded.to(self.device), lengths.to(self.device))
        return np.ascontiguousarray(pooled.float().cpu().numpy(), dtype=np.float32)

    # -- checkpoint helpers -------------------------------------------------------------------

    def head_state_dict(self, include_backbones: Sequence[str] = ()) -> dict[str, Tensor]:
        """State dict without the backbone weights, except the listed backbone prefixes
        (e.g. `("image_backbone.",)` for a fine-tuned or randomly initialised tower), plus the
        tuned top layers of either backbone (`tune_blocks`, `tune_layers`)."""
        keep = (
            *include_backbones,
            *(f"image_backbone.{p}" for p in self.image_backbone.tuned_prefixes()),
            *(f"text_backbone.{p}" for p in self.text_backbone.tuned_prefixes()),
        )
        return {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith(BACKBONE_PREFIXES) or k.startswith(keep)
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}, num_vectors={self.num_vectors}"
