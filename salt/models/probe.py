"""Attentive probe: a small transformer that pools a frozen encoder's tokens into logits.

docs/method.md ("Evaluation"): `depth` blocks over the frozen tokens, the last one a
cross-attention from one learned query, then a linear classifier. No position
embedding: the encoder's tokens already carry their (t, h, w) through its RoPE.
"""

from __future__ import annotations

import torch
from torch import nn

from salt.models.attention import attention
from salt.models.vit import init_weights


class ProbeBlock(nn.Module):
    """Pre-norm attention + GELU MLP. With `context`, the queries attend to it (cross-attention)."""

    def __init__(self, width: int, heads: int, *, mlp_ratio: float = 4.0, attention_backend: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"probe width {width} does not divide into {heads} heads")
        self.heads = heads
        self.attention_backend = attention_backend
        self.norm_q = nn.LayerNorm(width, eps=1e-6)
        self.norm_kv = nn.LayerNorm(width, eps=1e-6)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, Q, D] (queries); context [B, N, D] or None (self-attention) -> [B, Q, D]."""
        b, nq, d = x.shape
        source = x if context is None else context
        q = self.q(self.norm_q(x)).view(b, nq, self.heads, d // self.heads).transpose(1, 2)  # [B, H, Q, hd]
        kv = self.kv(self.norm_kv(source)).view(b, source.shape[1], 2, self.heads, d // self.heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, hd]
        out = attention(q, k, v, None, backend=self.attention_backend)  # [B, H, Q, hd]
        x = x + self.proj(out.transpose(1, 2).reshape(b, nq, d))
        return x + self.mlp(self.norm_mlp(x))


class AttentiveProbe(nn.Module):
    def __init__(self, width: int, num_classes: int, *, depth: int = 4, heads: int, attention_backend: str = "auto"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"probe depth {depth}: needs at least the cross-attention block")
        self.blocks = nn.ModuleList(
            ProbeBlock(width, heads, attention_backend=attention_backend) for _ in range(depth - 1)
        )
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        self.pool = ProbeBlock(width, heads, attention_backend=attention_backend)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)
        init_weights(self)
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D] (frozen encoder output) -> logits [B, C]."""
        x = tokens
        for block in self.blocks:
            x = block(x)  # [B, N, D]
        pooled = self.pool(self.query.expand(x.shape[0], -1, -1), context=x)  # [B, 1, D]
        return self.head(self.norm(pooled[:, 0]))  # [B, C]
