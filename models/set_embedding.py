"""DivE set-prediction module: K slot embeddings per input from slot-competitive attention.

Follows kdwonn/DivE (``agg_block/agg_block.py``, ``agg_block/attention.py``, ``model_spm.py``)
as trained on COCO/Flickr30k (``--spm_pre_norm --spm_weight_sharing --spm_last_ln
--spm_residual_norm --spm_activation gelu --spm_ff_mult 4 --spm_depth 4``): K learned slot
queries are refined ``depth`` times by one weight-tied block (pre-norm cross-attention, then
pre-norm feed-forward, each with a residual); the attention is normalised over the slots
first (slots compete for each input) and then renormalised over the inputs.  A final
LayerNorm, the layer-normed global feature as residual, and an L2 normalisation give the set.

Two fixes over the reference: padded inputs receive exactly zero attention (the reference
masks them before the softmax over slots, which gives every padded input a 1/K share that the
renormalisation over inputs then keeps), and the optional sine position encoding is
normalised by each row's true length rather than by the padded length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from models.gpo import length_mask, validate_lengths

ATTN_EPS = 1e-7  # DivE's epsilon in the renormalisation over inputs
FF_MULT = 4  # default feed-forward width multiplier (DivE ``--spm_ff_mult 4``)
PE_BASE = 10000.0  # sine position encoding base (DETR / DivE PositionEmbeddingSine1D)
PE_SCALE = 2 * math.pi  # normalised positions span (0, 2 pi]


class SlotCompetitiveAttention(nn.Module):
    """Multi-head cross-attention from slots to inputs, softmax over slots then over inputs.

    Args:
        d_model: slot size.
        d_context: input feature size.
        heads: attention heads.
        dim_head: size of each head.
        dropout: dropout on the output projection.
        eps: added to the per-slot total before renormalising over inputs.
    """

    def __init__(
        self,
        d_model: int,
        d_context: int,
        heads: int,
        dim_head: int,
        dropout: float = 0.0,
        eps: float = ATTN_EPS,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.eps = eps
        self.to_q = nn.Linear(d_model, inner, bias=False)
        self.to_k = nn.Linear(d_context, inner, bias=False)
        self.to_v = nn.Linear(d_context, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, d_model), nn.Dropout(dropout))

    def forward(
        self, slots: Tensor, context: Tensor, mask: Tensor, key_pos: Tensor | None = None
    ) -> Tensor:
        """``slots [B, K, D]`` attend to ``context [B, N, C]`` where ``mask [B, N]`` is True."""
        return self.attend(slots, *self.context_kv(context, key_pos), mask)

    def context_kv(self, context: Tensor, key_pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, H, N, d]`` of the context (computed once per set, reused by
        every weight-tied iteration)."""
        k = self.to_k(context if key_pos is None else context + key_pos)
        v = self.to_v(context)
        return (
            rearrange(k, "b n (h d) -> b h n d", h=self.heads),
            rearrange(v, "b n (h d) -> b h n d", h=self.heads),
        )

    def attend(self, slots: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """``slots [B, K, D]`` attend to precomputed keys / values where ``mask [B, N]``."""
        q = rearrange(self.to_q(slots), "b n (h d) -> b h n d", h=self.heads)
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale  # [B, H, K, N]
        valid = rearrange(mask, "b n -> b 1 1 n")
        sim = sim.masked_fill(~valid, 0.0)  # keep padded columns finite before the softmax
        attn = sim.softmax(dim=-2)  # slots compete for every input
        attn = attn.masked_fill(~valid, 0.0)  # padded inputs give nothing to any slot
        attn = attn / (attn.sum(dim=-1, keepdim=True) + self.eps)  # weighted mean over inputs
        out = torch.einsum("bhij,bhjd->bhid", attn, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class SetPredictionModule(nn.Module):
    """``forward(features [B,N,C], lengths [B], global_feature [B,D] | None) -> [B,K,D]``.

    Args:
        d_model: slot / output size ``D``.
        num_slots: number of output vectors ``K``.
        depth: iterations of the weight-tied aggregation block.
        heads: attention heads.
        d_ff: feed-forward hidden size (default ``FF_MULT * d_model``).
        dropout: dropout in the attention output and the feed-forward.
        d_in: input feature size ``C`` (default ``d_model``).
        dim_head: attention head size (default ``d_model // heads``; DivE fixes 512).
        pos_enc: add a sine position encoding of ``position / length`` to the keys (DivE uses
            it for text, not for detector regions).
    """

    def __init__(
        self,
        d_model: int,
        num_slots: int = 4,
        depth: int = 4,
        heads: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.0,
        d_in: int | None = None,
        dim_head: int | None = None,
        pos_enc: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1 or num_slots < 1:
            raise ValueError("depth and num_slots must be >= 1")
        d_in = d_in or d_model
        d_ff = d_ff or FF_MULT * d_model
        dim_head = dim_head or max(1, d_model // heads)
        if pos_enc and d_in % 2 != 0:
            raise ValueError(f"pos_enc needs an even input size, got {d_in}")
        self.num_slots = num_slots
        self.depth = depth
        self.pos_enc = pos_enc
        self.slots = nn.Parameter(torch.randn(num_slots, d_model))  # learned queries
        self.norm_slots = nn.LayerNorm(d_model)
        self.norm_context = nn.LayerNorm(d_in)
        self.attn = SlotCompetitiveAttention(d_model, d_in, heads, dim_head, dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )
        self.norm_out = nn.LayerNorm(d_model)
        self.norm_global = nn.LayerNorm(d_model)
        exponent = 2 * (torch.arange(d_in, dtype=torch.float) // 2) / d_in
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", PE_BASE**-exponent, persistent=False)

    def position_encoding(self, lengths: Tensor, n: int) -> Tensor:
        """``[B, N, C]`` sine encoding of ``(t + 1) / length * 2 pi`` (true length, not N)."""
        positions = torch.arange(1, n + 1, device=lengths.device, dtype=self.inv_freq.dtype)
        normalised = positions.unsqueeze(0) / lengths.unsqueeze(1).to(positions.dtype) * PE_SCALE
        angles = normalised.unsqueeze(-1) * self.inv_freq  # [B, N, C]
        pe = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1)
        return rearrange(pe, "b n h two -> b n (h two)")

    def forward(
        self, features: Tensor, lengths: Tensor, global_feature: Tensor | None = None
    ) -> Tensor:
        """Predict an L2-normalised set of ``K`` vectors per row.

        Args:
            features: ``[B, N, C]`` left-aligned local features; padding may hold anything.
            lengths: ``[B]`` number of valid features per row, each in ``[1, N]``.
            global_feature: optional ``[B, D]`` residual added (layer-normed) to every slot.

        Returns:
            ``[B, K, D]`` unit vectors.

        Raises:
            ValueError: a length is 0 or larger than ``N`` (not checked while exporting).
        """
        b, n, _ = features.shape
        validate_lengths(lengths, n)
        mask = length_mask(lengths, n)  # [B, N]
        features = features.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding cannot inject NaN
        context = self.norm_context(features)
        key_pos = self.position_encoding(lengths, n).to(context.dtype) if self.pos_enc else None
        x = repeat(self.slots, "k d -> b k d", b=b).to(features.dtype)
        k, v = self.attn.context_kv(context, key_pos)  # the context is the same every iteration
        for _ in range(self.depth):  # one block, weights tied across iterations
            x = x + self.attn.attend(self.norm_slots(x), k, v, mask)
            x = x + self.ff(self.norm_ff(x))
        x = self.norm_out(x)
        if global_feature is not None:
            x = x + rearrange(self.norm_global(global_feature), "b d -> b 1 d")
        return F.normalize(x, dim=-1)
