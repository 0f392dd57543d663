"""Train and measure the video GPO (pooling over the time axis) on frozen frame embeddings.

    clips (models.video_clips) -> frames sampled as the service samples them (segments)
      -> the model's image encoder, frozen, once: unit frame embeddings [F, D] (fp16 cache)
      -> windows: one segment, or the whole clip -> pool over time (GPO | mean) -> [D]
      -> hardest-negative triplet loss against the frozen caption embeddings of the clip's
         photos (models.train's one loop and loss)

A :class:`ClipSet` holds everything a set of clips needs, embedded once: per-frame and caption
embeddings plus the segment and photo time spans. Training updates only ``video_pool`` (the
GPO's GRU and scorer, started exactly at mean pooling by ``models.gpo.init_mean_pooling``), so
the image and text heads stay those of the base model and the result is that model with a
trained video GPO, saved as a full checkpoint.

Measurement (:func:`video_metrics`), as the service answers a text query over a video gallery
(an item's score is its best segment, and that segment is returned):

- text -> video (``t2v``): every caption of every photo is a query; the right clip is the one
  showing the photo; R@1/5/10 and the median rank.
- video -> text (``v2t``): each clip pooled over all its frames (``embed_video_frames``) ranks
  every caption; the rank of the best caption of one of its photos.
- ``segment_acc``: for every query, whether the best-scoring segment of the right clip
  overlaps the photo's span; ``segment_acc_at_1``: the same over the queries whose top clip is
  right (what a user sees); ``segment_chance``: the expected accuracy of a random segment.
- ``rsum``: the six recalls summed (what picks the best epoch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from tqdm import tqdm

from models.config import VideoPooling
from models.evaluate import retrieval_metrics
from models.video_clips import ClipPlan, spans_overlap

logger = logging.getLogger(__name__)

__all__ = [
    "ClipSet",
    "Segment",
    "VideoTrainConfig",
    "embed_clip_set",
    "pool_windows",
    "train_video_pool",
    "video_metrics",
]

# (start, end, frames) of one decoded segment, as the service's decoder gives them.
Segment = tuple[float, float, Sequence[Image.Image]]


@dataclass
class ClipSet:
    """Frozen embeddings of a set of captioned clips (arrays only; saved as one ``.npz``).

    Frames are stored clip after clip, segment after segment; ``segment_offsets[s]`` is the
    first frame of segment ``s`` and ``clip_offsets[c]`` the first segment of clip ``c``.
    """

    frames: np.ndarray  # [F, D] float16 unit frame embeddings
    segment_offsets: np.ndarray  # [S + 1] int64
    segment_spans: np.ndarray  # [S, 2] float32 seconds
    clip_offsets: np.ndarray  # [C + 1] int64
    photo_spans: np.ndarray  # [P, 2] float32 seconds
    photo_clip: np.ndarray  # [P] int64: the clip showing photo p
    captions: np.ndarray  # [Q, D] float16 unit caption embeddings
    caption_photo: np.ndarray  # [Q] int64: the photo caption q describes

    @property
    def num_clips(self) -> int:
        return len(self.clip_offsets) - 1

    def save(self, path: Path) -> Path:
        """Write every array to ``path`` (``.npz``, atomically)."""
        path = Path(path)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, **{f.name: getattr(self, f.name) for f in fields(self)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> ClipSet:
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(**{f.name: data[f.name] for f in fields(cls)})

    def clip_frames(self, c: int) -> np.ndarray:
        """All frames of clip ``c`` ``[T, D]``, segment after segment."""
        lo, hi = self.clip_offsets[c], self.clip_offsets[c + 1]
        return self.frames[self.segment_offsets[lo] : self.segment_offsets[hi]]


def embed_clip_set(
    model: Any,
    plans: Sequence[ClipPlan],
    decoded: Iterable[Sequence[Segment]],
    batch_size: int = 64,
    progress: bool = True,
) -> ClipSet:
    """Embed the decoded segments of every clip and the captions of every photo, once.

    Args:
        model: an ``XModal`` (its serving engine, e.g. ONNX Runtime, is used when enabled).
        plans: the clips' plans (photos, spans, captions), in the order of ``decoded``.
        decoded: per clip, its segments as the service decodes them (``service.media``).
    """
    frames, seg_offsets, seg_spans, clip_offsets = [], [0], [], [0]
    pending: list[Image.Image] = []
    for segments in tqdm(decoded, total=len(plans), desc="frames", disable=not progress):
        for start, end, seg_frames in segments:
            pending.extend(seg_frames)
            seg_offsets.append(seg_offsets[-1] + len(seg_frames))
            seg_spans.append((start, end))
        clip_offsets.append(len(seg_spans))
        if len(pending) >= batch_size:
            frames.append(model.embed_images(pending, batch_size).astype(np.float16))
            pending = []
    if pending:
        frames.append(model.embed_images(pending, batch_size).astype(np.float16))
    if len(clip_offsets) - 1 != len(plans):
        raise ValueError(f"{len(clip_offsets) - 1} decoded clips for {len(plans)} plans")
    photo_spans: list[tuple[float, float]] = []
    photo_clip: list[int] = []
    texts: list[str] = []
    caption_photo: list[int] = []
    for c, plan in enumerate(plans):
        for photo in plan.photos:
            texts.extend(photo.captions)
            caption_photo.extend([len(photo_spans)] * len(photo.captions))
            photo_spans.append((photo.start, photo.end))
            photo_clip.append(c)
    return ClipSet(
        frames=np.concatenate(frames),
        segment_offsets=np.asarray(seg_offsets, dtype=np.int64),
        segment_spans=np.asarray(seg_spans, dtype=np.float32).reshape(-1, 2),
        clip_offsets=np.asarray(clip_offsets, dtype=np.int64),
        photo_spans=np.asarray(photo_spans, dtype=np.float32).reshape(-1, 2),
        photo_clip=np.asarray(photo_clip, dtype=np.int64),
        captions=model.embed_texts(texts).astype(np.float16),
        caption_photo=np.asarray(caption_photo, dtype=np.int64),
    )


def pool_windows(
    model: Any,
    windows: Sequence[np.ndarray],
    pooling: VideoPooling | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Pool each window's frame embeddings ``[T_i, D]`` into one unit vector -> ``[W, D]``
    (``model.pool_frames``; windows longer than ``config.video.max_frames`` are subsampled
    as ``embed_video_frames`` does)."""
    from models.model import frame_picks

    max_frames = model.config.video.max_frames
    windows = [w[frame_picks(len(w), max_frames)] for w in windows]
    t = max(len(w) for w in windows)
    padded = np.zeros((len(windows), t, windows[0].shape[-1]), dtype=np.float32)
    for i, w in enumerate(windows):
        padded[i, : len(w)] = w
    lengths = torch.tensor([len(w) for w in windows], device=device)
    x = torch.from_numpy(padded).to(device, model.dtype)
    return model.pool_frames(x, lengths, normalize=True, pooling=pooling)  # type: ignore[no-any-return]


@torch.no_grad()
def video_metrics(
    model: Any,
    clips: ClipSet,
    pooling: VideoPooling | None = None,
    device: str | torch.device = "cpu",
    block: int = 256,
) -> dict[str, float]:
    """Text -> video and video -> text retrieval and segment accuracy (module docstring)."""
    was_training = model.training
    model.eval()
    n_seg = len(clips.segment_spans)
    seg_windows = [
        clips.frames[clips.segment_offsets[s] : clips.segment_offsets[s + 1]] for s in range(n_seg)
    ]
    segs = torch.cat(
        [
            pool_windows(model, seg_windows[lo : lo + block], pooling, device).float().cpu()
            for lo in range(0, n_seg, block)
        ]
    )
    whole = torch.cat(
        [
            pool_windows(
                model,
                [clips.clip_frames(c) for c in range(lo, min(lo + block, clips.num_clips))],
                pooling,
                device,
            )
            .float()
            .cpu()
            for lo in range(0, clips.num_clips, block)
        ]
    )
    model.train(was_training)
    texts = torch.from_numpy(clips.captions.astype(np.float32))
    seg_sims = (texts @ segs.T).numpy()  # [Q, S]
    # An item scores its best segment (the gallery's rule); ties: the first segment.
    t2v = np.stack(
        [
            seg_sims[:, clips.clip_offsets[c] : clips.clip_offsets[c + 1]].max(axis=1)
            for c in range(clips.num_clips)
        ],
        axis=1,
    )  # [Q, C]
    caption_clip = clips.photo_clip[clips.caption_photo]  # [Q]
    sims_v2t = (whole @ texts.T).numpy()  # [C, Q]
    raw = retrieval_metrics(sims_v2t, caption_clip, sims_t2i=t2v)
    out = {k.replace("i2t", "v2t").replace("t2i", "t2v"): v for k, v in raw.items()}
    # Segment accuracy: the right clip's best segment against the queried photo's span.
    hits, hits_at_1, chance = [], [], []
    top = t2v.argmax(axis=1)
    for q in range(len(texts)):
        c = int(caption_clip[q])
        lo, hi = int(clips.clip_offsets[c]), int(clips.clip_offsets[c + 1])
        best = lo + int(seg_sims[q, lo:hi].argmax())
        span = tuple(clips.photo_spans[clips.caption_photo[q]])
        overlap = [spans_overlap(tuple(clips.segment_spans[s]), span) for s in range(lo, hi)]  # type: ignore[arg-type]
        ok = overlap[best - lo]
        hits.append(ok)
        chance.append(np.mean(overlap))
        if top[q] == c:
            hits_at_1.append(ok)
    out["segment_acc"] = float(100.0 * np.mean(hits))
    out["segment_acc_at_1"] = float(100.0 * np.mean(hits_at_1)) if hits_at_1 else 0.0
    out["segment_chance"] = float(100.0 * np.mean(chance))
    out["clips"] = float(clips.num_clips)
    out["queries"] = float(len(texts))
    return out


class VideoTrainConfig(BaseModel):
    """One video-GPO training run (saved as ``video_train_config.json`` beside the weights)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # Optimisation of the GPO's ~13k parameters (the only ones that train).
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = 2e-4  # higher rates drift further from the mean (docs/RESULTS.md, issue #11)
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    margin: float = 0.2
    warmup_epochs: int = 0  # epochs summing all violating negatives before hardest-only
    lr_decay_epoch: int | None = None  # None = after 2/3 of the epochs
    # Fraction of training windows that are a whole clip (the rest: one segment each).
    whole_clip_fraction: float = Field(0.5, ge=0.0, le=1.0)
    out_dir: Path = Path("runs") / "video-gpo"
    device: str = "cpu"
    seed: int = 0
    num_threads: int | None = None
    progress: bool = True

    def loop_config(self) -> Any:
        """The knobs of ``models.train``'s one loop, as a ``TrainConfig``."""
        from models.train import TrainConfig

        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            margin=self.margin,
            warmup_epochs=self.warmup_epochs,
            lr_decay_epoch=self.lr_decay_epoch,
            out_dir=self.out_dir,
            device=self.device,
            seed=self.seed,
            progress=self.progress,
        )


def _draw_batches(
    clips: ClipSet, cfg: VideoTrainConfig, rng: np.random.Generator
) -> list[tuple[list[np.ndarray], np.ndarray, np.ndarray]]:
    """One epoch: every clip once, in random order, as (window frames, caption, clip id).

    A window is the whole clip (``whole_clip_fraction`` of the time) or one of its segments;
    its caption is one of a photo shown in the window, the photo drawn in proportion to how
    long the window shows it.
    """
    by_photo = np.split(
        np.argsort(clips.caption_photo, kind="stable"),
        np.cumsum(np.bincount(clips.caption_photo))[:-1],
    )
    photos_of = np.split(
        np.arange(len(clips.photo_clip)), np.cumsum(np.bincount(clips.photo_clip))[:-1]
    )
    order = rng.permutation(clips.num_clips)
    batches = []
    for lo in range(0, max(len(order) - cfg.batch_size + 1, 1), cfg.batch_size):
        windows, captions, ids = [], [], []
        for c in order[lo : lo + cfg.batch_size]:
            s_lo, s_hi = int(clips.clip_offsets[c]), int(clips.clip_offsets[c + 1])
            if rng.random() < cfg.whole_clip_fraction or s_hi - s_lo == 1:
                frames = clips.clip_frames(int(c))
                span = (
                    float(clips.segment_spans[s_lo, 0]),
                    float(clips.segment_spans[s_hi - 1, 1]),
                )
            else:
                s = int(rng.integers(s_lo, s_hi))
                frames = clips.frames[clips.segment_offsets[s] : clips.segment_offsets[s + 1]]
                span = (float(clips.segment_spans[s, 0]), float(clips.segment_spans[s, 1]))
            photos = photos_of[int(c)]
            shown = np.array(
                [
                    max(
                        0.0,
                        min(span[1], clips.photo_spans[p, 1])
                        - max(span[0], clips.photo_spans[p, 0]),
                    )
                    for p in photos
                ]
            )
            if shown.sum() <= 0:  # a window past every photo's end: any photo of the clip
                shown = np.ones(len(photos))
            p = int(rng.choice(photos, p=shown / shown.sum()))
            windows.append(frames)
            captions.append(int(rng.choice(by_photo[p])))
            ids.append(int(c))
        batches.append((windows, np.asarray(captions), np.asarray(ids)))
    return batches


def train_video_pool(
    model: Any, train: ClipSet, dev: ClipSet, cfg: VideoTrainConfig, data_id: str = "clips"
) -> Path:
    """Train ``model.video_pool`` (a video GPO) and return the best dev checkpoint's path.

    ``model`` must have a video GPO (``config.video.pooling == "gpo"``); everything else in
    it is frozen. The checkpoints are full models (their heads + the trained GPO), so the
    best one can be exported and shipped as is (``xmodal export``).
    """
    from models.checkpoint import save_checkpoint
    from models.train import _fit, _loss, _Run, start_run

    if model.video_pool is None:
        raise ValueError(f"model {model.name!r} has no video GPO (set video.pooling 'gpo')")
    rng, out = start_run(cfg, "video_train_config.json")
    model.to(cfg.device)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("video_pool."))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": params, "scale": 1.0}], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    loop = cfg.loop_config()
    texts = torch.from_numpy(train.captions.astype(np.float32)).to(cfg.device)

    def loss(batch: tuple[list[np.ndarray], np.ndarray, np.ndarray], hardest: bool) -> Any:
        windows, captions, ids = batch
        vid = pool_windows(model, windows, "gpo", cfg.device)  # [B, D]
        ids_t = torch.from_numpy(ids).to(cfg.device)
        return _loss(model, vid, texts[torch.from_numpy(captions)], ids_t, loop, hardest), len(ids)

    # Epoch 0 is the warm start (exactly mean pooling): the best checkpoint starts there, so
    # training can only replace it with a GPO that scores higher on dev.
    start = video_metrics(model, dev, "gpo", cfg.device)
    logger.info("video GPO at its warm start (mean pooling): dev %s", start)
    extra = {
        # The base model's extras stay (its image/text training); the video GPO adds its own.
        **model.checkpoint_extra,
        "video_pool": {"data": data_id, "trained_by": "xmodal video train"},
    }
    save_checkpoint(model, out / "best.safetensors", extra)
    run = _Run(
        model=model,
        optimizer=optimizer,
        batches=lambda: _draw_batches(train, cfg, rng),
        loss=loss,
        evaluate=lambda: video_metrics(model, dev, "gpo", cfg.device),
        out=out,
        data_id=data_id,
        label="video epoch",
        resumable=False,
        checkpoint_extra=extra,
        best=start["rsum"],
        history={"loss": [], "dev": [{"epoch": 0, "step": 0, "seconds": 0.0, **start}]},
    )
    return _fit(loop, run)
