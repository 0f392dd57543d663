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
  query pays only for its shortlist: gallery search, then ``O(shortlist)`` arithmetic. The
  shortlist is adaptive: it starts at 64 and grows (x4, up to ``shortlist``) only while an
  item outside it could still enter the top-``k`` (bound: raw score ≤ the last candidate's,
  ``L`` ≥ the smallest ``L``), so with an exact index the result is provably the dense
  form's whenever the bound is met before the cap.

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

from index.gallery import Gallery
from index.multivector import search_items, set_similarity
from index.records import Candidates, Hit, Record

if TYPE_CHECKING:
    from index.querybank import QueryBank

logger = logging.getLogger(__name__)

_COLUMN_CHUNK = 2048  # gallery columns per step when reducing over the bank (bounds memory)
MIN_ADAPTIVE_SHORTLIST = 64  # first shortlist of the adaptive search
_REFILL_MARGIN = 16  # extra gallery hits a refill re-scores, so ties at the k-th place are seen


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
        default=1000, description="most raw candidates per query normalised and re-ranked"
    )
    adaptive: bool = Field(
        default=True,
        description="start small and grow the shortlist (x4) only until the top-k is provably "
        "the same as over the whole gallery, or the shortlist cap is reached",
    )


# --------------------------------------------------------------------------------------
# dense form
# --------------------------------------------------------------------------------------


def log_normalisers(bank_sims: np.ndarray, beta: float) -> np.ndarray:
    """``L_g = logsumexp_b(β s_bg)`` for every gallery column of ``bank_sims [B,G]`` (float64,
    computed in column chunks so the float64 temporaries stay small)."""
    bank_sims = np.asarray(bank_sims)
    out = np.empty(bank_sims.shape[1], dtype=np.float64)
    for start in range(0, bank_sims.shape[1], _COLUMN_CHUNK):
        c = bank_sims[:, start : start + _COLUMN_CHUNK].astype(np.float64) * beta
        top = c.max(axis=0)
        top = np.where(np.isfinite(top), top, 0.0)
        c -= top
        np.exp(c, out=c)
        out[start : start + c.shape[1]] = top + np.log(c.sum(axis=0))
    return out


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


def normalised_scores(
    sims: np.ndarray, bank_sims: np.ndarray, beta: float, k: int = 1, mode: str = "dis"
) -> np.ndarray:
    """Dense ``[Q,G]`` float64 of what the serving form puts in ``Hit.norm_score``.

    In cosine units: ``s − L_g/β`` for a normalised row (``mode="is"``, or a DIS row whose
    top-1 item is activated), ``s − L_top1/β`` for every item of a DIS row that stays raw (its
    order is the raw order). Used to study scores across queries (thresholds, calibration).
    """
    sims = np.asarray(sims, dtype=np.float64)
    lognorm = log_normalisers(bank_sims, beta)
    top1 = np.argmax(sims, axis=1)
    if mode == "is":
        rows = np.ones(len(sims), dtype=bool)
    else:
        active = np.zeros(sims.shape[1], dtype=bool)
        active[activation_set(bank_sims, k)] = True
        rows = active[top1]
    shift = np.where(rows[:, None], lognorm[None, :], lognorm[top1][:, None])
    return sims - shift / beta


# --------------------------------------------------------------------------------------
# serving form
# --------------------------------------------------------------------------------------


def _item_scores(
    bank: np.ndarray,
    vectors: np.ndarray,
    offsets: np.ndarray,
    bank64: np.ndarray | None = None,
) -> np.ndarray:
    """Bank-to-item similarities ``[B, n_items]``: best vector per item (as the gallery
    search scores items), or Smooth-Chamfer for set banks ``[B,K,D]``.

    Single-vector scores are accumulated in float64 and rounded to float32, so one
    (query, item) pair gets the same bits whatever batch it is scored in (BLAS blocking
    changes float32 sums in the last bit); equal vectors then tie exactly, and
    :func:`_top_k` breaks the tie by a fixed rule instead of by scoring order. ``bank64``:
    ``bank`` in float64 already (the same numbers; saves converting it on every call).
    """
    if bank.ndim == 2:
        wide = bank64 if bank64 is not None else bank.astype(np.float64)
        s = (wide @ vectors.astype(np.float64).T).astype(np.float32)
        return np.maximum.reduceat(s, offsets[:-1], axis=1)
    n_items = len(offsets) - 1
    items = vectors.reshape(n_items, -1, vectors.shape[1])
    return set_similarity(bank, items)


def _top_k(scores: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``scores``/``idx [B, n]``, the ``k`` best entries, best first.

    Tie rule: higher score first; equal scores go to the lower gallery index (the item
    registered first), and empty slots (``idx == -1``, score ``-inf``) last. This is what
    makes an incrementally updated normaliser equal to a fresh fit on every path.
    """
    tie_idx = np.where(idx < 0, np.iinfo(np.int64).max, idx)
    order = np.lexsort((tie_idx, -scores.astype(np.float64)), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(idx, order, 1)


class QBNormalizer:
    """Serving-time QB-Norm over one gallery and one querybank (see the module docstring).

    Build it with :meth:`fit` (attaches to the gallery so later upserts/removes update the
    state incrementally), then call :meth:`search`, or :meth:`apply` on raw hit lists.
    State is kept in arrays indexed by the gallery's dense item index, so a query's
    shortlist is normalised with a few vectorised numpy operations.

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
        self._lognorm = np.full(0, np.nan)  # by gallery item index; NaN = not computed
        self._active = np.zeros(0, dtype=bool)  # by gallery item index
        kk = max(1, self.config.k)
        self._top_scores = np.full((len(self.bank), kk), -np.inf, dtype=np.float32)
        self._top_idx = np.full((len(self.bank), kk), -1, dtype=np.int64)
        self._lognorm_min = np.inf  # min L over items ever seen (a safe bound after removals)
        self._bank64: np.ndarray | None = None  # the bank in float64, made by the first scoring
        self.stats = {"queries": 0, "candidates": 0, "exact": 0}  # search(): shortlist use

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
        g = self._require_gallery()
        ids = (g.item_id(int(i)) for i in np.flatnonzero(self._active))
        return frozenset(i for i in ids if i is not None)

    def lognorm(self, item_id: str) -> float | None:
        """``logsumexp_b(β s_b)`` for a live item, or None."""
        idx = self._require_gallery().item_index(item_id)
        if idx is None or idx >= len(self._lognorm) or np.isnan(self._lognorm[idx]):
            return None
        return float(self._lognorm[idx])

    def _require_gallery(self) -> Gallery:
        if self._gallery is None:
            raise RuntimeError("QBNormalizer needs fit(gallery) first")
        return self._gallery

    # ---- building and incremental updates ---------------------------------------------

    def fit(self, gallery: Gallery, batch_items: int = 4096, attach: bool = True) -> QBNormalizer:
        """One pass of the bank over every gallery item; optionally follow its changes."""
        with gallery.lock, self._lock:
            self._gallery = gallery
            self._lognorm = np.full(gallery.index_capacity, np.nan)
            self._top_scores.fill(-np.inf)
            self._top_idx.fill(-1)
            self._lognorm_min = np.inf
            for ids, vectors, offsets in gallery.iter_vectors(batch_items):
                self._add_items(ids, vectors, offsets)
            self._refresh_active()
            self.gallery_version = gallery.version
            if attach:
                gallery.add_listener(self.update)
        logger.info(
            "qbnorm: fitted bank v%d (%d queries) over %d items, %d activated",
            self.bank_version,
            len(self.bank),
            len(gallery),
            int(self._active.sum()),
        )
        return self

    def detach(self) -> None:
        """Stop following the gallery (e.g. when a new bank version replaces this one)."""
        if self._gallery is not None:
            with contextlib.suppress(ValueError):  # already detached
                self._gallery.remove_listener(self.update)

    def update(self, upserted: list[Record], removed: list[str]) -> None:
        """Gallery listener (called after the gallery applied the change): keep normalisers
        and the activation set current."""
        g = self._require_gallery()
        with self._lock:
            # bank top-k entries whose item was removed or replaced (its index is now dead)
            flat = self._top_idx.ravel().tolist()
            dead = np.array([i >= 0 and g.item_id(i) is None for i in flat]).reshape(
                self._top_idx.shape
            )
            stale = dead.any(axis=1)
            self._top_scores[dead] = -np.inf
            self._top_idx[dead] = -1
            if upserted:
                counts = np.array([len(r.vectors) for r in upserted], dtype=np.int64)
                offsets = np.concatenate([[0], np.cumsum(counts)])
                vectors = np.concatenate([r.vectors for r in upserted])
                self._add_items([r.id for r in upserted], vectors, offsets)
            if stale.any():
                self._refill(np.flatnonzero(stale))
            self._refresh_active()
            self.gallery_version = g.version

    def _add_items(self, ids: list[str], vectors: np.ndarray, offsets: np.ndarray) -> None:
        g = self._require_gallery()
        idx = np.array([g.item_index(i) for i in ids], dtype=np.int64)
        if len(idx) and idx.max() >= len(self._lognorm):
            grow = max(int(idx.max()) + 1, 2 * len(self._lognorm)) - len(self._lognorm)
            self._lognorm = np.concatenate([self._lognorm, np.full(grow, np.nan)])
        if self._bank64 is None and self.bank.ndim == 2:
            # every upsert scores its items against the whole bank in float64: converting
            # the bank once, not per batch, halves that work (the copy is 2x the bank's size)
            self._bank64 = self.bank.astype(np.float64)
        s = _item_scores(self.bank, vectors, offsets, self._bank64)  # [B, n]
        lse = log_normalisers(s, self.config.beta)
        self._lognorm[idx] = lse
        if len(lse):
            self._lognorm_min = min(self._lognorm_min, float(lse.min()))
        # merge into each bank query's running top-k; only rows where a new item scores at
        # least the row's worst kept score can change (below it, an item never enters,
        # whatever its index), and most rows of a large bank are not among them
        kk = self._top_scores.shape[1]
        s = s.astype(np.float32)
        rows = np.flatnonzero((s >= self._top_scores.min(axis=1, keepdims=True)).any(axis=1))
        if len(rows):
            all_s = np.concatenate([self._top_scores[rows], s[rows]], axis=1)
            all_i = np.concatenate(
                [self._top_idx[rows], np.broadcast_to(idx, (len(rows), len(idx)))], axis=1
            )
            self._top_scores[rows], self._top_idx[rows] = _top_k(all_s, all_i, kk)

    def _refill(self, rows: np.ndarray) -> None:
        """Recompute the top-k of bank queries that lost an item: the gallery search gives a
        shortlist with room for ties, which is re-scored exactly as :meth:`_add_items`
        scores items, so the same tie rule decides (see :func:`_top_k`)."""
        g = self._require_gallery()
        kk = self._top_scores.shape[1]
        n = 4 * kk + _REFILL_MARGIN
        for row, hits in zip(rows, search_items(g, self.bank[rows], n), strict=True):
            self._top_scores[row] = -np.inf
            self._top_idx[row] = -1
            recs = [r for r in (g.get(h.id) for h in hits) if r is not None]
            if not recs:
                continue
            idx = np.array([g.item_index(r.id) for r in recs], dtype=np.int64)[None]
            counts = np.array([len(r.vectors) for r in recs], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(counts)])
            vectors = np.concatenate([r.vectors for r in recs])
            s = _item_scores(self.bank[row : row + 1], vectors, offsets).astype(np.float32)
            top_s, top_i = _top_k(s, idx, kk)
            self._top_scores[row, : top_s.shape[1]] = top_s[0]
            self._top_idx[row, : top_i.shape[1]] = top_i[0]

    def _refresh_active(self) -> None:
        active = np.zeros(len(self._lognorm), dtype=bool)
        top = self._top_idx[self._top_idx >= 0]
        active[top[top < len(active)]] = True
        self._active = active

    # ---- query time -------------------------------------------------------------------

    def _lognorms(self, idx: np.ndarray) -> np.ndarray:
        g = self._require_gallery()
        out = np.full(len(idx), np.nan)
        inside = idx < len(self._lognorm)
        out[inside] = self._lognorm[idx[inside]]
        for j in np.flatnonzero(np.isnan(out)):  # an item the listener has not seen
            item_id = g.item_id(int(idx[j]))
            rec = g.get(item_id) if item_id is not None else None
            if rec is None:
                raise KeyError(f"qbnorm: no normaliser for item index {idx[j]}")
            s = _item_scores(self.bank, rec.vectors, np.array([0, len(rec.vectors)]), self._bank64)
            out[j] = log_normalisers(s, self.config.beta)[0]
        return out

    def _is_active(self, idx: int) -> bool:
        return idx < len(self._active) and bool(self._active[idx])

    def _rank(self, idx: np.ndarray, raw: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """Order and normalised scores for one shortlist sorted by raw score (best first)."""
        lognorm = self._lognorms(idx)
        beta = self.config.beta
        if mode == "is" or self._is_active(int(idx[0])):
            norm = raw.astype(np.float64) - lognorm / beta
            return np.argsort(-norm, kind="stable"), norm
        return np.arange(len(idx)), raw.astype(np.float64) - lognorm[0] / beta

    def apply(self, hits: list[list[Hit]], mode: str | None = None) -> list[list[Hit]]:
        """Normalise and re-rank raw hit lists (all candidates kept; see the module doc)."""
        mode = mode or self.config.mode
        if mode == "off":
            return [sorted(row, key=lambda h: -h.score) for row in hits]
        g = self._require_gallery()
        out: list[list[Hit]] = []
        with self._lock:
            for row in hits:
                row = sorted(row, key=lambda h: -h.score)
                if not row:
                    out.append([])
                    continue
                idx = np.array([g.item_index(h.id) for h in row], dtype=np.int64)
                order, norm = self._rank(idx, np.array([h.score for h in row]), mode)
                out.append([replace(row[i], norm_score=float(norm[i])) for i in order])
        return out

    def search(
        self,
        queries: np.ndarray,
        k: int,
        filter: dict[str, Any] | None = None,
        mode: str | None = None,
        shortlist: int | None = None,
    ) -> list[list[Hit]]:
        """Gallery search of a raw shortlist, normalised and re-ranked, top-``k`` kept.

        ``mode`` overrides the configured mode for this call ("off" = plain search).
        """
        g = self._require_gallery()
        mode = mode or self.config.mode
        if mode == "off":
            return search_items(g, queries, k, filter=filter)
        cap = max(k, shortlist or self.config.shortlist)
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 3 or g.num_vectors > 1:  # set models: Smooth-Chamfer shortlist first
            return [row[:k] for row in self.apply(search_items(g, q, cap, filter=filter), mode)]
        if q.ndim == 1:
            q = q[None]
        n = min(cap, max(4 * k, MIN_ADAPTIVE_SHORTLIST)) if self.config.adaptive else cap
        out: list[list[Hit] | None] = [None] * len(q)
        pending = np.arange(len(q))
        with g.lock, self._lock:
            while len(pending):
                still = []
                for row, c in zip(pending, g.search_candidates(q[pending], n, filter), strict=True):
                    if len(c.idx) == 0:
                        out[row] = []
                        continue
                    order, norm = self._rank(c.idx, c.scores, mode)
                    top = order[:k]
                    # Exact once nothing outside the shortlist can enter the top-k: an unseen
                    # item has raw score <= the last candidate's and L >= the smallest L.
                    normalised = mode == "is" or self._is_active(int(c.idx[0]))
                    bound = float(c.scores[-1]) - self._lognorm_min / self.config.beta
                    exact = (
                        len(c.idx) < n  # the gallery (or filter) has no more items
                        or not normalised
                        or norm[top[-1]] >= bound
                    )
                    if exact or n >= cap:
                        hits = g.to_hits(Candidates(c.idx[top], c.scores[top], c.slots[top]))
                        out[row] = [
                            replace(h, norm_score=float(v))
                            for h, v in zip(hits, norm[top], strict=True)
                        ]
                        self.stats["queries"] += 1
                        self.stats["candidates"] += len(c.idx)
                        self.stats["exact"] += int(exact)
                    else:
                        still.append(row)
                pending = np.array(still, dtype=np.int64)
                n = min(cap, n * 4)
        return [r if r is not None else [] for r in out]


def rank_agreement(a: Iterable[list[Hit]], b: Iterable[list[Hit]], k: int = 10) -> float:
    """Fraction of queries whose top-``k`` id lists are identical."""
    pairs = list(zip(a, b, strict=True))
    same = sum([h.id for h in x[:k]] == [h.id for h in y[:k]] for x, y in pairs)
    return same / max(1, len(pairs))
