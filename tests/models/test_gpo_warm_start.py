"""GPO warm start: after `fit_max_pooling` GPO pools like max for every fitted length."""

from __future__ import annotations

import pytest
import torch

from models.gpo import GPO, fit_max_pooling, length_mask, min_rank0_weight

MAX_LEN = 64  # the longest set the Flickr8k configs pool (64 caption tokens; 49 grid cells)


def _max_pool(features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    mask = length_mask(lengths, features.shape[1]).unsqueeze(-1)
    return features.masked_fill(~mask, float("-inf")).amax(dim=1)


def _range(features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    mask = length_mask(lengths, features.shape[1]).unsqueeze(-1)
    low = features.masked_fill(~mask, float("inf")).amin(dim=1)
    return _max_pool(features, lengths) - low


def test_rejects_a_rank0_weight_outside_0_1() -> None:
    with pytest.raises(ValueError, match="rank0_weight"):
        fit_max_pooling(GPO(), 8, rank0_weight=0.0)


@pytest.mark.parametrize("rank0", [0.99, 1.0])
def test_warm_started_gpo_output_matches_max_pooling(rank0: float) -> None:
    torch.manual_seed(0)
    gpo = GPO(d_pe=32, d_hidden=32)
    assert min_rank0_weight(gpo, MAX_LEN) < 0.2  # the random init is far from max pooling
    report = fit_max_pooling(gpo, MAX_LEN, rank0_weight=rank0)
    # Tolerance of the fit: the worst length's rank-0 weight within 1e-3 of the target.
    assert report["min_rank0"] >= rank0 - 1e-3
    lengths = torch.tensor([1, 2, 3, 7, 17, 33, 49, 64])
    features = torch.randn(len(lengths), MAX_LEN, 256)
    with torch.no_grad():
        pooled, weights = gpo(features, lengths)
    expected = _max_pool(features, lengths)
    # pooled = w0 * max + (1 - w0) * (a mix of the other values), so per dimension it is at
    # most (1 - w0) * (max - min) below the max: stated tolerance 1 - rank0 + 1e-3 of the range.
    gap = expected - pooled
    assert bool((gap >= -1e-5).all())
    assert bool((gap <= (1.0 - rank0 + 1e-3) * _range(features, lengths) + 1e-5).all())
    cos = torch.nn.functional.cosine_similarity(pooled, expected, dim=-1)
    assert float(cos.min()) > 0.999
    assert float(weights[0, 0]) == pytest.approx(1.0)  # length 1 is max pooling exactly
    assert float(weights[:, 0].min()) >= rank0 - 1e-3
