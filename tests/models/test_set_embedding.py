"""SetPredictionModule: shape, norm, padding and batch invariance, gradients, slot diversity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from models.losses import DiveLoss
from models.set_embedding import SetPredictionModule, SlotCompetitiveAttention

D = 16


def module(**kwargs: object) -> SetPredictionModule:
    torch.manual_seed(0)
    return SetPredictionModule(D, num_slots=4, depth=3, heads=2, **kwargs).eval()  # type: ignore[arg-type]


def test_shape_and_unit_norm() -> None:
    spm = module(d_in=12)
    out = spm(torch.randn(3, 7, 12), torch.tensor([7, 2, 5]), torch.randn(3, D))
    assert out.shape == (3, 4, D)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 4))


@pytest.mark.parametrize("pos_enc", [False, True])
def test_padding_does_not_change_output(pos_enc: bool) -> None:
    spm = module(pos_enc=pos_enc)
    torch.manual_seed(1)
    lengths = torch.tensor([5, 2, 4])
    features = torch.randn(3, 5, D)
    glob = torch.randn(3, D)
    out = spm(features, lengths, glob)
    garbage = 1e4 * torch.randn(3, 6, D)
    garbage[0, 0, 0] = torch.nan  # even NaN in the padding must not leak
    padded = torch.cat((features, garbage), dim=1)
    torch.testing.assert_close(spm(padded, lengths, glob), out, atol=1e-5, rtol=0)
    for i, n in enumerate(lengths.tolist()):  # each row alone, unpadded
        alone = spm(features[i : i + 1, :n], lengths[i : i + 1], glob[i : i + 1])
        torch.testing.assert_close(alone[0], out[i], atol=1e-5, rtol=0)


def reference_attention(
    attn: SlotCompetitiveAttention, x: torch.Tensor, context: torch.Tensor, pad: torch.Tensor
) -> torch.Tensor:
    """kdwonn/DivE agg_block/attention.py Attention.forward (pad mask True = padding)."""
    h = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    q, k, v = (rearrange(t, "b n (h d) -> (b h) n d", h=h) for t in (q, k, v))
    sim = torch.einsum("bid,bjd->bij", q, k) * attn.scale
    sim = sim.masked_fill(repeat(pad, "b j -> (b h) () j", h=h), -torch.finfo(sim.dtype).max)
    weights = sim.softmax(dim=1)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-7)
    out = torch.einsum("bij,bjd->bid", weights, v)
    return attn.to_out(rearrange(out, "(b h) n d -> b n (h d)", h=h))


def test_attention_matches_dive_and_fixes_its_padding_leak() -> None:
    torch.manual_seed(4)
    attn = SlotCompetitiveAttention(D, D, heads=2, dim_head=8).eval()
    slots, context = torch.randn(2, 3, D), torch.randn(2, 5, D)
    no_pad = torch.zeros(2, 5, dtype=torch.bool)
    ours = attn(slots, context, ~no_pad)
    torch.testing.assert_close(ours, reference_attention(attn, slots, context, no_pad))
    # with padding, ours equals attention over the valid inputs alone ...
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    ours_padded = attn(slots, context, mask)
    alone = attn(slots[1:], context[1:, :2], mask[1:, :2])
    torch.testing.assert_close(ours_padded[1:], alone)
    # ... while the reference lets each padded input keep a 1/K share
    leaked = reference_attention(attn, slots, context, ~mask)
    assert (leaked[1] - alone[0]).abs().max() > 1e-3


def test_batch_size_invariance() -> None:
    spm = module(pos_enc=True)
    torch.manual_seed(2)
    features, lengths = torch.randn(6, 8, D), torch.tensor([8, 3, 1, 6, 8, 2])
    full = spm(features, lengths)
    torch.testing.assert_close(spm(features[2:4], lengths[2:4]), full[2:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(spm(features[:1], lengths[:1]), full[:1], atol=1e-5, rtol=0)


def test_gradients_reach_every_parameter() -> None:
    spm = module(pos_enc=True).train()
    out = spm(torch.randn(3, 5, D), torch.tensor([5, 3, 1]), torch.randn(3, D))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in spm.named_parameters():
        assert p.grad is not None, name
        assert bool(torch.isfinite(p.grad).all()), name
        assert p.grad.abs().sum() > 0, name


def test_rejects_empty_rows() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        module()(torch.randn(2, 3, D), torch.tensor([0, 3]))


def test_slots_diverse_after_training() -> None:
    torch.manual_seed(3)
    img_spm = SetPredictionModule(D, num_slots=4, depth=1, heads=2)
    txt_spm = SetPredictionModule(D, num_slots=4, depth=1, heads=2)
    params = list(img_spm.parameters()) + list(txt_spm.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-3)
    criterion = DiveLoss(mmd_weight=0.1, unif_weight=0.1)
    concepts = F.normalize(torch.randn(16, D), dim=-1)  # toy data: shared concepts + noise
    img_len, txt_len = torch.randint(1, 7, (16,)), torch.randint(1, 5, (16,))
    img = concepts[:, None] + 0.3 * torch.randn(16, 6, D)
    txt = concepts[:, None] + 0.3 * torch.randn(16, 4, D)
    losses = []
    for _ in range(6):
        parts = criterion(img_spm(img, img_len), txt_spm(txt, txt_len))
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        losses.append(parts["loss"].item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        slots = img_spm(img, img_len)  # [16, 4, D]
    gram = slots @ slots.transpose(1, 2)
    off_diagonal = gram[:, ~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.max().item() < 0.99  # no two slots collapse to the same vector
    assert off_diagonal.mean().item() < 0.9


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_traced_graph_generalises_to_other_lengths() -> None:
    spm = module(pos_enc=True)
    traced = torch.jit.trace(spm, (torch.randn(2, 6, D), torch.tensor([6, 3])))
    features, lengths = torch.randn(2, 6, D), torch.tensor([2, 5])
    torch.testing.assert_close(traced(features, lengths), spm(features, lengths))


def test_torch_export_with_dynamic_shapes() -> None:
    """torch.export with dynamic batch and length: no data-dependent Python control flow."""
    spm = module(pos_enc=True)
    batch, length = torch.export.Dim("batch", min=2), torch.export.Dim("length", min=2)
    program = torch.export.export(
        spm,
        (torch.randn(3, 7, D), torch.tensor([7, 2, 5])),
        dynamic_shapes=({0: batch, 1: length}, {0: batch}),
    )
    features, lengths = torch.randn(4, 9, D), torch.tensor([1, 9, 3, 4])
    torch.testing.assert_close(program.module()(features, lengths), spm(features, lengths))
