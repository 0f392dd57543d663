"""Cross-modal retrieval evaluation: the standard image-caption protocol.

- image-to-text (i2t): for each image, the rank of its best-ranked ground-truth caption;
- text-to-image (t2i): for each caption, the rank of its image;
- R@1/5/10 in percent, RSUM = the sum of the six, median ranks (1-based).

Any number of captions per image: ``caption_to_image[j]`` names caption ``j``'s image. Every
image and caption is embedded once; similarities are computed in blocks. A rank is the number
of candidates scoring strictly higher than the ground truth (plus one): exact, no sort at all
(cheaper than a partial sort, and ties count in the query's favour as with a stable argsort).

`models` never imports `index`: callers that want QB-Norm pass ``t2i_renorm``, a function
mapping the text-to-image similarity block ``[Q, n_images]`` to renormalised scores, and/or
``i2t_renorm``, the same for the image-to-text block ``[n_images, n_captions]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from models.features import CachedFeatures

__all__ = [
    "METRIC_KEYS",
    "embed_cached",
    "evaluate",
    "rank_i2t",
    "renormed_metrics",
    "rank_t2i",
    "retrieval_metrics",
    "similarity_matrix",
]

logger = logging.getLogger(__name__)

METRIC_KEYS = (
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "rsum",
    "medr_i2t",
    "medr_t2i",
)
Renorm = Callable[[np.ndarray], np.ndarray]


def rank_i2t(sims: np.ndarray, caption_to_image: np.ndarray, block: int = 512) -> np.ndarray:
    """0-based rank of the best ground-truth caption for each image; ``sims`` is [n_img, n_cap]."""
    n_img, n_cap = sims.shape
    c2i = np.asarray(caption_to_image)
    assert len(c2i) == n_cap, f"sims has {n_cap} captions, caption_to_image {len(c2i)}"
    ranks = np.empty(n_img, dtype=np.int64)
    for lo in range(0, n_img, block):
        s = sims[lo : lo + block]  # [b, n_cap]
        own = c2i[None, :] == np.arange(lo, lo + len(s))[:, None]  # [b, n_cap]
        best = np.where(own, s, -np.inf).max(axis=1)  # best ground-truth score per image
        ranks[lo : lo + len(s)] = ((s > best[:, None]) & ~own).sum(axis=1)
    return ranks


def rank_t2i(sims_t2i: np.ndarray, caption_to_image: np.ndarray, block: int = 2048) -> np.ndarray:
    """0-based rank of the image of each caption; ``sims_t2i`` is [n_cap, n_img]."""
    c2i = np.asarray(caption_to_image)
    ranks = np.empty(len(c2i), dtype=np.int64)
    for lo in range(0, len(c2i), block):
        s = sims_t2i[lo : lo + block]
        gt = s[np.arange(len(s)), c2i[lo : lo + len(s)]]
        ranks[lo : lo + len(s)] = (s > gt[:, None]).sum(axis=1)
    return ranks


def _recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(ranks < k)) for k in (1, 5, 10)}
    out[f"medr_{prefix}"] = float(np.floor(np.median(ranks)) + 1)
    return out


def retrieval_metrics(
    sims: np.ndarray,
    caption_to_image: np.ndarray,
    sims_t2i: np.ndarray | None = None,
    sims_i2t: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics from an image x caption similarity matrix ``[n_img, n_cap]``.

    ``sims_t2i`` ([n_cap, n_img]) overrides the scores used for text-to-image (e.g. after
    QB-Norm); by default it is ``sims.T``. ``sims_i2t`` ([n_img, n_cap]) does the same for
    image-to-text (default ``sims``).
    """
    sims = np.asarray(sims, dtype=np.float32)
    t2i = sims.T if sims_t2i is None else np.asarray(sims_t2i, dtype=np.float32)
    i2t = sims if sims_i2t is None else np.asarray(sims_i2t, dtype=np.float32)
    out = {**_recalls(rank_i2t(i2t, caption_to_image), "i2t")}
    out.update(_recalls(rank_t2i(t2i, caption_to_image), "t2i"))
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return {k: out[k] for k in METRIC_KEYS}


@torch.no_grad()
def embed_cached(
    model: Any, feats: CachedFeatures, batch_size: int = 256, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every image and every caption of ``feats`` once with the model's heads."""
    was_training = model.training
    model.eval()
    imgs, txts = [], []
    for lo in range(0, feats.num_images, batch_size):
        x, n = feats.images(np.arange(lo, min(lo + batch_size, feats.num_images)))
        imgs.append(model.embed_image_cache(x.to(device), n.to(device)).float().cpu())
    for lo in range(0, feats.num_captions, batch_size):
        x, n = feats.texts(np.arange(lo, min(lo + batch_size, feats.num_captions)))
        txts.append(model.embed_text_cache(x.to(device), n.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(imgs), torch.cat(txts)


@torch.no_grad()
def similarity_matrix(
    model: Any, a: torch.Tensor, b: torch.Tensor, block: int = 1024
) -> np.ndarray:
    """``model.similarity(a, b)`` computed in row blocks -> float32 numpy ``[len(a), len(b)]``."""
    rows = [model.similarity(a[lo : lo + block], b).float().cpu() for lo in range(0, len(a), block)]
    return torch.cat(rows).numpy()


def evaluate(
    model: Any,
    feats: CachedFeatures,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    t2i_renorm: Renorm | None = None,
    i2t_renorm: Renorm | None = None,
) -> dict[str, float]:
    """Retrieval metrics of ``model`` on cached features of one split.

    With ``t2i_renorm`` and/or ``i2t_renorm`` (e.g. QB-Norm), the result also holds every key
    prefixed ``qbnorm_`` computed with the renormalised scores of those directions.
    """
    img, txt = embed_cached(model, feats, batch_size, device)
    sims = similarity_matrix(model, img, txt)  # [n_img, n_cap]
    return renormed_metrics(sims, feats.caption_to_image, t2i_renorm, i2t_renorm)


def renormed_metrics(
    sims: np.ndarray,
    caption_to_image: np.ndarray,
    t2i_renorm: Renorm | None = None,
    i2t_renorm: Renorm | None = None,
) -> dict[str, float]:
    """:func:`retrieval_metrics` of ``sims [n_img, n_cap]``, plus the ``qbnorm_`` keys when a
    renormalisation of either direction is given."""
    metrics = retrieval_metrics(sims, caption_to_image)
    if t2i_renorm is None and i2t_renorm is None:
        return metrics
    t2i = t2i_renorm(np.ascontiguousarray(sims.T)) if t2i_renorm is not None else None
    i2t = i2t_renorm(np.ascontiguousarray(sims)) if i2t_renorm is not None else None
    qb = retrieval_metrics(sims, caption_to_image, sims_t2i=t2i, sims_i2t=i2t)
    metrics.update({f"qbnorm_{k}": v for k, v in qb.items()})
    return metrics
