"""Multi-vector (set-embedding) items: max-similarity shortlist, exact Smooth-Chamfer re-rank.

A set model embeds every item as ``K`` slot vectors. The gallery indexes every slot vector;
a query set ``[K1,D]`` searches with each of its slots, an item's shortlist score is the
largest slot-to-slot cosine (max-of-max), and the ``shortlist`` best items are re-ranked
exactly with Smooth-Chamfer (DivE; ``models.similarity.smooth_chamfer``):

    SC(A, B) = 1/2 [ 1/(K1 T) Σ_i log Σ_j exp(T s_ij) + 1/(K2 T) Σ_j log Σ_i exp(T s_ij) ]

Max-of-max is an upper bound on every set similarity's "best pair", so items with a strong
matching slot are never missed; recall against brute-force Smooth-Chamfer over the whole
gallery is measured in ``tests/index/test_multivector.py`` and ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from index.gallery import Gallery, Hit

logger = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 16.0  # DivE's alpha; matches models.similarity
DEFAULT_SHORTLIST = 200  # items re-ranked exactly per query when the caller gives none


def smooth_chamfer_np(
    a: np.ndarray, b: np.ndarray, temperature: float = DEFAULT_TEMPERATURE
) -> np.ndarray:
    """Numpy Smooth-Chamfer of ``a [N,K1,D]`` and ``b [M,K2,D]`` (normalised) -> ``[N,M]``."""
    s = np.einsum("nid,mjd->nmij", a, b) * temperature  # [N,M,K1,K2]

    def lse(x: np.ndarray, axis: int) -> np.ndarray:
        top = x.max(axis=axis, keepdims=True)
        return np.squeeze(top, axis) + np.log(np.exp(x - top).sum(axis=axis))

    a_to_b = lse(s, -1).mean(-1)
    b_to_a = lse(s, -2).mean(-1)
    return ((a_to_b + b_to_a) / (2 * temperature)).astype(np.float32)


def set_similarity(
    a: np.ndarray, b: np.ndarray, temperature: float = DEFAULT_TEMPERATURE
) -> np.ndarray:
    """Smooth-Chamfer ``[N,M]`` via ``models.similarity`` (torch), numpy as a fallback."""
    try:
        import torch

        # imported by name: index depends on models.similarity only, and only optionally
        smooth_chamfer = importlib.import_module("models.similarity").smooth_chamfer
    except ImportError:
        return smooth_chamfer_np(a, b, temperature)
    with torch.no_grad():
        out = smooth_chamfer(
            torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)),
            temperature=temperature,
            normalize=False,
        )
    return out.numpy().astype(np.float32, copy=False)


def smooth_chamfer_shortlist(
    query: np.ndarray, sets: np.ndarray, temperature: float = DEFAULT_TEMPERATURE
) -> np.ndarray:
    """Smooth-Chamfer of one query set ``[K1,D]`` with each of ``sets [n,K2,D]`` -> ``[n]``.

    The same maths as :func:`smooth_chamfer_np` for ``N = 1``, batched over the whole
    shortlist: one matrix product for every slot pair, then max-shifted logsumexps.
    """
    n, k2, d = sets.shape
    s = (sets.reshape(n * k2, d) @ query.T).reshape(n, k2, -1) * temperature  # [n,K2,K1]

    def lse(x: np.ndarray, axis: int) -> np.ndarray:
        top = x.max(axis=axis, keepdims=True)
        return np.squeeze(top, axis) + np.log(np.exp(x - top).sum(axis=axis))

    a_to_b = lse(s, 1).mean(-1)  # query slot i: log sum_j exp(T s_ij), mean over i
    b_to_a = lse(s, 2).mean(-1)  # item slot j: log sum_i exp(T s_ij), mean over j
    return ((a_to_b + b_to_a) / (2 * temperature)).astype(np.float32)


def search_multivector(
    gallery: Gallery,
    queries: np.ndarray,
    k: int,
    filter: dict[str, Any] | None = None,
    shortlist: int | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
) -> list[list[Hit]]:
    """Top-``k`` set items for query sets ``[Q,K1,D]``: max-of-max shortlist, SC re-rank.

    Ties: equal max-of-max scores (shortlist cut) and equal Smooth-Chamfer scores (result
    order) go to the lower dense item index, i.e. the item added first.
    """
    from index.gallery import Hit

    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 3 or q.shape[2] != gallery.dim:
        raise ValueError(f"set queries must be [Q,K,{gallery.dim}], got {list(q.shape)}")
    n_q, k1, _ = q.shape
    n = max(k, shortlist or DEFAULT_SHORTLIST)
    per_slot = gallery.search_candidates(q.reshape(n_q * k1, -1), n, filter)
    out: list[list[Hit]] = []
    for row in range(n_q):
        cands = per_slot[row * k1 : (row + 1) * k1]
        idx = np.concatenate([c.idx for c in cands])
        if not len(idx):
            out.append([])
            continue
        scores = np.concatenate([c.scores for c in cands])
        order = np.lexsort((idx, -scores))  # best first, ties to the lower index
        idx = idx[order]
        _, first = np.unique(idx, return_index=True)  # each item's best (first) slot pair
        short = idx[np.sort(first)[:n]]
        sc = smooth_chamfer_shortlist(q[row], gallery.set_vectors(short), temperature)
        hits = []
        for i in np.lexsort((short, -sc)).tolist():
            item_id = gallery.item_id(int(short[i]))
            if item_id is not None:  # None: removed since the shortlist was drawn
                hits.append(Hit(item_id, float(sc[i])))
                if len(hits) == k:
                    break
        out.append(hits)
    return out


def brute_force_multivector(
    gallery: Gallery, queries: np.ndarray, k: int, temperature: float = DEFAULT_TEMPERATURE
) -> list[list[Hit]]:
    """Exact Smooth-Chamfer top-``k`` over the whole gallery (the reference for recall)."""
    from index.gallery import Hit

    ids, vectors, _ = gallery.vectors_matrix()
    items = vectors.reshape(len(ids), gallery.num_vectors, gallery.dim)
    sc = set_similarity(np.asarray(queries, dtype=np.float32), items, temperature)
    order = np.argsort(-sc, axis=1, kind="stable")[:, :k]
    return [[Hit(ids[i], float(sc[r, i])) for i in order[r]] for r in range(len(sc))]
