"""Adaptive negative sampler: rank law, hardness, exclusion, refresh schedule, ring buffer."""

from __future__ import annotations

import math

import pytest
import torch

from models.sampling import AdaptiveNegativeSampler, default_refresh_interval


def filled(bank_size: int, dim: int, lam: float, seed: int = 0, **kwargs: object):
    g = torch.Generator().manual_seed(seed)
    sampler = AdaptiveNegativeSampler(bank_size, dim, lam, seed=seed, **kwargs)  # type: ignore[arg-type]
    bank = torch.randn(bank_size, dim, generator=g)
    sampler.update(bank, torch.arange(bank_size))
    return sampler, bank, g


def test_rank_distribution_follows_exponential_law() -> None:
    a, lam, draws = 40, 5.0, 20000
    sampler, bank, g = filled(a, 8, lam)
    queries = torch.randn(draws, 8, generator=g)
    out = sampler.sample(queries)
    counts = torch.bincount(out.ranks.flatten(), minlength=a + 1)[1:].double()
    r = torch.arange(1, a + 1, dtype=torch.float64)
    p = torch.exp(-r / lam) / torch.exp(-r / lam).sum()
    expected = p * draws
    keep = expected >= 5  # chi-square bins; the thin tail is pooled into one bin
    obs = torch.cat((counts[keep], counts[~keep].sum().reshape(1)))
    exp = torch.cat((expected[keep], expected[~keep].sum().reshape(1)))
    chi2 = ((obs - exp) ** 2 / exp).sum().item()
    dof = obs.numel() - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)
    # and the returned item really has that rank in the drawn factor and direction
    f, rank, idx = out.factors[:, 0], out.ranks[:, 0], out.indices[:, 0]
    sign = torch.where(queries.gather(1, f[:, None])[:, 0] > 0, 1.0, -1.0)
    values = bank[:, f].t() * sign[:, None]  # [draws, A] signed factor values
    chosen = values.gather(1, idx[:, None])
    torch.testing.assert_close((values > chosen).sum(1), rank - 1)


def test_negatives_harder_than_uniform() -> None:
    sampler, bank, g = filled(500, 16, lam=10.0, seed=1)
    queries = torch.randn(400, 16, generator=g)
    out = sampler.sample(queries, num_negatives=4)
    adaptive = torch.einsum("bd,bkd->bk", queries, out.embeddings).mean().item()
    uniform_idx = torch.randint(0, 500, (400, 4), generator=g)
    uniform = torch.einsum("bd,bkd->bk", queries, bank[uniform_idx]).mean().item()
    assert out.embeddings.shape == (400, 4, 16)
    assert adaptive > uniform + 1.0, (adaptive, uniform)
    torch.testing.assert_close(out.embeddings, bank[out.indices])


def test_never_returns_excluded_id() -> None:
    sampler = AdaptiveNegativeSampler(200, 8, lam=1.0, seed=2)
    bank = torch.randn(200, 8)
    ids = torch.arange(200) % 20  # every id is in the bank 10 times
    sampler.update(bank, ids)
    exclude = torch.randint(0, 20, (300,))
    queries = bank[exclude]  # the query's own items are its top-ranked neighbours
    out = sampler.sample(queries, exclude, num_negatives=3)
    assert bool((out.ids != exclude[:, None]).all())
    assert bool((ids[out.indices] == out.ids).all())
    only_one = AdaptiveNegativeSampler(4, 2, lam=1.0)
    only_one.update(torch.randn(4, 2), torch.full((4,), 7))
    none_left = only_one.sample(torch.randn(2, 2), torch.tensor([7, 3]), num_negatives=2)
    assert none_left.ids[0].tolist() == [-1, -1] and none_left.indices[0].tolist() == [-1, -1]
    assert none_left.ids[1].tolist() == [7, 7]  # id 3 is not in the bank: 7 is a negative
    assert bool((none_left.embeddings[0] == 0).all())
    empty = AdaptiveNegativeSampler(4, 2, lam=1.0).sample(torch.randn(3, 2), num_negatives=2)
    assert empty.ids.shape == (3, 2) and bool((empty.ids == -1).all())
    assert empty.embeddings.shape == (3, 2, 2)
    with pytest.raises(ValueError, match="queries must be"):
        only_one.sample(torch.randn(1, 3))


def test_refresh_schedule() -> None:
    assert default_refresh_interval(11) == int(10 * math.log(10)) == 23
    sampler, _, g = filled(11, 4, lam=2.0)
    assert sampler.refresh_interval == 23
    for _ in range(10):  # 5 queries per call: refresh at calls 1 and 6 (25 >= 23 steps)
        sampler.sample(torch.randn(5, 4, generator=g))
    assert sampler.num_refreshes == 2
    explicit, _, g = filled(11, 4, lam=2.0, refresh_every=7)
    for _ in range(15):  # one query per call: calls 1, 8, 15
        explicit.sample(torch.randn(1, 4, generator=g))
    assert explicit.num_refreshes == 3
    explicit.update(torch.randn(1, 4), torch.tensor([99]))  # full bank: size unchanged
    explicit.sample(torch.randn(1, 4, generator=g))
    assert explicit.num_refreshes == 3  # a full bank's overwrite waits for the schedule


def test_ring_buffer_and_growth() -> None:
    sampler = AdaptiveNegativeSampler(5, 2, lam=1.0)
    sampler.update(torch.randn(2, 2), torch.tensor([0, 1]))
    sampler.sample(torch.randn(2, 2))
    assert sampler.num_refreshes == 1 and sampler.table_size == 2
    sampler.update(torch.randn(4, 2), torch.tensor([2, 3, 4, 5]))
    assert len(sampler) == 5
    assert sorted(sampler.ids.tolist()) == [1, 2, 3, 4, 5]  # the oldest one overwritten
    out = sampler.sample(torch.randn(2, 2))  # the bank doubled: tables rebuilt over 5 items
    assert sampler.num_refreshes == 2 and sampler.table_size == 5
    assert bool((out.indices < 5).all())
    sampler.update(torch.randn(1, 2), torch.tensor([6]))
    sampler.sample(torch.randn(2, 2))  # full, not doubled, not due: same tables
    assert sampler.num_refreshes == 2


def test_one_slot_per_id_overwrites_in_place() -> None:
    sampler = AdaptiveNegativeSampler(4, 2, lam=1.0, one_slot_per_id=True)
    sampler.update(torch.zeros(3, 2), torch.tensor([10, 11, 12]))
    slots = sampler.ids.tolist()
    sampler.update(torch.ones(2, 2), torch.tensor([11, 11]))  # known id: its own slot
    assert sampler.ids.tolist() == slots and len(sampler) == 3
    assert sampler.embeddings[1].tolist() == [1.0, 1.0]
    sampler.update(torch.full((2, 2), 2.0), torch.tensor([13, 14]))  # 14 evicts the oldest (10)
    assert sorted(sampler.ids.tolist()) == [11, 12, 13, 14] and len(sampler) == 4
    sampler.update(torch.full((1, 2), 3.0), torch.tensor([10]))  # 10 is new again: evicts 11
    assert sorted(sampler.ids.tolist()) == [10, 12, 13, 14]
    row = sampler.ids.tolist().index(10)
    assert sampler.embeddings[row].tolist() == [3.0, 3.0]


def test_reproducible_with_seed() -> None:
    first, _, _ = filled(50, 4, lam=3.0, seed=5)
    second, _, _ = filled(50, 4, lam=3.0, seed=5)
    queries = torch.randn(20, 4)
    torch.testing.assert_close(first.sample(queries).indices, second.sample(queries).indices)
