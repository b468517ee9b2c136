"""Transformer building blocks shared by the encoders."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sine/cosine positional encoding of Vaswani et al. to ``x [B, S, d]``."""

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)[:, : d_model // 2]
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[: x.shape[-2]]


def make_transformer(d_model: int, num_heads: int, num_layers: int, ff_dim: int) -> nn.TransformerEncoder:
    """Pre-LN ``nn.TransformerEncoder`` (batch first, ReLU as in TrMRL, no dropout: PPO needs
    deterministic log-probs)."""
    layer = nn.TransformerEncoderLayer(
        d_model,
        num_heads,
        dim_feedforward=ff_dim,
        dropout=0.0,
        activation="relu",
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)


def attention_mask(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, S, S]`` (True = may attend, the SDPA convention) from ``valid [B, S]``.

    A query may attend to valid keys (and, if ``causal``, only to earlier ones). Every query may
    always attend to itself, so no row is fully blocked (which would produce NaNs); outputs at
    invalid positions are never read.
    """
    size = valid.shape[-1]
    allowed = valid.unsqueeze(-2).expand(-1, size, -1)
    if causal:
        allowed = allowed & torch.ones(size, size, dtype=torch.bool, device=valid.device).tril()
    return (allowed | torch.eye(size, dtype=torch.bool, device=valid.device)).unsqueeze(1)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, d]`` -> ``[B, heads, S, d / heads]``."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def encoder_layer(
    layer: nn.TransformerEncoderLayer, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None
) -> torch.Tensor:
    """A pre-LN ``nn.TransformerEncoderLayer`` computed from its own weights with fused attention.

    Equal to ``layer(x, src_mask=~mask.repeat_interleave(heads, 0).squeeze(1))`` but with one
    ``scaled_dot_product_attention`` call and none of ``nn.MultiheadAttention``'s per-call argument
    handling, which dominates at the small sizes of a collection step.

    Args:
        layer: a ``norm_first``, ``batch_first`` encoder layer.
        x: ``[B, S, d]`` input of the layer.
        mask: ``[B, 1, S, S]`` boolean mask from :func:`attention_mask` (True = may attend).
        query: optional ``[B]`` position per sequence. When given, only the output at that position
            is computed (keys and values still cover the whole sequence): ``S`` times less work in
            the queries, the output projection and the feed-forward block.

    Returns:
        ``[B, S, d]``, or ``[B, d]`` when ``query`` is given.
    """
    attn = layer.self_attn
    heads, d = attn.num_heads, x.shape[-1]
    h = F.layer_norm(x, (d,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    if query is None:
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    else:
        rows = torch.arange(len(x), device=x.device)
        x = x[rows, query].unsqueeze(1)
        mask = mask[rows, :, query].unsqueeze(2)
        q = F.linear(h[rows, query].unsqueeze(1), attn.in_proj_weight[:d], attn.in_proj_bias[:d])
        k, v = F.linear(h, attn.in_proj_weight[d:], attn.in_proj_bias[d:]).chunk(2, dim=-1)
    attended = F.scaled_dot_product_attention(
        _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads), attn_mask=mask
    )
    x = x + attn.out_proj(attended.transpose(1, 2).flatten(-2))
    h = F.layer_norm(x, (d,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    x = x + layer.linear2(layer.activation(layer.linear1(h)))
    return x if query is None else x.squeeze(1)


def run_transformer(
    transformer: nn.TransformerEncoder, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None
) -> torch.Tensor:
    """Every layer of a :func:`make_transformer` encoder through :func:`encoder_layer`, then its norm.

    With ``query [B]`` the last layer is evaluated at that position only and ``[B, d]`` is returned.
    """
    *layers, final = transformer.layers
    for layer in layers:
        x = encoder_layer(layer, x, mask)
    return transformer.norm(encoder_layer(final, x, mask, query))


def reference_transformer(transformer: nn.TransformerEncoder, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The plain ``nn.TransformerEncoder`` call with the same mask (for tests and comparisons)."""
    heads = transformer.layers[0].self_attn.num_heads
    return transformer(x, mask=~mask.squeeze(1).repeat_interleave(heads, dim=0))


class SequenceEncoder(nn.Module):
    """Linear token embedding (+ sinusoidal positions) and a transformer; one vector per sequence.

    ``forward(tokens [B, S, D_in], valid [B, S], last [B]) -> [B, d_model]`` returns the output at
    position ``last`` (the last valid token).

    Args:
        in_dim: token size ``D_in``.
        d_model: embedding size.
        num_heads, num_layers, ff_dim: transformer shape.
        max_len: longest sequence ``S``.
        causal: mask attention to later tokens.
    """

    def __init__(
        self,
        in_dim: int,
        d_model: int,
        num_heads: int,
        num_layers: int,
        ff_dim: int,
        max_len: int,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.causal = causal
        self.embed = nn.Linear(in_dim, d_model)
        self.position = SinusoidalPositionalEncoding(d_model, max_len)
        self.transformer = make_transformer(d_model, num_heads, num_layers, ff_dim)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return self.encode_embedded(self.embed(tokens), valid, last)

    def encode_embedded(self, embedded: torch.Tensor, valid: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` on tokens already embedded, ``[B, S, d_model]``: the embedding is per token,
        so a token shared by several sequences can be embedded once and gathered."""
        x = self.position(embedded)
        return run_transformer(self.transformer, x, attention_mask(valid, self.causal), query=last)

    def forward_reference(self, tokens: torch.Tensor, valid: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The plain path (every position through ``nn.TransformerEncoder``); equal to :meth:`forward`."""
        x = self.position(self.embed(tokens))
        x = reference_transformer(self.transformer, x, attention_mask(valid, self.causal))
        return x[torch.arange(len(x), device=x.device), last]
