"""Losses: hand-computed triplet cases, positive masks, MMD and uniformity behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.losses import (
    DiveLoss,
    mmd_loss,
    set_triplet_loss,
    triplet_loss,
    uniformity_loss,
)
from models.similarity import smooth_chamfer

SIMS_3 = torch.tensor([[0.9, 0.1, 0.8], [0.6, 0.5, 0.4], [0.2, 0.7, 0.3]])


def test_triplet_2x2_by_hand() -> None:
    sims = torch.tensor([[0.9, 0.5], [0.8, 0.3]])
    # i2t: row 0 -> [0.2 + 0.5 - 0.9]_+ = 0; row 1 -> 0.2 + 0.8 - 0.3 = 0.7
    # t2i: col 0 -> 0.2 + 0.8 - 0.9 = 0.1; col 1 -> 0.2 + 0.5 - 0.3 = 0.4
    for hardest in (True, False):
        out = triplet_loss(sims, margin=0.2, hardest=hardest)
        torch.testing.assert_close(out["i2t"], torch.tensor(0.7))
        torch.testing.assert_close(out["t2i"], torch.tensor(0.5))
        torch.testing.assert_close(out["loss"], torch.tensor(1.2))


def test_triplet_3x3_sum_vs_hardest() -> None:
    summed = triplet_loss(SIMS_3, margin=0.2, hardest=False)
    torch.testing.assert_close(summed["i2t"], torch.tensor(1.2))  # 0.1 + 0.4 + 0.7
    torch.testing.assert_close(summed["t2i"], torch.tensor(1.4))  # 0 + 0.4 + 1.0
    hard = triplet_loss(SIMS_3, margin=0.2, hardest=True)
    torch.testing.assert_close(hard["i2t"], torch.tensor(1.0))  # 0.1 + 0.3 + 0.6
    torch.testing.assert_close(hard["t2i"], torch.tensor(1.1))  # 0 + 0.4 + 0.7
    torch.testing.assert_close(hard["loss"], torch.tensor(2.1))
    mean = triplet_loss(SIMS_3, margin=0.2, hardest=True, reduction="mean")
    torch.testing.assert_close(mean["loss"], torch.tensor(2.1 / 3))


def test_positive_mask_removes_other_positives() -> None:
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 2] = mask[2, 0] = True  # image 0 also matches caption 2 and vice versa
    summed = triplet_loss(SIMS_3, margin=0.2, hardest=False, positive_mask=mask)
    torch.testing.assert_close(summed["i2t"], torch.tensor(1.0))  # 0 + 0.4 + 0.6
    torch.testing.assert_close(summed["t2i"], torch.tensor(0.7))  # 0 + 0.4 + 0.3
    hard = triplet_loss(SIMS_3, margin=0.2, hardest=True, positive_mask=mask)
    torch.testing.assert_close(hard["i2t"], torch.tensor(0.9))  # 0 + 0.3 + 0.6
    torch.testing.assert_close(hard["t2i"], torch.tensor(0.7))  # 0 + 0.4 + 0.3
    # an all-positive batch has no negatives at all
    full = triplet_loss(SIMS_3, positive_mask=torch.ones(3, 3, dtype=torch.bool))
    assert full["loss"].item() == 0.0


def test_triplet_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        triplet_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="reduction"):
        triplet_loss(torch.zeros(2, 2), reduction="max")


def test_set_triplet_uses_smooth_chamfer() -> None:
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 3, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 2, 8), dim=-1)
    out = set_triplet_loss(img, txt, temperature=16.0)
    expected = triplet_loss(smooth_chamfer(img, txt, 16.0), reduction="mean")
    torch.testing.assert_close(out["loss"], expected["loss"])


def test_mmd_zero_for_identical_positive_otherwise() -> None:
    torch.manual_seed(1)
    x = F.normalize(torch.randn(16, 4, 8), dim=-1)
    assert abs(mmd_loss(x, x.clone())["mmd"].item()) < 1e-5
    shuffled = x.reshape(-1, 8)[torch.randperm(64)].reshape(8, 8, 8)  # same samples, regrouped
    assert abs(mmd_loss(x, shuffled)["mmd"].item()) < 1e-5
    shifted = F.normalize(x + 2.0, dim=-1)
    assert mmd_loss(x, shifted)["mmd"].item() > 1e-2
    gaussian = mmd_loss(x, shifted, squared=True)["mmd"].item()
    assert gaussian > 1e-2
    # DivE's formula: exp(-gamma * cdist) means over the flattened slots, gamma = 0.5
    a, b = x.reshape(-1, 8), shifted.reshape(-1, 8)

    def k(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * torch.cdist(p, q)).mean()

    reference = k(a, a) - 2 * k(a, b) + k(b, b)
    torch.testing.assert_close(mmd_loss(x, shifted)["mmd"], reference, atol=1e-5, rtol=1e-4)


def test_uniformity_lower_when_spread() -> None:
    d = 8
    spread = torch.eye(d)[:4].unsqueeze(0).repeat(3, 1, 1)  # 4 orthogonal slots
    collapsed = F.normalize(torch.ones(3, 4, d), dim=-1)
    u_spread = uniformity_loss(spread)["uniformity"].item()
    u_collapsed = uniformity_loss(collapsed)["uniformity"].item()
    assert u_collapsed == pytest.approx(1.0)
    assert u_spread == pytest.approx(torch.exp(torch.tensor(-2.0 * 2.0)).item())  # |a-b|^2 = 2
    assert u_spread < u_collapsed
    assert uniformity_loss(torch.randn(3, 1, d))["loss"].item() == 0.0


def test_dive_loss_parts_and_finite_gradients() -> None:
    torch.manual_seed(2)
    img = torch.randn(6, 4, 16, requires_grad=True)
    txt = torch.randn(6, 4, 16, requires_grad=True)
    loss = DiveLoss(mmd_weight=0.5, unif_weight=0.25)
    out = loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1))
    assert set(out) == {"loss", "triplet", "i2t", "t2i", "mmd", "uniformity"}
    expected = out["triplet"] + 0.5 * out["mmd"] + 0.25 * out["uniformity"]
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    for grad in (img.grad, txt.grad):
        assert grad is not None and bool(torch.isfinite(grad).all())
        assert grad.abs().sum() > 0
    # identical inputs hit distance 0 inside the MMD kernel: gradients stay finite
    same = torch.randn(4, 2, 8, requires_grad=True)
    mmd_loss(same, same)["loss"].backward()
    assert same.grad is not None and bool(torch.isfinite(same.grad).all())
