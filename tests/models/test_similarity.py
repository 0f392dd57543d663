"""Set similarities: reference formula, limits, stability, symmetry, chunking."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.similarity import (
    chamfer,
    cosine,
    max_of_max,
    pairwise_set_cosine,
    smooth_chamfer,
)


def sets(n: int, k: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, k, d, generator=g, dtype=torch.float64), dim=-1)


def reference_smooth_chamfer(img: torch.Tensor, txt: torch.Tensor, temperature: float):
    """kdwonn/DivE SetwiseSimilarity.smooth_chamfer_similarity_cosine, denominator 2."""
    k1, k2 = img.shape[1], txt.shape[1]
    dist = img.reshape(-1, img.shape[-1]) @ txt.reshape(-1, txt.shape[-1]).t()
    x_axis_sum_pool = nn.LPPool2d(norm_type=1, kernel_size=(1, k2))
    y_axis_sum_pool = nn.LPPool2d(norm_type=1, kernel_size=(k1, 1))
    right = y_axis_sum_pool(
        torch.log(x_axis_sum_pool(torch.exp(temperature * dist.unsqueeze(0))))
    ).squeeze(0)
    left = x_axis_sum_pool(
        torch.log(y_axis_sum_pool(torch.exp(temperature * dist.unsqueeze(0))))
    ).squeeze(0)
    return (right / (k1 * temperature) + left / (k2 * temperature)) / 2


def reference_chamfer(img: torch.Tensor, txt: torch.Tensor):
    k1, k2 = img.shape[1], txt.shape[1]
    dist = (img.reshape(-1, img.shape[-1]) @ txt.reshape(-1, txt.shape[-1]).t()).unsqueeze(0)
    right = nn.LPPool2d(1, (k1, 1))(nn.MaxPool2d((1, k2))(dist)).squeeze(0)
    left = nn.LPPool2d(1, (1, k2))(nn.MaxPool2d((k1, 1))(dist)).squeeze(0)
    return (right / k1 + left / k2) / 2


def test_smooth_chamfer_equals_reference() -> None:
    a, b = sets(5, 4, seed=1), sets(7, 3, seed=2)
    for temperature in (1.0, 16.0, 50.0):
        torch.testing.assert_close(
            smooth_chamfer(a, b, temperature), reference_smooth_chamfer(a, b, temperature)
        )
    torch.testing.assert_close(chamfer(a, b), reference_chamfer(a, b))


def test_smooth_chamfer_tends_to_chamfer() -> None:
    a, b = sets(6, 4, seed=3).float(), sets(5, 4, seed=4).float()
    exact = chamfer(a, b)
    gaps = [(smooth_chamfer(a, b, t) - exact).abs().max().item() for t in (16.0, 1e2, 1e4)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-3
    assert bool((smooth_chamfer(a, b, 16.0) >= exact - 1e-6).all())  # LSE >= max


def test_finite_at_high_temperature_and_large_norms() -> None:
    a, b = 1e4 * sets(4, 4, seed=5).float(), 1e4 * sets(3, 2, seed=6).float()
    for temperature in (1000.0, 1e6):
        out = smooth_chamfer(a, b, temperature)
        assert bool(torch.isfinite(out).all())
    raw = smooth_chamfer(a, b, 1000.0, normalize=False)  # unnormalised dot products of 1e8
    assert bool(torch.isfinite(raw).all())


def test_single_vector_sets_reduce_to_cosine() -> None:
    a, b = sets(5, 1, seed=7), sets(6, 1, seed=8)
    expected = cosine(a[:, 0], b[:, 0])
    for fn in (chamfer, max_of_max, lambda x, y: smooth_chamfer(x, y, 16.0)):
        torch.testing.assert_close(fn(a, b), expected)


def test_symmetry() -> None:
    a, b = sets(4, 3, seed=9), sets(5, 2, seed=10)
    torch.testing.assert_close(smooth_chamfer(a, b), smooth_chamfer(b, a).t())
    torch.testing.assert_close(chamfer(a, b), chamfer(b, a).t())
    torch.testing.assert_close(max_of_max(a, b), max_of_max(b, a).t())
    # the order of the elements inside a set does not matter
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(smooth_chamfer(a[:, perm], b), smooth_chamfer(a, b))
    # a set is most similar to itself under chamfer (value 1)
    self_sim = chamfer(a, a)
    torch.testing.assert_close(self_sim.diagonal(), torch.ones(4, dtype=self_sim.dtype))


def test_cosine_and_pairwise() -> None:
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    expected = F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=-1)
    torch.testing.assert_close(cosine(a, b), expected)
    s = pairwise_set_cosine(sets(2, 3), sets(4, 2, seed=1))
    assert s.shape == (2, 4, 3, 2)
    torch.testing.assert_close(max_of_max(sets(2, 3), sets(4, 2, seed=1)), s.amax(dim=(-2, -1)))


def test_chunking_matches_and_large_gallery_fits() -> None:
    a, b = sets(11, 4, seed=11).float(), sets(9, 4, seed=12).float()
    for fn in (chamfer, max_of_max, smooth_chamfer):
        torch.testing.assert_close(fn(a, b, chunk_size=3), fn(a, b))
    # 1000 x 5000 sets of 4: 80M pairwise cosines, computed chunk by chunk
    big_a = F.normalize(torch.randn(1000, 4, 16), dim=-1)
    big_b = F.normalize(torch.randn(5000, 4, 16), dim=-1)
    out = smooth_chamfer(big_a, big_b)
    assert out.shape == (1000, 5000)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out[:7], smooth_chamfer(big_a[:7], big_b), atol=1e-6, rtol=0)
