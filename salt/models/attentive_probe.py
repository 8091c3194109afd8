"""Attentive probe: a small transformer that pools a frozen encoder's tokens into logits.

docs/method.md ("Evaluation"): `depth` blocks over the frozen tokens, the last one a
cross-attention from one learned query, then a linear classifier. No position
embedding: the encoder's tokens already carry their (t, h, w) through its RoPE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *, normed: bool = False) -> torch.Tensor:
        """x [B, Q, D] (queries; with context, [1, Q, D] serves every sample alike); context [B, N, D]
        or None (self-attention) -> [B, Q, D]. normed: the context already went through `layer_norm`."""
        b, nq, d = x.shape
        q = self.q(self.norm_q(x)).view(b, nq, self.heads, d // self.heads).transpose(1, 2)  # [B, H, Q, hd]
        if context is None:
            kv = self.kv(self.norm_kv(x)).view(b, nq, 2, self.heads, d // self.heads)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, hd]
            out = attention(q, k, v, None, backend=self.attention_backend)  # [B, H, Q, hd]
        else:
            out = self._pool(q, context if normed else layer_norm(context))
        x = x + self.proj(out.transpose(1, 2).reshape(out.shape[0], nq, d))
        return x + self.mlp(self.norm_mlp(x))

    def _pool(self, q: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """Cross-attention of a few queries q [B or 1, H, Q, hd] over context tokens after a
        parameter-free LayerNorm, normed [B, N, D] -> [B, H, Q, hd].

        The same numbers as norm_kv (with its scale and shift), then keys and values for all N
        tokens, at a fraction of the cost: a query's logits are its key-space vector pulled back
        through the key weights and the norm's scale, dotted with the tokens (the shift and the key
        bias add one constant per query, which the softmax ignores), and the affine maps after the
        norm commute with the attention average, so they act once on the pooled tokens."""
        heads, d = self.heads, normed.shape[-1]
        gamma, beta = self.norm_kv.weight, self.norm_kv.bias  # [D]
        w_k, w_v = self.kv.weight.view(2, heads, d // heads, d).unbind(0)  # [H, hd, D] each
        b_v = self.kv.bias.view(2, heads, 1, d // heads)[1]  # [H, 1, hd]
        b, nq = normed.shape[0], q.shape[2]
        pulled = torch.einsum("bhqe,hed->bhqd", q, w_k) * gamma * (d // heads) ** -0.5  # [B or 1, H, Q, D]
        if pulled.shape[0] == 1:  # one query set for every sample (the learned query): one matmul over all tokens
            logits = (normed @ pulled.reshape(heads * nq, d).T).transpose(1, 2)  # [B, HQ, N]
        else:  # against the tokens as they lie ([B, N, D] and its transposed view): no copy of them
            logits = torch.bmm(pulled.reshape(b, heads * nq, d), normed.transpose(1, 2))  # [B, HQ, N]
        pooled = torch.bmm(logits.softmax(-1), normed).view(b, heads, nq, d) * gamma + beta  # [B, H, Q, D]
        return torch.einsum("bhqd,hed->bhqe", pooled, w_v) + b_v  # [B, H, Q, hd]


def layer_norm(tokens: torch.Tensor) -> torch.Tensor:
    """The parameter-free part of the blocks' LayerNorm (eps 1e-6), per token [..., D]."""
    return F.layer_norm(tokens, (tokens.shape[-1],), eps=1e-6)


class AttentiveProbe(nn.Module):
    """prenormed (depth 1 only): forward takes tokens already through `layer_norm`. The grid
    trainer normalises the frozen tokens once, instead of every head at every step."""

    def __init__(self, width: int, num_classes: int, *, depth: int = 4, heads: int, attention_backend: str = "auto",
                 prenormed: bool = False):
        super().__init__()
        if depth < 1:
            raise ValueError(f"probe depth {depth}: needs at least the cross-attention block")
        if prenormed and depth > 1:
            raise ValueError(f"probe depth {depth}: only the cross-attention block alone can take prenormed tokens")
        self.prenormed = prenormed
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
        pooled = self.pool(self.query, context=x, normed=self.prenormed)  # [B, 1, D]
        return self.head(self.norm(pooled[:, 0]))  # [B, C]
