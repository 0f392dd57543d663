"""GPO: equals the VSE-infinity reference, ignores padding, reduces to max/mean pooling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.gpo import GPO, pool_sorted


def reference_positional_encoding_1d(d_model: int, length: int) -> torch.Tensor:
    pe = torch.zeros(length, d_model)
    position = torch.arange(0, length).unsqueeze(1)
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float) * -(math.log(10000.0) / d_model)
    )
    pe[:, 0::2] = torch.sin(position.float() * div_term)
    pe[:, 1::2] = torch.cos(position.float() * div_term)
    return pe


class ReferenceGPO(nn.Module):
    """Faithful transcription of woodfrog/vse_infty GPO (pack_padded_sequence version)."""

    def __init__(self, d_pe: int, d_hidden: int) -> None:
        super().__init__()
        self.d_pe = d_pe
        self.gru = nn.GRU(d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def compute_pool_weights(self, lengths, features):
        max_len = int(lengths.max())
        pes = reference_positional_encoding_1d(self.d_pe, max_len)
        pes = pes.unsqueeze(0).repeat(lengths.size(0), 1, 1)
        mask = torch.arange(max_len).expand(lengths.size(0), max_len)
        mask = (mask < lengths.long().unsqueeze(1)).unsqueeze(-1)
        pes = pes.masked_fill(mask == 0, 0)
        packed = pack_padded_sequence(pes, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out_emb, _ = pad_packed_sequence(out, batch_first=True)
        half = out_emb.size(2) // 2
        out_emb = (out_emb[:, :, :half] + out_emb[:, :, half:]) / 2
        scores = self.linear(out_emb)
        scores[torch.where(mask == 0)] = -10000
        return torch.softmax(scores / 0.1, 1), mask

    def forward(self, features, lengths):
        pool_weights, mask = self.compute_pool_weights(lengths, features)
        features = features[:, : int(lengths.max()), :]
        sorted_features = features.masked_fill(mask == 0, -10000)
        sorted_features = sorted_features.sort(dim=1, descending=True)[0]
        sorted_features = sorted_features.masked_fill(mask == 0, 0)
        return (sorted_features * pool_weights).sum(1), pool_weights


@pytest.fixture()
def pair() -> tuple[GPO, ReferenceGPO]:
    torch.manual_seed(0)
    ref = ReferenceGPO(32, 32)
    gpo = GPO(32, 32)
    gpo.load_state_dict(ref.state_dict(), strict=True)  # reference weights load as they are
    return gpo.eval(), ref.eval()


def test_matches_reference(pair: tuple[GPO, ReferenceGPO]) -> None:
    gpo, ref = pair
    torch.manual_seed(1)
    lengths = torch.tensor([7, 3, 1, 5, 7, 2])
    features = torch.randn(6, 7, 16)
    pooled, weights = gpo(features, lengths)
    ref_pooled, ref_weights = ref(features, lengths)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(weights, ref_weights.squeeze(-1), atol=1e-5, rtol=0)


def test_padding_does_not_change_anything(pair: tuple[GPO, ReferenceGPO]) -> None:
    gpo, ref = pair
    torch.manual_seed(2)
    lengths = torch.tensor([4, 2, 5])
    features = torch.randn(3, 5, 8)
    padded = torch.cat((features, 1e6 * torch.randn(3, 6, 8)), dim=1)  # garbage padding
    pooled, weights = gpo(features, lengths)
    pooled_pad, weights_pad = gpo(padded, lengths)
    torch.testing.assert_close(pooled_pad, pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(weights_pad[:, :5], weights, atol=1e-6, rtol=0)
    valid = torch.arange(11).unsqueeze(0) < lengths.unsqueeze(1)
    assert bool((weights_pad[~valid] == 0).all())  # exactly zero, not just small
    torch.testing.assert_close(weights_pad.sum(1), torch.ones(3))
    # each row alone, unpadded, gives the same result
    for i, n in enumerate(lengths.tolist()):
        alone, _ = gpo(features[i : i + 1, :n], lengths[i : i + 1])
        torch.testing.assert_close(alone[0], pooled[i], atol=1e-6, rtol=0)
    ref_pooled, _ = ref(padded, lengths)
    torch.testing.assert_close(pooled_pad, ref_pooled, atol=1e-5, rtol=0)


def test_single_element_returns_the_feature() -> None:
    gpo = GPO()
    features = torch.randn(4, 1, 10)
    pooled, weights = gpo(features, torch.ones(4, dtype=torch.long))
    torch.testing.assert_close(pooled, features[:, 0])
    torch.testing.assert_close(weights, torch.ones(4, 1))


def test_rejects_empty_and_too_long() -> None:
    gpo = GPO()
    with pytest.raises(ValueError, match=">= 1"):
        gpo(torch.randn(2, 3, 4), torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="exceeds"):
        gpo(torch.randn(2, 3, 4), torch.tensor([3, 4]))


def test_pool_sorted_max_and_mean() -> None:
    torch.manual_seed(3)
    features = torch.randn(3, 6, 5)
    features[1, 4:] = 1e3  # padding larger than anything valid must not win the max
    lengths = torch.tensor([6, 4, 1])
    valid = torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)
    one_hot = torch.zeros(3, 6)
    one_hot[:, 0] = 1.0
    expected_max = features.masked_fill(~valid.unsqueeze(-1), -torch.inf).amax(1)
    torch.testing.assert_close(pool_sorted(features, lengths, one_hot), expected_max)
    uniform = valid.float() / lengths.unsqueeze(1)
    expected_mean = (features * valid.unsqueeze(-1)).sum(1) / lengths.unsqueeze(1)
    torch.testing.assert_close(pool_sorted(features, lengths, uniform), expected_mean)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_traced_graph_generalises_to_other_lengths(pair: tuple[GPO, ReferenceGPO]) -> None:
    """No data-dependent Python control flow: a trace made on one batch is right on another."""
    gpo, ref = pair
    features = torch.randn(2, 6, 4)
    traced = torch.jit.trace(gpo, (features, torch.tensor([6, 3])))
    lengths = torch.tensor([2, 5])
    other = torch.randn(2, 6, 4)
    torch.testing.assert_close(traced(other, lengths)[0], gpo(other, lengths)[0])
    torch.testing.assert_close(traced(other, lengths)[0], ref(other, lengths)[0], atol=1e-5, rtol=0)


def test_gradients_reach_parameters() -> None:
    gpo = GPO()
    features = torch.randn(3, 5, 4, requires_grad=True)
    pooled, _ = gpo(features, torch.tensor([5, 2, 3]))
    pooled.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpo.parameters())
    assert features.grad is not None
    assert bool((features.grad[1, 2:] == 0).all())  # padding gets no gradient
