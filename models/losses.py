"""Training losses; each returns a dict of named parts with the total under ``"loss"``.

- ``hinge``: the triplet hinge for positives ``[Q]`` against negatives ``[Q, J]`` (``-inf``
  where not a negative); every triplet loss here and in ``models.train`` is built on it.
- ``triplet_loss``: the hinge triplet loss of VSE++/VSE-infinity (woodfrog/vse_infty
  ``lib/loss.py: ContrastiveLoss``) over a square similarity matrix whose diagonal holds the
  positives, in both directions, summing every violating negative (VSE0, warm-up) or keeping
  only the hardest one (VSE++).
- ``set_triplet_loss``: the same over Smooth-Chamfer similarities of slot sets (DivE).
- ``mmd_loss`` and ``uniformity_loss``: DivE's regularisers (kdwonn/DivE ``loss.py``).
- ``DiveLoss``: triplet + weighted MMD + weighted uniformity, as DivE trains.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.similarity import DEFAULT_TEMPERATURE, smooth_chamfer

DEFAULT_MARGIN = 0.2  # VSE-infinity and DivE (COCO/Flickr30k scripts)
DIVE_MMD_GAMMA = 0.5  # DivE ``mmd_rbf_loss(..., gamma=0.5)``
DIVE_UNIFORMITY_T = 2.0  # DivE ``batchwise_uniformity_loss(t=2)``
DIVE_REGULARISER_WEIGHT = 0.01  # DivE ``--mmd_weight`` and ``--unif_weight``
REDUCTIONS = ("sum", "mean")


def _reduce(per_query: Tensor, reduction: str) -> Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return per_query.sum() if reduction == "sum" else per_query.mean()


def hinge(
    pos: Tensor,
    neg: Tensor,
    margin: float = DEFAULT_MARGIN,
    hardest: bool = True,
    reduction: str = "sum",
) -> Tensor:
    """The triplet hinge: per query ``q``, ``[margin + neg[q, j] - pos[q]]_+`` over its
    negatives ``j`` (summed, or only the hardest), reduced over queries.

    Args:
        pos: ``[Q]`` similarity of each query to its positive.
        neg: ``[Q, J]`` similarities to candidate negatives; entries that are not negatives
            (the positive itself, other positives) hold ``-inf`` and cost nothing.
        margin, hardest, reduction: as in :func:`triplet_loss`.
    """
    cost = (margin + neg - pos[:, None]).clamp(min=0)
    return _reduce(cost.amax(dim=1) if hardest else cost.sum(dim=1), reduction)


def triplet_loss(
    sims: Tensor,
    margin: float = DEFAULT_MARGIN,
    hardest: bool = True,
    positive_mask: Tensor | None = None,
    reduction: str = "sum",
) -> dict[str, Tensor]:
    """Bidirectional hinge triplet loss over a square similarity matrix.

    For image ``i`` (row) and caption ``j`` (column), with ``sims[i, i]`` the positive pair:
    ``i2t`` costs ``[margin + sims[i, j] - sims[i, i]]_+`` over the negative captions of row
    ``i`` and ``t2i`` costs ``[margin + sims[i, j] - sims[j, j]]_+`` over the negative images
    of column ``j``.

    Args:
        sims: ``[N, N]`` image-caption similarities, positives on the diagonal.
        margin: hinge margin.
        hardest: keep only the hardest negative per query (VSE++); ``False`` sums every
            violating negative (the warm-up objective of VSE-infinity).
        positive_mask: optional ``[N, N]`` bool, True where image ``i`` and caption ``j``
            match (several captions of one image in a batch). Those pairs are never used as
            negatives; the diagonal stays the anchor positive of each row and column.
        reduction: ``"sum"`` over queries (VSE-infinity) or ``"mean"`` (DivE).

    Returns:
        ``{"loss": i2t + t2i, "i2t": ..., "t2i": ...}``.
    """
    n = sims.shape[0]
    if sims.dim() != 2 or sims.shape[1] != n:
        raise ValueError(f"sims must be square [N, N], got {tuple(sims.shape)}")
    diagonal = sims.diagonal()  # [N]
    positives = torch.eye(n, dtype=torch.bool, device=sims.device)
    if positive_mask is not None:
        if positive_mask.shape != sims.shape:
            raise ValueError(f"positive_mask must be {tuple(sims.shape)}")
        positives = positives | positive_mask.to(device=sims.device, dtype=torch.bool)
    i2t = hinge(diagonal, sims.masked_fill(positives, -math.inf), margin, hardest, reduction)
    t2i = hinge(
        diagonal, sims.t().masked_fill(positives.t(), -math.inf), margin, hardest, reduction
    )
    return {"loss": i2t + t2i, "i2t": i2t, "t2i": t2i}


triplet_hardest = triplet_loss  # name used in docs/ARCHITECTURE.md


def set_triplet_loss(
    img_sets: Tensor,
    txt_sets: Tensor,
    margin: float = DEFAULT_MARGIN,
    hardest: bool = True,
    positive_mask: Tensor | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    reduction: str = "mean",
) -> dict[str, Tensor]:
    """Triplet loss over Smooth-Chamfer similarities of paired slot sets (DivE).

    Args:
        img_sets: ``[N, K1, D]`` image slot sets; row ``i`` is paired with ``txt_sets[i]``.
        txt_sets: ``[N, K2, D]`` caption slot sets.
        margin, hardest, positive_mask, reduction: as in ``triplet_loss`` (``"mean"`` is
            DivE's reduction).
        temperature: Smooth-Chamfer scale (DivE uses 16).

    Returns:
        ``{"loss", "i2t", "t2i"}`` as ``triplet_loss``.
    """
    sims = smooth_chamfer(img_sets, txt_sets, temperature)  # [N, N]
    return triplet_loss(sims, margin, hardest, positive_mask, reduction)


def _distances(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean distances ``[P, Q]`` with a finite gradient at distance 0 (unlike sqrt)."""
    squared = (x.square().sum(-1, keepdim=True) + y.square().sum(-1) - 2 * x @ y.t()).clamp(min=0)
    positive = squared > 0
    safe = torch.where(positive, squared, torch.ones_like(squared))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(squared))


def _subsample(rows: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """At most ``k`` of the rows, drawn uniformly without replacement (all when fewer)."""
    if rows.shape[0] <= k:
        return rows
    pick = torch.randperm(rows.shape[0], generator=generator)[:k].to(rows.device)
    return rows.index_select(0, pick)


def mmd_loss(
    img_sets: Tensor,
    txt_sets: Tensor,
    gamma: float = DIVE_MMD_GAMMA,
    squared: bool = False,
    max_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Maximum mean discrepancy between all image slots and all caption slots of a batch.

    DivE's ``mmd_rbf_loss``: the biased estimate ``mean k(x, x') - 2 mean k(x, y) +
    mean k(y, y')`` over the flattened slot vectors, with DivE's kernel
    ``k(x, y) = exp(-gamma * ||x - y||)`` (the reference calls it RBF but does not square the
    distance); ``squared=True`` gives the Gaussian ``exp(-gamma * ||x - y||^2)``.

    Args:
        img_sets: ``[N, K1, D]`` (or ``[N, D]``) image embeddings.
        txt_sets: ``[M, K2, D]`` (or ``[M, D]``) caption embeddings.
        gamma: kernel scale.
        squared: use squared distances (Gaussian kernel).
        max_samples: estimate from at most this many slot vectors per modality, drawn
            uniformly without replacement (``generator``); the kernel cost falls from
            ``(N K1 + M K2)^2`` to ``(2 max_samples)^2`` pairs.  Same estimator of the same
            discrepancy on a random subsample (unbiased for the cross term, and for the
            within terms up to the V-statistic's ``1/n`` self-pair share).  None = all slots.

    Returns:
        ``{"loss": mmd, "mmd": mmd}``; 0 for identical samples.
    """
    x = img_sets.reshape(-1, img_sets.shape[-1])  # [N*K1, D]
    y = txt_sets.reshape(-1, txt_sets.shape[-1])  # [M*K2, D]
    if max_samples is not None:
        x, y = _subsample(x, max_samples, generator), _subsample(y, max_samples, generator)

    def kernel(p: Tensor, q: Tensor) -> Tensor:
        dist = _distances(p, q)
        return torch.exp(-gamma * (dist.square() if squared else dist)).mean()

    mmd = kernel(x, x) - 2 * kernel(x, y) + kernel(y, y)
    return {"loss": mmd, "mmd": mmd}


def uniformity_loss(sets: Tensor, t: float = DIVE_UNIFORMITY_T) -> dict[str, Tensor]:
    """DivE's within-set uniformity: mean Gaussian potential between the slots of each set.

    ``mean_b [ 2 / (K (K - 1)) sum_{i<j} exp(-t ||s_bi - s_bj||^2) ]``: low when the slots of
    every set are spread out, 1 when they collapse to one vector.  DivE applies it to the
    L2-normalised slots (before or after the global residual, ``--unif_residual``) and adds
    the image and caption terms.

    Args:
        sets: ``[B, K, D]`` slot vectors.
        t: kernel sharpness.

    Returns:
        ``{"loss": u, "uniformity": u}``; 0 when ``K == 1``.
    """
    b, k, _ = sets.shape
    if k < 2:
        zero = sets.new_zeros(())
        return {"loss": zero, "uniformity": zero}
    diff = rearrange(sets, "b k d -> b k 1 d") - rearrange(sets, "b k d -> b 1 k d")
    potential = torch.exp(-t * diff.square().sum(-1))  # [B, K, K]
    upper = torch.ones(k, k, dtype=torch.bool, device=sets.device).triu(diagonal=1)
    per_set = potential.masked_select(upper).view(b, -1).mean(dim=1)  # [B]
    u = per_set.mean()
    return {"loss": u, "uniformity": u}


class DiveLoss(nn.Module):
    """DivE objective: set triplet loss + ``mmd_weight`` MMD + ``unif_weight`` uniformity.

    Args:
        margin: triplet margin.
        temperature: Smooth-Chamfer scale.
        mmd_weight: weight of ``mmd_loss`` (0 disables it).
        unif_weight: weight of ``uniformity_loss`` summed over both modalities (0 disables it).
        hardest: hardest negative only; set it to ``False`` for a warm-up epoch.
        gamma: MMD kernel scale.
        unif_t: uniformity kernel sharpness.
        reduction: triplet reduction over queries.
    """

    def __init__(
        self,
        margin: float = DEFAULT_MARGIN,
        temperature: float = DEFAULT_TEMPERATURE,
        mmd_weight: float = DIVE_REGULARISER_WEIGHT,
        unif_weight: float = DIVE_REGULARISER_WEIGHT,
        hardest: bool = True,
        gamma: float = DIVE_MMD_GAMMA,
        unif_t: float = DIVE_UNIFORMITY_T,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.margin = margin
        self.temperature = temperature
        self.mmd_weight = mmd_weight
        self.unif_weight = unif_weight
        self.hardest = hardest
        self.gamma = gamma
        self.unif_t = unif_t
        self.reduction = reduction

    def forward(
        self,
        img_sets: Tensor,
        txt_sets: Tensor,
        positive_mask: Tensor | None = None,
        img_unif: Tensor | None = None,
        txt_unif: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Total DivE loss with its parts.

        Args:
            img_sets: ``[N, K1, D]`` L2-normalised image sets, paired row by row with
            txt_sets: ``[N, K2, D]`` L2-normalised caption sets.
            positive_mask: optional ``[N, N]`` extra positives (see ``triplet_loss``).
            img_unif, txt_unif: slots to regularise for uniformity (DivE's
                ``--unif_residual`` passes the slots before the global residual); default the
                sets themselves.  They are L2-normalised here.

        Returns:
            ``{"loss", "triplet", "i2t", "t2i", "mmd", "uniformity"}`` (unweighted parts).
        """
        parts = set_triplet_loss(
            img_sets,
            txt_sets,
            self.margin,
            self.hardest,
            positive_mask,
            self.temperature,
            self.reduction,
        )
        triplet = parts["loss"]
        mmd = mmd_loss(img_sets, txt_sets, self.gamma)["loss"]
        img_u = F.normalize(img_sets if img_unif is None else img_unif, dim=-1)
        txt_u = F.normalize(txt_sets if txt_unif is None else txt_unif, dim=-1)
        uniformity = (
            uniformity_loss(img_u, self.unif_t)["loss"]
            + uniformity_loss(txt_u, self.unif_t)["loss"]
        )
        total = triplet + self.mmd_weight * mmd + self.unif_weight * uniformity
        return {
            "loss": total,
            "triplet": triplet,
            "i2t": parts["i2t"],
            "t2i": parts["t2i"],
            "mmd": mmd,
            "uniformity": uniformity,
        }
