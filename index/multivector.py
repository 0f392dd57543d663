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

import logging
from typing import Any, Protocol

import numpy as np
import torch

from index.records import Candidates, Hit
from models.similarity import DEFAULT_TEMPERATURE, smooth_chamfer

logger = logging.getLogger(__name__)

DEFAULT_SHORTLIST = 200  # items re-ranked exactly per query when the caller gives none


class SetGallery(Protocol):
    """The gallery reads a set search needs (:class:`index.gallery.Gallery` has them); typed
    by shape so this module sits below the gallery and never imports it."""

    dim: int
    num_vectors: int

    def search_candidates(
        self, q: np.ndarray, n: int, filter: dict[str, Any] | None = None, group: int = 1
    ) -> list[Candidates]: ...

    def set_vectors(self, idx: np.ndarray) -> np.ndarray: ...

    def item_id(self, idx: int) -> str | None: ...

    def vectors_matrix(self) -> tuple[list[str], np.ndarray, np.ndarray]: ...


def _tensor(x: np.ndarray) -> torch.Tensor:
    """A float32 tensor sharing ``x``'s memory where it can (read-only arrays are copied:
    torch does not take them)."""
    arr = np.ascontiguousarray(x, dtype=np.float32)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def set_similarity(
    a: np.ndarray, b: np.ndarray, temperature: float = DEFAULT_TEMPERATURE
) -> np.ndarray:
    """Smooth-Chamfer of ``a [N,K1,D]`` and ``b [M,K2,D]`` (L2-normalised) -> ``[N,M]``
    float32: :func:`models.similarity.smooth_chamfer` on numpy arrays."""
    with torch.no_grad():
        out = smooth_chamfer(
            _tensor(a),
            _tensor(b),
            temperature=temperature,
            normalize=False,
        )
    return out.numpy().astype(np.float32, copy=False)


def search_items(
    gallery: Any,
    queries: np.ndarray,
    k: int,
    filter: dict[str, Any] | None = None,
    shortlist: int | None = None,
) -> list[list[Hit]]:
    """Top-``k`` items of ``gallery`` per query, whatever its kind: set galleries
    (``num_vectors > 1``, or ``[Q,K,D]`` queries) through :func:`search_multivector`, single
    vectors through ``gallery.search``. The one entry point for callers above the gallery."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 3 or gallery.num_vectors > 1:
        if q.ndim == 2 and gallery.num_vectors > 1 and q.shape[0] == gallery.num_vectors:
            q = q[None]  # one set query [K,D]
        return search_multivector(gallery, q, k, filter=filter, shortlist=shortlist)
    return list(gallery.search(q, k, filter=filter))


def search_multivector(
    gallery: SetGallery,
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
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 3 or q.shape[2] != gallery.dim:
        raise ValueError(f"set queries must be [Q,K,{gallery.dim}], got {list(q.shape)}")
    n_q, k1, _ = q.shape
    n = max(k, shortlist or DEFAULT_SHORTLIST)
    # one max-of-max shortlist per query set: its k1 slot rows searched as one group
    shortlists = gallery.search_candidates(q.reshape(n_q * k1, -1), n, filter, group=k1)
    out: list[list[Hit]] = []
    for row, cands in enumerate(shortlists):
        short = cands.idx
        if not len(short):
            out.append([])
            continue
        sc = set_similarity(q[row][None], gallery.set_vectors(short), temperature)[0]
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
    gallery: SetGallery, queries: np.ndarray, k: int, temperature: float = DEFAULT_TEMPERATURE
) -> list[list[Hit]]:
    """Exact Smooth-Chamfer top-``k`` over the whole gallery (the reference for recall)."""
    ids, vectors, _ = gallery.vectors_matrix()
    items = vectors.reshape(len(ids), gallery.num_vectors, gallery.dim)
    sc = set_similarity(np.asarray(queries, dtype=np.float32), items, temperature)
    order = np.argsort(-sc, axis=1, kind="stable")[:, :k]
    return [[Hit(ids[i], float(sc[r, i])) for i in order[r]] for r in range(len(sc))]
