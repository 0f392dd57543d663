"""QB-Norm (Bogolin et al., CVPR 2022): querybank normalisation with Dynamic Inverted Softmax.

Hubs (gallery items that are near many queries) crowd result lists. QB-Norm divides a
query-to-item similarity by how strongly a bank of typical queries (training captions)
already "wants" that item:

    IS(q, g) = exp(β s_qg) / Σ_b exp(β s_bg)                  (inverted softmax)

Dynamic Inverted Softmax (DIS) applies it only to queries whose top-1 item is in the
*activation set*: items that are in the top-``k`` of at least one bank query (the likely
hubs); other queries keep their raw ranking. Everything here is computed in log space,
``β s − logsumexp_b(β s_b)``, so no ``exp`` overflows at any β or similarity scale.

Two forms:

- :func:`dynamic_inverted_softmax` / :func:`inverted_softmax`: the dense numpy form used by
  evaluation, ``[Q,G]`` in, ``[Q,G]`` out (inputs are never modified). It ranks like the
  reference implementation (ioanacroi/qb-norm ``dynamic_inverted_softmax.py``).
- :class:`QBNormalizer`: the serving form. Per item it keeps the log-normaliser
  ``L_g = logsumexp_b(β s_bg)``, and per bank query its top-``k`` items (whose union is the
  activation set). Both are computed once per (bank version, gallery) with one pass of the
  bank over the gallery, then kept current on every upsert/remove (one pass over the bank per
  new item; a removal re-searches only the bank queries whose top-``k`` lost an item). A
  query pays only for its shortlist: gallery search, then ``O(shortlist)`` arithmetic.

What a normalised score means (``Hit.norm_score``), so it stays comparable across queries:
``norm_score = s − L_g / β``, in cosine units: the query's similarity to the item minus a
soft maximum of the bank's similarities to that same item (``L_g / β`` ≥ the bank's best
similarity to ``g``). Positive means "this query is closer to the item than any bank query
is"; it depends only on the query, the item and the fixed bank, never on the other results.
Ranking by it equals ranking by ``IS``. For a DIS query whose top-1 item is *not* activated
the ranking stays raw, and every hit of that query gets ``s − L_top1 / β`` (the raw score
shifted by the top-1 item's normaliser): the order is the raw order, and the top hit carries
its true normalised score, so top scores compare across queries in the same units.
``Hit.score`` is always the raw cosine (or Smooth-Chamfer for set models).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from index.gallery import Gallery, Hit, Record

if TYPE_CHECKING:
    from index.querybank import QueryBank

logger = logging.getLogger(__name__)

_COLUMN_CHUNK = 8192  # gallery columns per step when reducing over the bank (bounds memory)


class QBNormConfig(BaseModel):
    """QB-Norm knobs (nested in the service ``Settings`` as ``qbnorm``)."""

    mode: Literal["dis", "is", "off"] = Field(
        default="dis", description="dis: dynamic inverted softmax; is: always; off: raw"
    )
    beta: float = Field(
        default=20.0, description="inverse temperature (the paper and reference default: 20)"
    )
    k: int = Field(default=1, description="activation set: top-k items of each bank query")
    shortlist: int = Field(
        default=1000, description="raw candidates per query that are normalised and re-ranked"
    )


# --------------------------------------------------------------------------------------
# dense form
# --------------------------------------------------------------------------------------


def _logsumexp0(x: np.ndarray) -> np.ndarray:
    """logsumexp over axis 0 of a 2-D array, column-chunked, float64."""
    out = np.empty(x.shape[1], dtype=np.float64)
    for start in range(0, x.shape[1], _COLUMN_CHUNK):
        c = np.asarray(x[:, start : start + _COLUMN_CHUNK], dtype=np.float64)
        top = c.max(axis=0)
        top = np.where(np.isfinite(top), top, 0.0)
        out[start : start + c.shape[1]] = top + np.log(np.exp(c - top).sum(axis=0))
    return out


def log_normalisers(bank_sims: np.ndarray, beta: float) -> np.ndarray:
    """``L_g = logsumexp_b(β s_bg)`` for every gallery column of ``bank_sims [B,G]``."""
    return _logsumexp0(beta * np.asarray(bank_sims, dtype=np.float64))


def activation_set(bank_sims: np.ndarray, k: int = 1) -> np.ndarray:
    """Sorted gallery indices in the top-``k`` of at least one bank row of ``[B,G]``."""
    bank_sims = np.asarray(bank_sims)
    k = min(int(k), bank_sims.shape[1])
    if k == 1:
        top = np.argmax(bank_sims, axis=1)
    else:
        top = np.argpartition(-bank_sims, k - 1, axis=1)[:, :k]
    return np.unique(top)


def _normalise_rows(
    sims: np.ndarray, lognorm: np.ndarray, beta: float, rows: np.ndarray, log_space: bool
) -> np.ndarray:
    out = np.array(sims, dtype=np.float64, copy=True)
    normed = beta * out[rows] - lognorm[None, :]
    out[rows] = normed if log_space else np.exp(normed)
    return out


def inverted_softmax(
    sims: np.ndarray, bank_sims: np.ndarray, beta: float, log_space: bool = True
) -> np.ndarray:
    """Plain inverted softmax of every row of ``sims [Q,G]`` against ``bank_sims [B,G]``.

    Returns float64 ``β s − L_g`` (``log_space=True``, never overflows) or its ``exp``.
    """
    sims = np.asarray(sims)
    lognorm = log_normalisers(bank_sims, beta)
    return _normalise_rows(sims, lognorm, beta, np.arange(sims.shape[0]), log_space)


def dynamic_inverted_softmax(
    sims: np.ndarray, bank_sims: np.ndarray, beta: float, k: int = 1, log_space: bool = True
) -> np.ndarray:
    """Dense Dynamic Inverted Softmax (QB-Norm) -> new ``[Q,G]`` float64 array.

    Args:
        sims: ``[Q,G]`` similarities of the evaluated queries to the gallery.
        bank_sims: ``[B,G]`` similarities of the querybank to the same gallery.
        beta: inverse temperature (20 in the paper).
        k: activation set = gallery items in the top-``k`` of some bank query.
        log_space: return ``β s − logsumexp_b(β s_b)`` for normalised rows (default; same
            ranking as the reference's ``exp(β s) / Σ_b exp(β s_b)`` without overflow), or
            the ratio itself.

    Rows whose top-1 item is in the activation set are normalised; the others keep their
    raw similarities. Rankings within each row equal the reference's. Inputs are untouched.
    """
    sims = np.asarray(sims)
    bank_sims = np.asarray(bank_sims)
    if sims.ndim != 2 or bank_sims.ndim != 2 or sims.shape[1] != bank_sims.shape[1]:
        raise ValueError(
            f"need sims [Q,G] and bank_sims [B,G]; got {sims.shape}, {bank_sims.shape}"
        )
    active = np.zeros(sims.shape[1], dtype=bool)
    active[activation_set(bank_sims, k)] = True
    rows = np.flatnonzero(active[np.argmax(sims, axis=1)])
    return _normalise_rows(sims, log_normalisers(bank_sims, beta), beta, rows, log_space)


# --------------------------------------------------------------------------------------
# serving form
# --------------------------------------------------------------------------------------


def _item_scores(bank: np.ndarray, vectors: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Bank-to-item similarities ``[B, n_items]``: best vector per item (as the gallery
    search scores items), or Smooth-Chamfer for set banks ``[B,K,D]``."""
    if bank.ndim == 2:
        s = bank @ vectors.T  # [B, n_vec]
        return np.maximum.reduceat(s, offsets[:-1], axis=1)
    from index.multivector import set_similarity

    n_items = len(offsets) - 1
    items = vectors.reshape(n_items, -1, vectors.shape[1])
    return set_similarity(bank, items)


class QBNormalizer:
    """Serving-time QB-Norm over one gallery and one querybank (see the module docstring).

    Build it with :meth:`fit` (attaches to the gallery so later upserts/removes update the
    state incrementally), then call :meth:`search` or :meth:`apply` on raw shortlists.

    Args:
        bank: ``[B,D]`` bank query vectors (``[B,K,D]`` for set models), L2-normalised.
        config: mode, beta, k, shortlist.
        bank_version: the querybank version these vectors came from.
    """

    def __init__(
        self, bank: np.ndarray, config: QBNormConfig | None = None, bank_version: int = 0
    ) -> None:
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        if self.bank.ndim not in (2, 3) or len(self.bank) == 0:
            raise ValueError(f"bank must be a non-empty [B,D] or [B,K,D], got {self.bank.shape}")
        self.config = config or QBNormConfig()
        self.bank_version = bank_version
        self.gallery_version: int | None = None
        self._lock = threading.RLock()
        self._gallery: Gallery | None = None
        self._lognorm: dict[str, float] = {}
        kk = max(1, self.config.k)
        self._top_scores = np.full((len(self.bank), kk), -np.inf, dtype=np.float32)
        self._top_ids = np.full((len(self.bank), kk), None, dtype=object)
        self._active: frozenset[str] = frozenset()

    @classmethod
    def from_bank(cls, bank: QueryBank, config: QBNormConfig | None = None) -> QBNormalizer:
        return cls(bank.vectors, config, bank.version)

    @property
    def key(self) -> tuple[int, int | None]:
        """(bank version, gallery version) the state was computed for."""
        return self.bank_version, self.gallery_version

    @property
    def active_ids(self) -> frozenset[str]:
        """The activation set: items in the top-k of at least one bank query."""
        return self._active

    def lognorm(self, item_id: str) -> float | None:
        return self._lognorm.get(item_id)

    # ---- building and incremental updates ---------------------------------------------

    def fit(self, gallery: Gallery, batch_items: int = 4096, attach: bool = True) -> QBNormalizer:
        """One pass of the bank over every gallery item; optionally follow its changes."""
        with gallery._lock, self._lock:
            self._lognorm.clear()
            self._top_scores.fill(-np.inf)
            self._top_ids.fill(None)
            for ids, vectors, offsets in gallery.iter_vectors(batch_items):
                self._add_items(ids, vectors, offsets)
            self._active = self._activation()
            self._gallery = gallery
            self.gallery_version = gallery.version
            if attach:
                gallery.add_listener(self.update)
        logger.info(
            "qbnorm: fitted bank v%d (%d queries) over %d items, %d activated",
            self.bank_version,
            len(self.bank),
            len(self._lognorm),
            len(self._active),
        )
        return self

    def detach(self) -> None:
        """Stop following the gallery (e.g. when a new bank version replaces this one)."""
        if self._gallery is not None:
            with contextlib.suppress(ValueError):  # already detached
                self._gallery.remove_listener(self.update)

    def update(self, upserted: list[Record], removed: list[str]) -> None:
        """Gallery listener: keep normalisers and activation set current."""
        with self._lock:
            gone = set(removed) | {r.id for r in upserted if r.id in self._lognorm}
            for item_id in gone:
                self._lognorm.pop(item_id, None)
            stale = np.zeros(len(self.bank), dtype=bool)
            if gone:
                hit = np.isin(self._top_ids, list(gone))
                stale = np.asarray(hit.any(axis=1), dtype=bool)
                self._top_scores[hit] = -np.inf
                self._top_ids[hit] = None
            if upserted:
                counts = np.array([len(r.vectors) for r in upserted], dtype=np.int64)
                offsets = np.concatenate([[0], np.cumsum(counts)])
                self._add_items(
                    [r.id for r in upserted], np.concatenate([r.vectors for r in upserted]), offsets
                )
            if stale.any() and self._gallery is not None:
                self._refill(np.flatnonzero(stale))
            self._active = self._activation()
            if self._gallery is not None:
                self.gallery_version = self._gallery.version

    def _add_items(self, ids: list[str], vectors: np.ndarray, offsets: np.ndarray) -> None:
        s = _item_scores(self.bank, vectors, offsets)  # [B, n]
        lse = log_normalisers(s, self.config.beta)
        self._lognorm.update(zip(ids, lse.tolist(), strict=True))
        # merge into each bank query's running top-k
        kk = self._top_scores.shape[1]
        all_s = np.concatenate([self._top_scores, s.astype(np.float32)], axis=1)
        all_i = np.concatenate(
            [self._top_ids, np.array(ids, dtype=object)[None].repeat(len(s), 0)], 1
        )
        part = np.argpartition(-all_s, kk - 1, axis=1)[:, :kk]
        self._top_scores = np.take_along_axis(all_s, part, 1)
        self._top_ids = np.take_along_axis(all_i, part, 1)

    def _refill(self, rows: np.ndarray) -> None:
        """Recompute the top-k of bank queries that lost an item (search the gallery)."""
        assert self._gallery is not None
        kk = self._top_scores.shape[1]
        hits = self._gallery.search(self.bank[rows], kk)
        for row, row_hits in zip(rows, hits, strict=True):
            self._top_scores[row] = -np.inf
            self._top_ids[row] = None
            for j, h in enumerate(row_hits):
                self._top_scores[row, j] = h.score
                self._top_ids[row, j] = h.id

    def _activation(self) -> frozenset[str]:
        return frozenset(i for i in self._top_ids.ravel().tolist() if i is not None)

    # ---- query time -------------------------------------------------------------------

    def apply(self, hits: list[list[Hit]], mode: str | None = None) -> list[list[Hit]]:
        """Normalise and re-rank raw shortlists (each sorted or not); see the module doc."""
        mode = mode or self.config.mode
        if mode == "off":
            return [sorted(row, key=lambda h: -h.score) for row in hits]
        beta = self.config.beta
        out: list[list[Hit]] = []
        with self._lock:
            for row in hits:
                if not row:
                    out.append([])
                    continue
                row = sorted(row, key=lambda h: -h.score)
                lognorm = np.array([self._item_lognorm(h.id) for h in row])
                raw = np.array([h.score for h in row])
                if mode == "is" or row[0].id in self._active:
                    norm = raw - lognorm / beta
                    order = np.argsort(-norm, kind="stable")
                else:
                    norm = raw - lognorm[0] / beta
                    order = np.arange(len(row))
                out.append([replace(row[i], norm_score=float(norm[i])) for i in order])
        return out

    def _item_lognorm(self, item_id: str) -> float:
        value = self._lognorm.get(item_id)
        if value is None:  # an item the listener has not seen (e.g. not attached)
            rec = self._gallery.get(item_id) if self._gallery is not None else None
            if rec is None:
                raise KeyError(f"qbnorm: no normaliser for item {item_id!r}")
            s = _item_scores(self.bank, rec.vectors, np.array([0, len(rec.vectors)]))
            value = float(log_normalisers(s, self.config.beta)[0])
            self._lognorm[item_id] = value
        return value

    def search(
        self,
        queries: np.ndarray,
        k: int,
        filter: dict[str, Any] | None = None,
        mode: str | None = None,
        shortlist: int | None = None,
    ) -> list[list[Hit]]:
        """Gallery search of ``shortlist`` raw candidates, normalised, top-``k`` kept."""
        if self._gallery is None:
            raise RuntimeError("QBNormalizer.search needs fit(gallery) first")
        n = max(k, shortlist or self.config.shortlist)
        if (mode or self.config.mode) == "off":
            n = k
        raw = self._gallery.search(queries, n, filter=filter)
        return [row[:k] for row in self.apply(raw, mode)]


def rank_agreement(a: Iterable[list[Hit]], b: Iterable[list[Hit]], k: int = 10) -> float:
    """Fraction of queries whose top-``k`` id lists are identical."""
    pairs = list(zip(a, b, strict=True))
    same = sum([h.id for h in x[:k]] == [h.id for h in y[:k]] for x, y in pairs)
    return same / max(1, len(pairs))
