"""Attention over document segments: self-attention within a modality, cross-modal attention
between modalities, and self-attentive pooling.

Every tensor here is a batch of documents laid out as segments: ``[B, S, d]`` with a boolean
``mask`` ``[B, S]`` that is True on real segments. Padded segments are never read: they are
excluded as keys everywhere and get exactly zero pooling weight, so what a padded position holds
cannot change any output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hilbert.model.layer_weighting import LayerWeighting


def sinusoidal_positions(n_positions: int, d_model: int, device=None, dtype=None) -> Tensor:
    """Transformer sine/cosine codes for segment indices ``0..n_positions-1``: ``[n_positions, d_model]``.

    Computed on the fly, so a document of any length gets a code and there is no learned table
    whose rows past the longest training document were never trained.
    """
    position = torch.arange(n_positions, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(
        torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )
    codes = torch.zeros(n_positions, d_model, device=device, dtype=torch.float32)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
    return codes.to(dtype or torch.float32)


class SegmentProjection(nn.Module):
    """One modality's frozen-encoder features ``[B, S, d_in]`` -> ``[B, S, d_model]``.

    Two normalisations, for two different problems. Per-feature standardisation with statistics
    of the training documents (buffers, so they travel with the checkpoint) puts features of
    different units on one scale: a prosody vector mixes log-energies near -10 with rates near 3,
    and the projection would otherwise only see the largest. The LayerNorm then puts a 1024-wide
    speech feature and a 384-wide text feature on the same per-vector scale before the
    projection, so neither stream dominates by its encoder's width.

    With ``layers > 1`` (an encoder's ``layer=all``) the first ``layers * layer_dim`` features are
    its hidden states side by side, and the rest (segment timing) follow. Each layer is
    standardised on its own (the statistics are per feature of every layer), then a learned
    :class:`LayerWeighting` sums the layers into one ``layer_dim`` vector, the other columns are
    appended unweighted, and the LayerNorm and projection see ``layer_dim + rest`` features.
    Standardising before weighting puts every layer on one scale (a transformer's later layers
    have much larger activations), so the weights compare layers, not their units, as s3prl's
    per-layer normalisation does.
    """

    def __init__(self, d_in: int, d_model: int, dropout: float, layers: int = 1, layer_dim: int | None = None):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(d_in))
        self.register_buffer("feature_scale", torch.ones(d_in))
        self.layers, self.layer_dim = layers, layer_dim
        # absent for one layer, so the state dict of an unlayered projection is what it always was
        self.layer_weighting = LayerWeighting(layers) if layers > 1 else None
        d_weighted = d_in - (layers - 1) * layer_dim if layers > 1 else d_in
        self.norm = nn.LayerNorm(d_weighted)
        self.linear = nn.Linear(d_weighted, d_model)
        self.dropout = nn.Dropout(dropout)

    @torch.no_grad()
    def set_feature_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Standardise with these per-feature statistics; tiny deviations are floored at a tenth
        of the average one, so a feature that is almost never active (a rare hashed n-gram)
        cannot explode when it appears."""
        floor = 0.1 * float(std.mean()) + 1e-6
        self.feature_mean.copy_(mean.to(self.feature_mean))
        self.feature_scale.copy_(std.clamp_min(floor).to(self.feature_scale))

    def forward(self, features: Tensor) -> Tensor:
        standardised = (features - self.feature_mean) / self.feature_scale
        return self.dropout(self.linear(self.norm(self.weigh_layers(standardised))))

    def weigh_layers(self, features: Tensor) -> Tensor:
        """``[..., layers * layer_dim + rest]`` -> ``[..., layer_dim + rest]`` (unchanged for one layer)."""
        if self.layer_weighting is None:
            return features
        stacked = self.layers * self.layer_dim
        layered = features[..., :stacked].unflatten(-1, (self.layers, self.layer_dim))
        return torch.cat([self.layer_weighting(layered), features[..., stacked:]], dim=-1)


class MultiHeadAttention(nn.Module):
    """Multi-head attention of ``query`` ``[B, L, d]`` over ``context`` ``[B, S, d]``.

    ``context_mask`` ``[B, S]`` (True = real) removes padded keys; every row must keep at least
    one key, or its softmax has nothing to normalise.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads = n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.out_dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        batch, length, width = query.shape
        q = self._split_heads(self.query(query))
        k, v = (self._split_heads(t) for t in self.key_value(context).chunk(2, dim=-1))
        # bool mask, True = may attend; broadcast over heads and query positions
        attend = context_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attend, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.out_dropout(self.out(y))

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(d_model, 4 * d_model)
        self.down = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class CrossAttentionBlock(nn.Module):
    """Pre-LayerNorm residual block: a stream reads a context stream, then a feed-forward.

    With ``context`` the same tensor as ``x`` this is an ordinary self-attention block.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm_query = nn.LayerNorm(d_model)
        self.norm_context = nn.LayerNorm(d_model)
        self.attention = MultiHeadAttention(d_model, n_heads, dropout)
        self.norm_feed_forward = nn.LayerNorm(d_model)
        self.feed_forward = FeedForward(d_model, dropout)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attention(self.norm_query(x), self.norm_context(context), mask)
        return x + self.feed_forward(self.norm_feed_forward(x))


class CrossModalLayer(nn.Module):
    """One round of reciprocal cross-attention over aligned streams (``{modality: [B, S, d]}``).

    With two modalities, audio reads text and text reads audio, both from the previous layer's
    states. With one (the unimodal ablations) the stream reads itself, so the ablated model keeps
    the same depth and size per stream.
    """

    def __init__(self, modalities: tuple[str, ...], d_model: int, n_heads: int, dropout: float):
        super().__init__()
        assert 1 <= len(modalities) <= 2
        self.blocks = nn.ModuleDict({m: CrossAttentionBlock(d_model, n_heads, dropout) for m in modalities})

    def forward(self, streams: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        return {m: block(streams[m], streams[self._context_of(m)], mask) for m, block in self.blocks.items()}

    def _context_of(self, modality: str) -> str:
        others = [m for m in self.blocks if m != modality]
        return others[0] if others else modality


class SelfAttentionEncoder(nn.Module):
    """``n_layers`` self-attention blocks over one modality's segments and a final LayerNorm.

    Each modality's own encoder: its states never read the other modality, so what is pooled
    from them is a modality-specific document embedding.
    """

    def __init__(self, d_model: int, n_heads: int, n_layers: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock(d_model, n_heads, dropout) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, x, mask)
        return self.final_norm(x)


class CrossModalEncoder(nn.Module):
    """``n_layers`` cross-modal layers and a final LayerNorm per stream (pre-LN, as in GPT-2)."""

    def __init__(self, modalities: tuple[str, ...], d_model: int, n_heads: int, n_layers: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(CrossModalLayer(modalities, d_model, n_heads, dropout) for _ in range(n_layers))
        self.final_norms = nn.ModuleDict({m: nn.LayerNorm(d_model) for m in modalities})

    def forward(self, streams: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        for layer in self.layers:
            streams = layer(streams, mask)
        return {m: norm(streams[m]) for m, norm in self.final_norms.items()}


class SelfAttentivePooling(nn.Module):
    """Structured self-attention pooling (Lin et al. 2017, arXiv 1703.03130).

    ``A = softmax_S(W2 tanh(W1 H^T))`` gives ``heads`` distributions over the segments of each
    document; ``M = A H`` stacks ``heads`` weighted averages, which are concatenated and
    projected to ``d_embed``. Returns the embedding ``[B, d_embed]`` and ``A`` ``[B, heads, S]``
    (zero on padded segments; each head's row sums to 1), so users can see which segments mattered.
    """

    def __init__(self, d_model: int, heads: int, d_embed: int, dropout: float, d_attention: int | None = None):
        super().__init__()
        d_attention = d_attention or d_model
        self.w1 = nn.Linear(d_model, d_attention, bias=False)
        self.w2 = nn.Linear(d_attention, heads, bias=False)
        self.project = nn.Linear(heads * d_model, d_embed)
        self.dropout = nn.Dropout(dropout)

    def forward(self, states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.w2(torch.tanh(self.w1(states))).transpose(1, 2)  # [B, heads, S]
        scores = scores.float().masked_fill(~mask[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        pooled = torch.einsum("bhs,bsd->bhd", weights.to(states.dtype), states)
        embedding = self.project(self.dropout(pooled.flatten(1)))
        return embedding, weights
