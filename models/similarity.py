"""Similarities between single vectors and between sets of vectors (pure tensor maths).

Set similarities follow DivE (Kim et al., WACV 2023; kdwonn/DivE ``similarity.py``), with
``s_ij`` the cosine between element ``i`` of set ``A`` (size ``K1``) and element ``j`` of
set ``B`` (size ``K2``):

- ``chamfer(A, B) = 1/2 [ mean_i max_j s_ij + mean_j max_i s_ij ]``
- ``smooth_chamfer(A, B) = 1/2 [ 1/(K1 T) sum_i log sum_j exp(T s_ij)
  + 1/(K2 T) sum_j log sum_i exp(T s_ij) ]``, ``T`` the (inverse) temperature ``alpha``;
  it tends to ``chamfer`` as ``T`` grows (the gap is at most ``log(max(K1, K2)) / T``).
- ``max_of_max(A, B) = max_ij s_ij``.

All set functions take ``a [N, K1, D]`` and ``b [M, K2, D]`` and return ``[N, M]``; they work on
row chunks of ``a`` so that an ``N x M`` gallery comparison stays within a bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_TEMPERATURE = 16.0  # DivE's smooth-chamfer alpha for COCO/Flickr30k
MAX_CHUNK_ELEMENTS = 1 << 24  # pairwise [chunk, M, K1, K2] elements kept alive at once


def cosine(a: Tensor, b: Tensor, normalize: bool = True) -> Tensor:
    """Cosine similarity of every row of ``a [N, D]`` with every row of ``b [M, D]`` -> ``[N, M]``.

    With ``normalize=False`` the inputs are assumed L2-normalised and this is the dot product.
    """
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a @ b.transpose(-1, -2)


def pairwise_set_cosine(a: Tensor, b: Tensor, normalize: bool = True) -> Tensor:
    """Element cosines between sets: ``a [N, K1, D]``, ``b [M, K2, D]`` -> ``[N, M, K1, K2]``."""
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return torch.einsum("nkd,mld->nmkl", a, b)


def _chunked(
    fn: Callable[[Tensor], Tensor], a: Tensor, b: Tensor, normalize: bool, chunk_size: int | None
) -> Tensor:
    """Apply ``fn`` to ``pairwise_set_cosine`` of row chunks of ``a``; concatenate to ``[N, M]``."""
    if a.dim() != 3 or b.dim() != 3:
        raise ValueError(f"sets must be [N, K, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    n, k1, _ = a.shape
    m, k2, _ = b.shape
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    if chunk_size is None:
        chunk_size = max(1, MAX_CHUNK_ELEMENTS // max(1, m * k1 * k2))
    if chunk_size >= n:
        return fn(pairwise_set_cosine(a, b, normalize=False))
    parts = [
        fn(pairwise_set_cosine(part, b, normalize=False)) for part in a.split(chunk_size, dim=0)
    ]
    return torch.cat(parts, dim=0)


def chamfer(a: Tensor, b: Tensor, normalize: bool = True, chunk_size: int | None = None) -> Tensor:
    """Chamfer similarity ``1/2 [mean_i max_j s_ij + mean_j max_i s_ij]`` -> ``[N, M]``.

    Args:
        a: ``[N, K1, D]`` sets.
        b: ``[M, K2, D]`` sets.
        normalize: L2-normalise the elements first (a no-op for normalised embeddings).
        chunk_size: rows of ``a`` per step; ``None`` picks one from ``MAX_CHUNK_ELEMENTS``.
    """

    def reduce(s: Tensor) -> Tensor:  # s: [n, M, K1, K2]
        return (s.amax(dim=-1).mean(dim=-1) + s.amax(dim=-2).mean(dim=-1)) / 2

    return _chunked(reduce, a, b, normalize, chunk_size)


def max_of_max(
    a: Tensor, b: Tensor, normalize: bool = True, chunk_size: int | None = None
) -> Tensor:
    """Largest element cosine between the two sets, ``max_ij s_ij`` -> ``[N, M]``.

    Args:
        a: ``[N, K1, D]`` sets.
        b: ``[M, K2, D]`` sets.
        normalize: L2-normalise the elements first.
        chunk_size: rows of ``a`` per step; ``None`` picks one from ``MAX_CHUNK_ELEMENTS``.
    """
    return _chunked(lambda s: s.amax(dim=(-2, -1)), a, b, normalize, chunk_size)


def smooth_chamfer(
    a: Tensor,
    b: Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """DivE's Smooth-Chamfer similarity -> ``[N, M]``; finite at any temperature.

    ``1/2 [ 1/(K1 T) sum_i LSE_j(T s_ij) + 1/(K2 T) sum_j LSE_i(T s_ij) ]``: a log-sum-exp
    replaces each max of the Chamfer similarity (no ``log K`` correction, as in the
    reference), computed with ``torch.logsumexp``.

    Args:
        a: ``[N, K1, D]`` sets (e.g. image slots).
        b: ``[M, K2, D]`` sets (e.g. caption slots).
        temperature: the scale ``T`` (DivE's ``--temperature``, alpha in the paper); larger is
            closer to Chamfer.
        normalize: L2-normalise the elements first.
        chunk_size: rows of ``a`` per step; ``None`` picks one from ``MAX_CHUNK_ELEMENTS``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def reduce(s: Tensor) -> Tensor:  # s: [n, M, K1, K2]
        scaled = s * temperature
        a_to_b = torch.logsumexp(scaled, dim=-1).mean(dim=-1)  # mean over K1 of LSE over K2
        b_to_a = torch.logsumexp(scaled, dim=-2).mean(dim=-1)  # mean over K2 of LSE over K1
        return (a_to_b + b_to_a) / (2 * temperature)

    return _chunked(reduce, a, b, normalize, chunk_size)
