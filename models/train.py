"""Train the embedding heads on cached frozen-backbone features (VSE-infinity recipe).

Reads top to bottom (as nanoGPT's ``train.py``): build the data (feature caches, extracted on
first use), build the model from its named config, then a loop of

    batch -> size augmentation -> embed -> similarity -> triplet loss (+ set regularisers)
    -> AdamW step with gradient clipping -> progress bar (loss, pairs/s)

with a dev evaluation after every epoch. That loop is written once (``_fit``); ``train``
(cached features) and ``train_finetune`` (raw images through the backbones) only say how a
batch is drawn, embedded and scored (a ``_Run``), and the hinge is ``models.losses.hinge``. The
first ``warmup_epochs`` sum over every violating negative (VSE0), later epochs keep the hardest
negative (VSE++); the learning rate drops by ``lr_decay`` at ``lr_decay_epoch``. Every epoch
writes ``last.safetensors`` (+ the optimiser state in ``train_state.pt`` for ``resume``),
``best.safetensors`` when dev RSUM improved, ``history.json`` and ``curves.png`` (loss and dev
RSUM) into ``out_dir``. Checkpoints carry the model config, so they reload with no flags.

Size augmentation (VSE-infinity): each training image keeps a random ~80% of its grid
features, each caption a random ~80% of its token features. VSE-infinity masks / replaces /
deletes word pieces before BERT; on cached token features only deletion is possible, so we
drop token features, as its reference code does for pre-extracted region features.

Optional adaptive negatives (VSE-ens): besides the in-batch negatives, each query gets
negatives drawn from a memory bank of recent embeddings with a rank-aware distribution
(``models.sampling.AdaptiveNegativeSampler``); they are re-embedded with the current heads.

``finetune_backbone=True`` trains through the backbones on raw images and captions (GPU
machines); the default trains the heads only on cached features (CPU, minutes).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from tqdm import tqdm

from models.data import CaptionDataset, load_dataset
from models.evaluate import evaluate
from models.features import (
    CachedFeatures,
    extract_image_features,
    extract_text_features,
    image_cache_dir,
    load_features,
    load_image,
    load_mirrored_image,
    text_cache_dir,
)
from models.losses import hinge, mmd_loss, uniformity_loss

__all__ = ["TrainConfig", "drop_features", "flip_some", "load_split_features", "train"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


class TrainConfig(BaseModel):
    """Everything one training run needs; saved as ``train_config.json`` next to the weights."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # Registry name of the model config (models/configs/<name>.json).
    model: str = "effnet-lite0-minilm-gpo"
    # Deep-merged into that config, e.g. {"image": {"image_size": 300}}; the checkpoint
    # carries the merged config.
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    # Dataset folder (captions.jsonl + images/, or a Karpathy JSON) and split names.
    data: Path = REPO.parent / "shared" / "data" / "flickr8k"
    train_split: str = "train"
    dev_split: str = "dev"
    # Use only the first N images of each split (quick runs, tests); None = all.
    max_images: int | None = None
    # Where feature caches and run outputs go.
    cache_dir: Path = REPO / ".cache" / "features"
    out_dir: Path = REPO / "runs" / "default"
    # Optimisation (VSE-infinity: AdamW 5e-4, decay x0.1, clip 2, margin 0.2).
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = 5e-4
    weight_decay: float = 1e-4
    grad_clip: float = 2.0
    margin: float = 0.2
    warmup_epochs: int = 1  # epochs summing all violating negatives before hardest-only
    lr_decay_epoch: int | None = None  # None = after 2/3 of the epochs
    lr_decay: float = 0.1
    # "one_per_image": an epoch visits every image once with one random caption (no duplicate
    # images in a batch); "all": an epoch visits every caption (VSE-infinity), batch_size
    # pairs a step; "grouped": every caption too, but a step takes batch_size images with all
    # of their captions, so each image is embedded once per epoch instead of once per caption
    # (about 3x less compute per epoch on Flickr8k, where the image projection dominates).
    epoch_mode: Literal["one_per_image", "all", "grouped"] = "one_per_image"
    # Size augmentation: fraction of grid / token features dropped per training item.
    image_drop: float = Field(0.2, ge=0.0, lt=1.0)
    token_drop: float = Field(0.2, ge=0.0, lt=1.0)
    # Flip augmentation: probability that a training photo is replaced by its mirror image
    # (the trunk features of the flipped photo, cached once beside the plain ones; the tuned
    # top and the heads see real mirrored inputs). 0 = off (no mirrored cache is extracted).
    image_flip: float = Field(0.0, ge=0.0, le=1.0)
    # Set models (DivE): weights of the MMD and uniformity regularisers.
    mmd_weight: float = 0.01
    unif_weight: float = 0.01
    # MMD over at most this many slot vectors per modality, drawn at random each step
    # (the same estimate of the same discrepancy, from a sample); None = every slot of the
    # batch (a grouped batch of 128 photos: 512 image slots against 2,560 caption slots).
    mmd_samples: int | None = Field(None, ge=2)
    # Negatives: in-batch hardest, or in-batch + adaptive rank-aware negatives from a bank.
    sampler: Literal["in_batch", "adaptive"] = "in_batch"
    # Bank capacity per modality; None = one slot for every training item (the paper's
    # catalogue). Items keep one slot each, overwritten by their newer embeddings.
    sampler_bank_size: int | None = None
    # Queries between refreshes of the rank tables; None = the paper's (|A|-1) ln(|A|-1).
    sampler_refresh_every: int | None = None
    sampler_lambda: float = 64.0  # p(rank r) ~ exp(-r / lambda)
    sampler_negatives: int = 1  # adaptive negatives per query
    # Stop an epoch-bounded run early once this many seconds have passed (None = no limit).
    time_budget_s: float | None = None
    # Stop when dev RSUM reaches this value (convergence timing); None = run all epochs.
    target_rsum: float | None = None
    # Full fine-tuning through the backbones on raw images/captions (GPU); False = cached.
    finetune_backbone: bool = False
    # Backbone LR = lr * scale when fine-tuning (full, or a tuned top: tune_blocks, tune_layers).
    backbone_lr_scale: float = 0.1
    # GPO weight generators (the GRU + scorer of every GPO pool) learn at lr * gpo_lr_scale
    # and are held still (lr 0) for the first gpo_freeze_epochs epochs, so the heads first
    # learn under the pooling GPO starts from (max pooling with `head.gpo_init: "max"`).
    gpo_lr_scale: float = Field(1.0, ge=0.0)
    gpo_freeze_epochs: int = Field(0, ge=0)
    # Warm start: copy the matching weights of this checkpoint before training (see
    # `init_from_checkpoint`; e.g. a set model from the shipped GPO model). None = fresh heads.
    init_from: Path | None = None
    # Continue from out_dir/last.safetensors + train_state.pt when present.
    resume: bool = False
    eval_batch_size: int = 512
    device: str = "cpu"
    seed: int = 0
    num_threads: int | None = None  # torch CPU threads; None = torch default
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# data


def load_split_features(
    ds: CaptionDataset,
    model_cfg: Any,
    cache_dir: Path,
    device: str = "cpu",
    progress: bool = True,
    mirrored: bool = False,
) -> CachedFeatures:
    """Cached backbone features of ``ds`` for ``model_cfg``'s towers (extracted on first use).

    With ``mirrored`` the image features are those of the horizontally flipped photos.
    """
    from models.backbones import build_image_backbone, build_text_backbone

    icfg = model_cfg.image
    img_dir = image_cache_dir(
        cache_dir, ds, icfg.backbone, icfg.image_size, icfg.mean, icfg.std, icfg.tune_blocks,
        mirrored,
    )  # fmt: skip
    tcfg = model_cfg.text
    txt_dir = text_cache_dir(cache_dir, ds, tcfg.backbone, tcfg.max_length, tcfg.tune_layers)
    if not (img_dir / "meta.json").exists():
        backbone = build_image_backbone(icfg).to(device).eval()
        # The cache holds what the frozen trunk gives (the grid itself when nothing is tuned).
        trunk = TrunkView(backbone)
        loader = load_mirrored_image if mirrored else load_image
        extract_image_features(
            trunk, ds.images, img_dir, device=device, loader=loader, progress=progress
        )
        del backbone, trunk
    if not (txt_dir / "meta.json").exists():
        tbackbone = build_text_backbone(tcfg).to(device).eval()
        ttrunk = TextTrunkView(tbackbone)
        extract_text_features(ttrunk, ds.captions, txt_dir, device=device, progress=progress)
        del tbackbone, ttrunk
    return load_features(img_dir, txt_dir, ds.caption_to_image)


class TrunkView:
    """An image backbone seen through its frozen trunk (what the feature cache stores)."""

    def __init__(self, backbone: Any) -> None:
        self.backbone = backbone

    def preprocess(self, images: list[Any]) -> Tensor:
        return self.backbone.preprocess(images)  # type: ignore[no-any-return]

    def __call__(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        from models.backbones import full_lengths

        feats = self.backbone.trunk(pixels)
        return feats, full_lengths(feats)


class TextTrunkView:
    """A text backbone seen through its frozen trunk (what the feature cache stores)."""

    def __init__(self, backbone: Any) -> None:
        self.backbone = backbone

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        return self.backbone.tokenize(texts)  # type: ignore[no-any-return]

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.backbone.trunk(input_ids, attention_mask)
        return feats, attention_mask.sum(dim=1).long()


def drop_features(
    feats: Tensor, lengths: Tensor, p: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Randomly drop a fraction ``p`` of the valid positions of each item (size augmentation).

    Kept positions move to the front in their original order, padding is zeroed and the new
    lengths returned; every item keeps at least one position.
    """
    if p <= 0:
        return feats, lengths
    b, n, _ = feats.shape
    pos = torch.arange(n, device=feats.device)[None, :]
    valid = pos < lengths[:, None]  # [b, n]
    rand = torch.rand(b, n, generator=generator).to(feats.device)
    keep = valid & (rand >= p)
    # Never drop everything: keep the first position of items that lost all of theirs.
    keep[:, 0] |= ~keep.any(dim=1)
    # Stable sort puts kept positions first (in order), then the rest.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # [b, n]
    out = torch.gather(feats, 1, order[:, :, None].expand_as(feats))
    new_len = keep.sum(dim=1)
    out = out * (pos < new_len[:, None])[:, :, None].to(out.dtype)
    width = int(new_len.max())
    return out[:, :width], new_len


def flip_some(
    feats: Tensor, mirrored: Tensor, p: float, generator: torch.Generator | None = None
) -> Tensor:
    """Each item of ``feats`` replaced by its ``mirrored`` row with probability ``p``
    (flip augmentation on cached features: both ``[b, N, C]``, rows aligned)."""
    if p <= 0:
        return feats
    pick = torch.rand(feats.shape[0], generator=generator) < p
    return torch.where(pick[:, None, None].to(feats.device), mirrored, feats)


def _epoch_batches(
    feats: CachedFeatures, cfg: TrainConfig, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image indices, caption indices) per batch for one epoch."""
    c2i = feats.caption_to_image
    if cfg.epoch_mode == "grouped":
        by_image = np.argsort(c2i, kind="stable")
        starts = np.searchsorted(c2i[by_image], np.arange(feats.num_images + 1), side="left")
        images = rng.permutation(feats.num_images)
        grouped = []
        for lo in range(0, max(len(images) - cfg.batch_size + 1, 1), cfg.batch_size):
            img = images[lo : lo + cfg.batch_size]
            cap = np.concatenate([by_image[starts[i] : starts[i + 1]] for i in img])
            grouped.append((c2i[cap], cap))
        return grouped
    if cfg.epoch_mode == "all":
        caps = rng.permutation(len(c2i))
    else:
        # One random caption per image.
        starts = np.searchsorted(c2i, np.arange(feats.num_images), side="left")
        counts = np.bincount(c2i, minlength=feats.num_images)
        if np.all(np.diff(c2i) >= 0):
            caps = starts + (rng.random(feats.num_images) * counts).astype(np.int64)
        else:  # captions not grouped by image
            groups = [np.flatnonzero(c2i == i) for i in range(feats.num_images)]
            caps = np.array([rng.choice(g) for g in groups])
        caps = caps[rng.permutation(len(caps))]
    batches = []
    for lo in range(0, len(caps) - cfg.batch_size + 1, cfg.batch_size):  # drop the last partial
        cap = caps[lo : lo + cfg.batch_size]
        batches.append((c2i[cap], cap))
    if not batches:  # fewer pairs than one batch: one smaller batch
        batches.append((c2i[caps], caps))
    return batches


# ---------------------------------------------------------------------------------------------
# model, loss, schedule


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def model_config_for(cfg: TrainConfig) -> Any:
    """The named model config with ``cfg.model_overrides`` merged in (validated)."""
    from models.config import ModelConfig
    from models.factory import get_model_config

    base = get_model_config(cfg.model).model_dump(mode="json")
    return ModelConfig.model_validate(_merge(base, cfg.model_overrides))


def _build_model(cfg: TrainConfig) -> Any:
    from models.model import XModal

    # Fresh heads (never the shipped weights); backbones from their packages, so that
    # checkpoints leave them out.
    return XModal(model_config_for(cfg), pretrained=True).to(cfg.device)


def _is_gpo(name: str) -> bool:
    """True for the parameters of a GPO weight generator (``...gpo.gru.*``, ``...gpo.linear.*``)."""
    return ".gpo." in f".{name}"


def _max_length(feats: CachedFeatures) -> int:
    """Longest set GPO will pool in this data: the image grid or the longest caption."""
    longest_caption = int(np.diff(feats.text_offsets).max())
    return max(int(feats.image_feats.shape[1]), longest_caption)


def warm_start_gpo(model: Any, max_len: int) -> list[dict[str, float]]:
    """Fit every GPO pool of ``model`` to max pooling when its config says ``gpo_init: max``.

    Lengths ``1..max_len`` are fitted (models.gpo.fit_max_pooling); returns one fit report
    per GPO module (empty when the config keeps the random initialisation).
    """
    from models.gpo import GPO, fit_max_pooling

    head = model.config.head
    if head.gpo_init != "max":
        return []
    reports = []
    for name, module in model.named_modules():
        if isinstance(module, GPO):
            report = fit_max_pooling(module, max_len, rank0_weight=head.gpo_init_rank0)
            logger.info(
                "GPO warm start %s: max pooling over lengths 1..%d, min rank-0 weight %.4f "
                "after %d steps", name, max_len, report["min_rank0"], int(report["steps"]),
            )  # fmt: skip
            reports.append(report)
    return reports


def _warm_start_key(name: str) -> str:
    """A single-vector checkpoint's GPO (``<tower>_pool.gpo.*``) is a set model's global pool
    (``<tower>_pool.global_pool.gpo.*``); every other name maps to itself."""
    for tower in ("image_pool.", "text_pool."):
        if name.startswith(tower + "gpo."):
            return tower + "global_pool." + name[len(tower) :]
    return name


def init_from_checkpoint(model: Any, path: Path) -> dict[str, int]:
    """Copy the weights of checkpoint ``path`` into ``model`` where name and shape match.

    Names are read through `_warm_start_key`, so a set model starts from a GPO model's tuned
    blocks, projections and GPO (as its global feature). For a set model the slot path's
    output LayerNorm then gets zero gain and bias, so every slot starts as the layer-normed
    global feature: the set model starts at the single-vector model's embedding and learns
    its slots from there (the zero-initialised residual branch of ReZero / Fixup).

    Returns:
        ``{"copied", "skipped", "fresh"}``: tensors copied, checkpoint tensors with no match
        (other name or shape), and model tensors the checkpoint did not have.
    """
    from models.checkpoint import read_checkpoint
    from models.set_embedding import SetPredictionModule

    _, state, backbones, _ = read_checkpoint(path)
    own = model.head_state_dict(backbones)
    mapped = {_warm_start_key(k): v for k, v in state.items()}
    take = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(take, strict=False)
    if model.is_set_model:
        for module in model.modules():
            if isinstance(module, SetPredictionModule):
                nn.init.zeros_(module.norm_out.weight)
                nn.init.zeros_(module.norm_out.bias)
    report = {"copied": len(take), "skipped": len(state) - len(take), "fresh": len(own) - len(take)}
    logger.info("warm start from %s: %s", path, report)
    return report


def _loss(
    model: Any,
    img: Tensor,
    txt: Tensor,
    img_ids: Tensor,
    cfg: TrainConfig,
    hardest: bool,
    extra_txt: tuple[Tensor, Tensor] | None = None,
    extra_img: tuple[Tensor, Tensor] | None = None,
    owner: Tensor | None = None,
) -> dict[str, Tensor]:
    """Bidirectional triplet loss over a batch (+ extra negatives), set regularisers.

    Every caption ``txt[c]`` is a positive of the image row ``owner[c]`` (default: row ``c``,
    so ``img[i]`` and ``txt[i]`` are the pairs); ``img_ids`` are the dataset ids of the image
    rows, so a row holding the same image is never a negative. Each positive pair contributes
    one i2t term (its image against the other images' captions) and one t2i term (its caption
    against the other images). ``extra_txt`` / ``extra_img`` are (embeddings, image ids) of
    additional negative captions / images.
    """
    if owner is None:
        owner = torch.arange(txt.shape[0], device=img_ids.device)
    with torch.profiler.record_function("similarity"):
        sims = model.similarity(img, txt)  # [B, C], rows images, columns captions
    cols = torch.arange(txt.shape[0], device=sims.device)
    pos = sims[owner, cols]  # [C]
    cap_ids = img_ids[owner]  # [C] dataset image id of every caption
    same = img_ids[:, None] == cap_ids[None, :]  # [B, C]: positive pairs
    neg_i2t = sims.masked_fill(same, -math.inf)[owner]  # [C, C]: row = the caption's image
    neg_t2i = sims.t().masked_fill(same.t(), -math.inf)  # [C, B]
    if extra_txt is not None:
        e, ids = extra_txt
        s = model.similarity(img, e).masked_fill(img_ids[:, None] == ids[None, :], -math.inf)
        neg_i2t = torch.cat([neg_i2t, s[owner]], dim=1)
    if extra_img is not None:
        e, ids = extra_img
        s = model.similarity(e, txt).t()  # [C captions, U images]
        neg_t2i = torch.cat(
            [neg_t2i, s.masked_fill(cap_ids[:, None] == ids[None, :], -math.inf)], 1
        )
    parts = {
        "i2t": hinge(pos, neg_i2t, cfg.margin, hardest),
        "t2i": hinge(pos, neg_t2i, cfg.margin, hardest),
    }
    total = parts["i2t"] + parts["t2i"]
    if img.dim() == 3:  # set model: DivE regularisers
        if cfg.mmd_weight > 0:
            with torch.profiler.record_function("mmd"):
                parts["mmd"] = mmd_loss(img, txt, max_samples=cfg.mmd_samples)["loss"]
            total = total + cfg.mmd_weight * parts["mmd"]
        if cfg.unif_weight > 0:
            with torch.profiler.record_function("uniformity"):
                unif = uniformity_loss(img)["loss"] + uniformity_loss(txt)["loss"]
            parts["uniformity"] = unif
            total = total + cfg.unif_weight * unif
    parts["loss"] = total
    return parts


def _lr_at(epoch: int, cfg: TrainConfig) -> float:
    decay_at = cfg.lr_decay_epoch if cfg.lr_decay_epoch is not None else (2 * cfg.epochs) // 3
    return cfg.lr * (cfg.lr_decay if epoch >= max(decay_at, 1) else 1.0)


def _plot(history: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    if history["loss"]:
        steps, losses = zip(*history["loss"], strict=True)
        a.plot(steps, losses, lw=0.8)
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    if history["dev"]:
        secs = [d["seconds"] for d in history["dev"]]
        b.plot(secs, [d["rsum"] for d in history["dev"]], marker="o")
    b.set_xlabel("training seconds")
    b.set_ylabel("dev RSUM")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# training


def dataset_id(data: Path) -> str:
    """The identifier of the dataset at `data` that checkpoints record: the folder's name, or
    the file's stem for a Karpathy JSON (`.../flickr8k` -> "flickr8k")."""
    path = data if data.name else data.resolve()  # "." has no name of its own
    return path.stem if path.is_file() else path.name


def _optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: heads at ``lr``, backbone weights (a tuned top,
    or whole backbones when fine-tuning) at ``lr * backbone_lr_scale``."""
    backbone = [p for n, p in model.named_parameters() if "_backbone." in n and p.requires_grad]
    heads = [p for n, p in model.named_parameters() if "_backbone." not in n and p.requires_grad]
    gpo: list[Tensor] = []
    if cfg.gpo_lr_scale != 1.0 or cfg.gpo_freeze_epochs > 0:  # GPO's own group (else as heads)
        gpo = [p for n, p in model.named_parameters() if _is_gpo(n) and p.requires_grad]
        gpo_ids = {id(p) for p in gpo}
        heads = [p for p in heads if id(p) not in gpo_ids]
    groups: list[dict[str, Any]] = [{"params": heads, "scale": 1.0}]
    if backbone:
        groups.append({"params": backbone, "scale": cfg.backbone_lr_scale})
    if gpo:
        groups.append({"params": gpo, "scale": cfg.gpo_lr_scale, "gpo": True})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class _Run:
    """What a training run is made of; the one loop (:func:`_fit`) does the rest.

    ``batches()`` draws one epoch's batches, ``loss(batch, hardest)`` embeds a batch and
    returns the loss parts and how many pairs it held, ``evaluate()`` gives dev metrics.
    ``resumable`` runs also write ``last.safetensors`` + ``train_state.pt`` every epoch.
    """

    model: Any
    optimizer: torch.optim.Optimizer
    batches: Callable[[], list[Any]]
    loss: Callable[[Any, bool], tuple[dict[str, Tensor], int]]
    evaluate: Callable[[], dict[str, float]]
    out: Path
    data_id: str  # the dataset this run read, recorded in checkpoints
    label: str = "epoch"  # progress-bar label
    resumable: bool = True
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)
    # progress so far (non-zero when resuming)
    start_epoch: int = 0
    step: int = 0
    trained_s: float = 0.0
    best: float = -1.0
    history: dict[str, list] = field(default_factory=lambda: {"loss": [], "dev": []})


def _fit(cfg: TrainConfig, run: _Run) -> Path:
    """The training loop: per epoch set the LR, step through the batches (loss, backward,
    clip, AdamW), then evaluate on dev and write checkpoints, history and curves."""
    from models.checkpoint import save_checkpoint

    model, optimizer, out, history = run.model, run.optimizer, run.out, run.history
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step, trained_s, best = run.step, run.trained_s, run.best
    for epoch in range(run.start_epoch, cfg.epochs):
        lr = _lr_at(epoch, cfg)
        for group in optimizer.param_groups:  # GPO may sit out its first epochs (warm start)
            frozen = group.get("gpo", False) and epoch < cfg.gpo_freeze_epochs
            group["lr"] = 0.0 if frozen else lr * group["scale"]
        hardest = epoch >= cfg.warmup_epochs  # VSE0 warm-up, then VSE++
        model.train()
        batches = run.batches()
        desc = f"{run.label} {epoch + 1}/{cfg.epochs}"
        bar = tqdm(batches, desc=desc, disable=not cfg.progress)
        t0 = time.perf_counter()
        pairs = 0
        for batch in bar:
            parts, n_pairs = run.loss(batch, hardest)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            step += 1
            pairs += n_pairs
            loss = float(parts["loss"].detach())
            history["loss"].append((step, loss))
            rate = pairs / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss:.2f}", pairs_s=f"{rate:.0f}", lr=f"{lr:.1e}")
            if cfg.time_budget_s and trained_s + time.perf_counter() - t0 > cfg.time_budget_s:
                break
        trained_s += time.perf_counter() - t0
        metrics = run.evaluate()
        history["dev"].append({"epoch": epoch + 1, "step": step, "seconds": trained_s, **metrics})
        logger.info(
            "epoch %d: dev rsum %.1f (R@1 %s) after %.0f s", epoch + 1, metrics["rsum"],
            {k: round(v, 1) for k, v in metrics.items() if k.endswith("_r1")}, trained_s,
        )  # fmt: skip
        if cfg.progress:
            tqdm.write(f"epoch {epoch + 1}: dev {json.dumps(metrics)}  ({trained_s:.0f} s)")
        extra = {
            "epoch": epoch + 1, "step": step, "dev_rsum": metrics["rsum"], "data": run.data_id,
            **run.checkpoint_extra,
        }  # fmt: skip
        if metrics["rsum"] > best:
            best = metrics["rsum"]
            save_checkpoint(model, out / "best.safetensors", extra)
        if run.resumable:
            save_checkpoint(model, out / "last.safetensors", extra)
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "seconds": trained_s,
                    "history": history,
                    "best_rsum": best,
                },
                out / "train_state.pt",
            )
        (out / "history.json").write_text(json.dumps(history["dev"], indent=1))
        _plot(history, out / "curves.png")
        done_budget = cfg.time_budget_s is not None and trained_s >= cfg.time_budget_s
        if done_budget or (cfg.target_rsum is not None and metrics["rsum"] >= cfg.target_rsum):
            break
    return out / "best.safetensors"


def start_run(cfg: Any, config_file: str) -> tuple[np.random.Generator, Path]:
    """Threads, seeds and run folder of a training run (``cfg``: ``num_threads``, ``seed``,
    ``out_dir``); writes ``cfg`` as ``config_file`` there. Returns the numpy generator and
    the folder."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / config_file).write_text(cfg.model_dump_json(indent=2))
    return rng, out


def train(cfg: TrainConfig) -> Path:
    """Train the heads of ``cfg.model`` and return the path of the best dev checkpoint."""
    from models.checkpoint import load_state_into, read_checkpoint

    if cfg.sampler == "adaptive" and cfg.epoch_mode == "grouped":
        raise ValueError(
            "the adaptive sampler needs one caption per image row: epoch_mode "
            "'all' or 'one_per_image', not 'grouped'"
        )
    if cfg.finetune_backbone:
        return train_finetune(cfg)
    rng, out = start_run(cfg, "train_config.json")

    model = _build_model(cfg)
    model_cfg = model.config
    model_cfg.save(out / "model_config.json")
    train_ds = load_dataset(cfg.data, cfg.train_split)
    dev_ds = load_dataset(cfg.data, cfg.dev_split)
    if cfg.max_images:
        train_ds, dev_ds = train_ds.subset(cfg.max_images), dev_ds.subset(cfg.max_images)
    train_feats = load_split_features(train_ds, model_cfg, cfg.cache_dir, cfg.device, cfg.progress)
    dev_feats = load_split_features(dev_ds, model_cfg, cfg.cache_dir, cfg.device, cfg.progress)
    train_feats = train_feats.in_memory()  # random access; ~0.75 GB for Flickr8k at lite0/224
    mirror_feats = None
    if cfg.image_flip > 0:
        mirror_feats = load_split_features(
            train_ds, model_cfg, cfg.cache_dir, cfg.device, cfg.progress, mirrored=True
        ).in_memory()

    resuming = cfg.resume and (out / "train_state.pt").exists()
    if not resuming:  # a resumed run's weights come from its own last checkpoint
        if cfg.init_from is not None:
            init_from_checkpoint(model, cfg.init_from)
        else:
            warm_start_gpo(model, _max_length(train_feats))
    # Tuned backbone blocks (`tune_blocks`) learn at lr * backbone_lr_scale, the heads at lr.
    optimizer = _optimizer(model, cfg)
    resumed: dict[str, Any] = {}
    if resuming:
        state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=False)
        _, weights, backbones, _ = read_checkpoint(out / "last.safetensors")
        load_state_into(model, weights, backbones, out / "last.safetensors")
        optimizer.load_state_dict(state["optimizer"])
        resumed = {
            "start_epoch": state["epoch"], "step": state["step"], "trained_s": state["seconds"],
            "history": state["history"], "best": state["best_rsum"],
        }  # fmt: skip
        rng = np.random.default_rng([cfg.seed, state["epoch"]])
        torch.manual_seed(cfg.seed + state["epoch"])
        logger.info("resumed %s at epoch %d, step %d", out, state["epoch"], state["step"])

    samplers = _make_samplers(cfg, model, train_feats) if cfg.sampler == "adaptive" else None
    gen = torch.Generator().manual_seed(cfg.seed + resumed.get("start_epoch", 0))

    def _cached_loss(
        batch: tuple[np.ndarray, np.ndarray], hardest: bool
    ) -> tuple[dict[str, Tensor], int]:
        """Cached features -> tuned top -> size augmentation -> heads -> loss."""
        img_idx, cap_idx = batch
        owner = None
        if cfg.epoch_mode == "grouped":  # one image row per image, captions point to it
            img_idx, inverse = np.unique(img_idx, return_inverse=True)
            owner = torch.from_numpy(inverse.reshape(-1)).to(cfg.device)
        dev_ = cfg.device
        x, xn = train_feats.images(img_idx)
        if mirror_feats is not None:
            x = flip_some(x, mirror_feats.images(img_idx)[0], cfg.image_flip, gen)
        t, tn = train_feats.texts(cap_idx)
        x, xn = model.image_top(x.to(dev_), xn.to(dev_))  # tuned backbone blocks, if any
        t, tn = model.text_top(t.to(dev_), tn.to(dev_))
        x, xn = drop_features(x, xn, cfg.image_drop, gen)
        t, tn = drop_features(t, tn, cfg.token_drop, gen)
        img = model.embed_image_features(x.to(dev_), xn.to(dev_))
        txt = model.embed_text_features(t.to(dev_), tn.to(dev_))
        ids = torch.from_numpy(img_idx).to(dev_)
        extra_txt = extra_img = None
        if samplers is not None:
            extra_txt, extra_img = _adaptive_negatives(
                samplers, model, train_feats, img, txt, img_idx, cap_idx, cfg
            )
        parts = _loss(model, img, txt, ids, cfg, hardest, extra_txt, extra_img, owner)
        return parts, len(cap_idx)

    run = _Run(
        model=model,
        optimizer=optimizer,
        batches=lambda: _epoch_batches(train_feats, cfg, rng),
        loss=_cached_loss,
        evaluate=lambda: evaluate(model, dev_feats, cfg.eval_batch_size, cfg.device),
        out=out,
        data_id=dataset_id(Path(cfg.data)),
        **resumed,
    )
    return _fit(cfg, run)


# ---------------------------------------------------------------------------------------------
# adaptive negatives (VSE-ens)


def _make_samplers(cfg: TrainConfig, model: Any, feats: CachedFeatures) -> dict[str, Any]:
    from models.sampling import AdaptiveNegativeSampler

    dim = model.embed_dim * getattr(model, "num_vectors", 1)

    def bank(items: int, seed: int) -> AdaptiveNegativeSampler:
        return AdaptiveNegativeSampler(
            cfg.sampler_bank_size or items,
            dim,
            cfg.sampler_lambda,
            refresh_every=cfg.sampler_refresh_every,
            seed=cfg.seed + seed,
            one_slot_per_id=True,
        )

    return {"txt": bank(feats.num_captions, 0), "img": bank(feats.num_images, 1)}


def _adaptive_negatives(
    samplers: dict[str, Any],
    model: Any,
    feats: CachedFeatures,
    img: Tensor,
    txt: Tensor,
    img_idx: np.ndarray,
    cap_idx: np.ndarray,
    cfg: TrainConfig,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Draw rank-aware negatives from the banks, re-embed them with the current heads."""
    dev = cfg.device
    flat_img, flat_txt = img.detach().flatten(1), txt.detach().flatten(1)
    img_ids = torch.from_numpy(img_idx)
    cap_ids = torch.from_numpy(cap_idx)
    samplers["txt"].update(flat_txt, cap_ids)  # first, so the banks are never empty
    samplers["img"].update(flat_img, img_ids)
    neg_caps = samplers["txt"].sample(flat_img, cap_ids, cfg.sampler_negatives).ids
    neg_imgs = samplers["img"].sample(flat_txt, img_ids, cfg.sampler_negatives).ids
    neg_caps = np.unique(neg_caps.cpu().numpy().reshape(-1))
    neg_imgs = np.unique(neg_imgs.cpu().numpy().reshape(-1))
    neg_caps, neg_imgs = neg_caps[neg_caps >= 0], neg_imgs[neg_imgs >= 0]
    if len(neg_caps):
        t, tn = feats.texts(neg_caps)
        e_txt = model.embed_text_cache(t.to(dev), tn.to(dev))
    else:
        e_txt = txt[:0]
    if len(neg_imgs):
        x, xn = feats.images(neg_imgs)
        e_img = model.embed_image_cache(x.to(dev), xn.to(dev))
    else:
        e_img = img[:0]
    owner = torch.from_numpy(feats.caption_to_image[neg_caps]).to(dev)
    return (e_txt, owner), (e_img, torch.from_numpy(neg_imgs).to(dev))


# ---------------------------------------------------------------------------------------------
# full fine-tuning (GPU machines)


@torch.no_grad()
def _evaluate_raw(model: Any, ds: CaptionDataset, batch_size: int) -> dict[str, float]:
    """Dev metrics through the full encoders (raw images and captions)."""
    from PIL import Image

    from models.evaluate import retrieval_metrics, similarity_matrix

    model.eval()
    imgs, txts = [], []
    for lo in range(0, ds.num_images, batch_size):
        batch = []
        for p in ds.images[lo : lo + batch_size]:
            with Image.open(p) as im:
                batch.append(im.convert("RGB"))
        imgs.append(model.encode_image(model.preprocess(batch).to(model.device)).float().cpu())
    for lo in range(0, ds.num_captions, batch_size):
        tok = model.tokenize(ds.captions[lo : lo + batch_size])
        txts.append(model.encode_text(tok["input_ids"], tok["attention_mask"]).float().cpu())
    sims = similarity_matrix(model, torch.cat(imgs), torch.cat(txts))
    return retrieval_metrics(sims, ds.caption_to_image)


def train_finetune(cfg: TrainConfig) -> Path:
    """Train heads and backbones end to end on raw images and captions (meant for a GPU).

    Same recipe and the same loop (:func:`_fit`) as `train` (warm-up on all negatives, AdamW,
    clipping, LR decay) without size augmentation; the backbones learn at
    ``lr * backbone_lr_scale``. Checkpoints then include the backbone weights (they no longer
    match the packages'), so only ``best.safetensors`` is written (no resume state).
    """
    from PIL import Image

    from models.model import XModal

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {"image": {"trainable": True}, "text": {"trainable": True}}
    mcfg = model_config_for(
        cfg.model_copy(update={"model_overrides": _merge(overrides, cfg.model_overrides)})
    )
    model = XModal(mcfg, pretrained=True).to(cfg.device)
    warm_start_gpo(model, max(mcfg.text.max_length, 64))  # raw path: no cache to measure
    train_ds, dev_ds = (
        load_dataset(cfg.data, cfg.train_split),
        load_dataset(cfg.data, cfg.dev_split),
    )
    if cfg.max_images:
        train_ds, dev_ds = train_ds.subset(cfg.max_images), dev_ds.subset(cfg.max_images)
    c2i = train_ds.caption_to_image

    def batches() -> list[np.ndarray]:
        order = rng.permutation(len(c2i))
        return [order[lo : lo + cfg.batch_size] for lo in range(0, len(order), cfg.batch_size)]

    def raw_loss(cap: np.ndarray, hardest: bool) -> tuple[dict[str, Tensor], int]:
        """Raw images and captions -> full encoders -> loss."""
        images = []
        for i in c2i[cap]:
            with Image.open(train_ds.images[i]) as im:
                images.append(im.convert("RGB"))
        tok = model.tokenize([train_ds.captions[j] for j in cap])
        img = model.encode_image(model.preprocess(images).to(cfg.device))
        txt = model.encode_text(tok["input_ids"], tok["attention_mask"])
        ids = torch.from_numpy(c2i[cap]).to(cfg.device)
        return _loss(model, img, txt, ids, cfg, hardest), len(cap)

    run = _Run(
        model=model,
        optimizer=_optimizer(model, cfg),
        batches=batches,
        loss=raw_loss,
        evaluate=lambda: _evaluate_raw(model, dev_ds, cfg.eval_batch_size),
        out=out,
        data_id=dataset_id(Path(cfg.data)),
        label="finetune",
        resumable=False,
        checkpoint_extra={"finetuned": True},
    )
    return _fit(cfg, run)
