"""Transformer building blocks shared by the encoders."""

from __future__ import annotations

import math

import torch
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
    """Pre-LN ``nn.TransformerEncoder`` (batch first, no dropout: PPO needs deterministic log-probs)."""
    layer = nn.TransformerEncoderLayer(
        d_model,
        num_heads,
        dim_feedforward=ff_dim,
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)


def attention_mask(valid: torch.Tensor, num_heads: int, causal: bool) -> torch.Tensor:
    """Boolean attention mask ``[B * num_heads, S, S]`` (True = blocked) from ``valid [B, S]``.

    A query may attend to valid keys (and, if ``causal``, only to earlier ones). Every query may
    always attend to itself, so no row is fully blocked (which would produce NaNs); outputs at
    invalid positions are never read.
    """
    size = valid.shape[-1]
    allowed = valid.unsqueeze(-2).expand(-1, size, -1)
    if causal:
        allowed = allowed & torch.ones(size, size, dtype=torch.bool, device=valid.device).tril()
    allowed = allowed | torch.eye(size, dtype=torch.bool, device=valid.device)
    return (~allowed).repeat_interleave(num_heads, dim=0)


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
        self.num_heads = num_heads
        self.causal = causal
        self.embed = nn.Linear(in_dim, d_model)
        self.position = SinusoidalPositionalEncoding(d_model, max_len)
        self.transformer = make_transformer(d_model, num_heads, num_layers, ff_dim)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        x = self.position(self.embed(tokens))
        mask = attention_mask(valid, self.num_heads, self.causal)
        *layers, final = self.transformer.layers
        for layer in layers:
            x = layer(x, src_mask=mask)
        return self.transformer.norm(last_query_layer(final, x, mask, last))

    def forward_reference(self, tokens: torch.Tensor, valid: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The plain path (every position through every layer); equal to :meth:`forward`."""
        x = self.position(self.embed(tokens))
        x = self.transformer(x, mask=attention_mask(valid, self.num_heads, self.causal))
        return x[torch.arange(len(x), device=x.device), last]


def last_query_layer(
    layer: nn.TransformerEncoderLayer, x: torch.Tensor, mask: torch.Tensor, last: torch.Tensor
) -> torch.Tensor:
    """A pre-LN encoder layer evaluated at one query position per sequence.

    Only the output at ``last [B]`` is read, so the final layer needs its attention and
    feed-forward for that query alone (keys and values still cover the whole sequence): ``T`` times
    less work in that layer.

    Args:
        layer: a ``norm_first`` ``nn.TransformerEncoderLayer`` (its own weights are used).
        x: ``[B, S, d]`` input of the layer.
        mask: ``[B * heads, S, S]`` boolean attention mask (True = blocked).
        last: ``[B]`` query position.

    Returns:
        ``[B, d]``, equal to ``layer(x, src_mask=mask)[arange(B), last]``.
    """
    rows = torch.arange(len(x), device=x.device)
    heads = layer.self_attn.num_heads
    h = layer.norm1(x)
    query = h[rows, last].unsqueeze(1)
    row_mask = mask.view(len(x), heads, *mask.shape[-2:])[rows, :, last].reshape(len(x) * heads, 1, -1)
    attended = layer.self_attn(query, h, h, attn_mask=row_mask, need_weights=False)[0]
    y = x[rows, last].unsqueeze(1) + attended
    y = y + layer.linear2(layer.activation(layer.linear1(layer.norm2(y))))
    return y.squeeze(1)
