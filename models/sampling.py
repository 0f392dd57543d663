"""Adaptive rank-aware negative sampling from a memory bank (VSE-ens, Guo et al. 2018).

VSE-ens applies the adaptive oversampling of Rendle & Freudenthaler (WSDM 2014) to
visual-semantic embeddings.  For a query ``q`` it draws, without scoring the whole bank:

1. a rank ``r`` in ``1..|A|`` with ``p(r) ∝ exp(-r / λ)``;
2. a factor ``f`` with ``p(f | q) ∝ |q_f| σ_f``, ``σ_f`` the std of factor ``f`` over the bank;
3. the item at rank ``r`` of factor ``f``: descending order when ``q_f > 0``, ascending
   otherwise, i.e. an item whose ``f``-th coordinate contributes a large ``q_f n_f``.

The per-factor rankings and ``σ`` are only recomputed every ``(|A| - 1) ln(|A| - 1)`` drawn
queries (as in the paper), or when the bank has doubled since the last refresh (early
growth), so a draw costs ``O(D)`` instead of scoring ``|A|`` items.  Here ``A`` is a ring
buffer of recent embeddings with their item ids; the query's own positive id is rejected and
redrawn.

In the paper ``A`` is the item catalogue, whose embeddings drift slowly between refreshes.
``one_slot_per_id=True`` gives that behaviour: an item that is already in the bank is
overwritten in its own slot, so a ranking table keeps pointing at the same items until the next
refresh. A plain ring buffer (the default) recycles slots for new items, so tables drawn
before the bank turned over point at items they were not computed for; with a bank of 4,096
and batches of 128 that happens every 32 steps, against a paper interval of ~34,000 queries.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MAX_REJECTION_ROUNDS = 8  # redraws for hits on the excluded id before a uniform fallback
EMPTY_ID = -1  # id of a bank slot that was never written


class NegativeSample(NamedTuple):
    """Negatives drawn for a batch of queries (``B`` queries, ``K`` negatives each)."""

    indices: Tensor  # [B, K] long: positions in the bank
    ids: Tensor  # [B, K] long: item ids of those positions
    embeddings: Tensor  # [B, K, D]: the bank vectors (detached, possibly stale)
    ranks: Tensor  # [B, K] long: the drawn rank r (1-based) in the chosen factor
    factors: Tensor  # [B, K] long: the drawn factor f


def default_refresh_interval(bank_items: int) -> int:
    """``(|A| - 1) ln(|A| - 1)`` drawn queries between refreshes (at least 1)."""
    if bank_items <= 2:
        return 1
    return max(1, int((bank_items - 1) * math.log(bank_items - 1)))


class AdaptiveNegativeSampler:
    """Memory bank of recent embeddings with rank-aware adaptive negative sampling.

    Args:
        bank_size: capacity of the ring buffer ``|A|``.
        dim: embedding size ``D``.
        lam: ``λ`` of ``p(r) ∝ exp(-r / λ)``, in ranks (small = harder negatives).
        refresh_every: drawn queries between refreshes of the rankings and ``σ``; ``None`` uses
            ``(|A| - 1) ln(|A| - 1)`` with ``|A|`` the number of items in the bank.
        seed: seed of the sampler's own random generator (draws are reproducible).
        max_rejections: redraw rounds for draws that hit an excluded id; what is still
            excluded afterwards is replaced by a uniform draw among the allowed items.
        one_slot_per_id: keep each id in one slot, overwritten in place by newer embeddings of
            the same item (the paper's catalogue); False = a plain ring buffer.

    The bank lives on the device and dtype of the embeddings given to ``update``.
    """

    def __init__(
        self,
        bank_size: int,
        dim: int,
        lam: float,
        refresh_every: int | None = None,
        seed: int = 0,
        max_rejections: int = MAX_REJECTION_ROUNDS,
        one_slot_per_id: bool = False,
    ) -> None:
        if bank_size < 1 or dim < 1:
            raise ValueError("bank_size and dim must be >= 1")
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        if refresh_every is not None and refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.bank_size = bank_size
        self.dim = dim
        self.lam = lam
        self.refresh_every = refresh_every
        self.max_rejections = max_rejections
        self.one_slot_per_id = one_slot_per_id
        self._slot_of: dict[int, int] = {}  # id -> slot, when one_slot_per_id
        self.generator = torch.Generator().manual_seed(seed)
        self.embeddings = torch.zeros(bank_size, dim)
        self.ids = torch.full((bank_size,), EMPTY_ID, dtype=torch.long)
        self.size = 0  # filled slots: positions 0..size-1
        self.pointer = 0  # next slot to overwrite
        self.ranking: Tensor | None = None  # [D, size_at_refresh] bank positions, descending
        self.sigma: Tensor | None = None  # [D] std of each factor over the bank
        self.rank_cdf: Tensor | None = None  # [size_at_refresh] cdf of p(r)
        self.table_size = 0
        self.steps_since_refresh = 0
        self.num_refreshes = 0

    def __len__(self) -> int:
        return self.size

    @property
    def refresh_interval(self) -> int:
        """Drawn queries between refreshes for the current bank."""
        if self.refresh_every is not None:
            return self.refresh_every
        return default_refresh_interval(self.size)

    def update(self, embeddings: Tensor, ids: Tensor) -> None:
        """Write a batch into the ring buffer, overwriting the oldest entries.

        Args:
            embeddings: ``[B, D]`` vectors (stored detached).
            ids: ``[B]`` long item ids (``>= 0``); an id may appear several times in the bank.
        """
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be [B, {self.dim}], got {tuple(embeddings.shape)}")
        if ids.shape != embeddings.shape[:1]:
            raise ValueError("ids must be [B] like embeddings")
        embeddings = embeddings.detach()[-self.bank_size :]
        ids = ids.detach()[-self.bank_size :]
        if self.embeddings.device != embeddings.device or self.embeddings.dtype != embeddings.dtype:
            self.embeddings = self.embeddings.to(embeddings)
            self.ids = self.ids.to(embeddings.device)
            self.ranking = None  # tables follow the bank to its new device
        b = embeddings.shape[0]
        if self.one_slot_per_id:
            self._update_keyed(embeddings, ids)
            return
        positions = (self.pointer + torch.arange(b, device=embeddings.device)) % self.bank_size
        self.embeddings[positions] = embeddings
        self.ids[positions] = ids.to(device=embeddings.device, dtype=torch.long)
        self.pointer = (self.pointer + b) % self.bank_size
        self.size = min(self.size + b, self.bank_size)

    def _update_keyed(self, embeddings: Tensor, ids: Tensor) -> None:
        """Known ids overwrite their own slot; new ids take the oldest slot (evicting its id)."""
        slots = []
        for item in ids.tolist():
            slot = self._slot_of.get(item)
            if slot is None:
                slot = self.pointer
                evicted = int(self.ids[slot])
                if evicted != EMPTY_ID and self._slot_of.get(evicted) == slot:
                    del self._slot_of[evicted]
                self._slot_of[item] = slot
                self.ids[slot] = item
                self.pointer = (self.pointer + 1) % self.bank_size
                self.size = min(self.size + 1, self.bank_size)
            slots.append(slot)
        positions = torch.tensor(slots, device=embeddings.device)
        self.embeddings[positions] = embeddings  # repeated ids in a batch: the last one wins

    def refresh(self) -> None:
        """Recompute the per-factor rankings, ``σ`` and the rank distribution."""
        bank = self.embeddings[: self.size]  # [A, D]
        self.ranking = bank.argsort(dim=0, descending=True).t().contiguous()  # [D, A]
        self.sigma = bank.std(dim=0, unbiased=False)  # [D]
        ranks = torch.arange(1, self.size + 1, device=bank.device, dtype=torch.float64)
        self.rank_cdf = torch.softmax(-ranks / self.lam, dim=0).cumsum(0).to(bank.dtype)
        self.table_size = self.size
        self.steps_since_refresh = 0
        self.num_refreshes += 1
        logger.debug("refreshed negative-sampling tables over %d items", self.size)

    def _uniform(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        return torch.rand(shape, generator=self.generator).to(device)

    def _draw(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """One adaptive draw per (query, negative): ``(positions, ranks, factors)``, ``[B, K]``."""
        assert self.ranking is not None and self.sigma is not None and self.rank_cdf is not None
        b, d = queries.shape
        a = self.table_size
        device = queries.device
        u_rank = self._uniform((b, k), device).to(self.rank_cdf.dtype)
        rank_index = torch.searchsorted(self.rank_cdf, u_rank * self.rank_cdf[-1], right=True)
        rank_index = rank_index.clamp(max=a - 1)  # [B, K], 0-based rank
        weights = queries.abs() * self.sigma.to(queries.dtype)  # [B, D] p(f|q) ∝ |q_f| σ_f
        total = weights.sum(dim=-1, keepdim=True)
        weights = torch.where(total > 0, weights, torch.ones_like(weights))  # degenerate: uniform
        factor_cdf = weights.cumsum(dim=-1)
        u_factor = self._uniform((b, k), device).to(factor_cdf.dtype) * factor_cdf[:, -1:]
        factors = torch.searchsorted(factor_cdf, u_factor, right=True).clamp(max=d - 1)  # [B, K]
        descending = queries.gather(1, factors) > 0  # [B, K]
        position_in_ranking = torch.where(descending, rank_index, a - 1 - rank_index)
        positions = self.ranking[factors, position_in_ranking]  # [B, K]
        return positions, rank_index + 1, factors

    def sample(
        self, queries: Tensor, exclude_ids: Tensor | None = None, num_negatives: int = 1
    ) -> NegativeSample:
        """Draw ``num_negatives`` hard negatives per query from the bank.

        Args:
            queries: ``[B, D]`` query embeddings (e.g. images when mining captions).
            exclude_ids: ``[B]`` id never to return for each query (its positive); ``None``
                excludes nothing.
            num_negatives: negatives per query ``K``.

        Returns:
            A ``NegativeSample`` with bank ``indices``, their ``ids`` and ``embeddings``, and the
            drawn ``ranks`` and ``factors``, each ``[B, K]`` (embeddings ``[B, K, D]``).
            Where no negative exists (empty bank, or a bank holding only the query's
            excluded id) ``indices`` and ``ids`` are ``EMPTY_ID`` (-1) and the embeddings 0.
            Each query counts as one step towards the next refresh.
        """
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [B, {self.dim}], got {tuple(queries.shape)}")
        b = queries.shape[0]
        device = self.embeddings.device
        if self.size == 0:  # nothing to draw from yet: every slot is EMPTY_ID
            empty = torch.full((b, num_negatives), EMPTY_ID, dtype=torch.long, device=device)
            vectors = self.embeddings.new_zeros(b, num_negatives, self.dim)
            return NegativeSample(empty, empty.clone(), vectors, empty.clone(), empty.clone())
        queries = queries.detach().to(self.embeddings)
        if exclude_ids is None:
            exclude_ids = torch.full((b,), EMPTY_ID, dtype=torch.long, device=device)
        exclude = exclude_ids.to(device=device, dtype=torch.long).unsqueeze(1)  # [B, 1]
        allowed = self.ids[: self.size].unsqueeze(0) != exclude  # [B, A]
        has_allowed = allowed.any(dim=1, keepdim=True)  # [B, 1]
        stale = self.steps_since_refresh >= self.refresh_interval
        grown = self.size >= 2 * self.table_size  # early growth: tables over the new items
        if self.ranking is None or stale or grown:
            self.refresh()
        positions, ranks, factors = self._draw(queries, num_negatives)
        for _ in range(self.max_rejections):
            rejected = (self.ids[positions] == exclude) & has_allowed  # [B, K]
            if not bool(rejected.any()):
                break
            new_positions, new_ranks, new_factors = self._draw(queries, num_negatives)
            positions = torch.where(rejected, new_positions, positions)
            ranks = torch.where(rejected, new_ranks, ranks)
            factors = torch.where(rejected, new_factors, factors)
        rejected = (self.ids[positions] == exclude) & has_allowed
        if bool(rejected.any()):  # rare: fall back to a uniform draw among the allowed items
            scores = self._uniform((b, num_negatives, self.size), device)
            scores = scores.masked_fill(~allowed.unsqueeze(1), -1.0)
            positions = torch.where(rejected, scores.argmax(dim=-1), positions)
        self.steps_since_refresh += b
        ids = self.ids[positions].masked_fill(~has_allowed, EMPTY_ID)
        vectors = self.embeddings[positions].masked_fill(~has_allowed.unsqueeze(-1), 0.0)
        return NegativeSample(
            indices=positions.masked_fill(~has_allowed, EMPTY_ID),
            ids=ids,
            embeddings=vectors,
            ranks=ranks,
            factors=factors,
        )
