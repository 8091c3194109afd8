"""Predictor shared by both stages: context tokens + mask tokens -> a vector per target.

Stage 1 uses a pixel head (one tubelet of pixels per target), stage 2 a latent head of
the teacher's width. Everything else is the same narrow transformer.
"""

from __future__ import annotations

import torch
from torch import nn

from salt.models.vit import Block, Rope3d, init_weights, run_blocks


class Predictor(nn.Module):
    def __init__(
        self,
        *,
        encoder_width: int,
        out_dim: int,
        grid: tuple[int, int, int],
        width: int = 384,
        depth: int = 12,
        heads: int = 12,
        attention_backend: str = "auto",
        rope_pairing: str = "interleaved",
    ):
        super().__init__()
        self.grid = grid
        self.out_dim = out_dim
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))  # learned, zero-initialised
        self.rope = Rope3d(width // heads, grid, pairing=rope_pairing)
        self.blocks = nn.ModuleList(Block(width, heads, self.rope, attention_backend) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, out_dim)
        self.checkpoint_blocks = False  # activation checkpointing (salt/train/switches.py)
        init_weights(self)

    def forward(
        self,
        context: torch.Tensor,
        ctx_idx: torch.Tensor,
        ctx_valid: torch.Tensor,
        tgt_idx: torch.Tensor,
        tgt_valid: torch.Tensor,
    ) -> torch.Tensor:
        """context [B, Kc, De] at ctx_idx [B, Kc] -> predictions [B, Kt, out_dim] at tgt_idx [B, Kt]."""
        b, kt = tgt_idx.shape
        x = torch.cat((self.embed(context), self.mask_token.expand(b, kt, -1)), dim=1)  # [B, Kc+Kt, Dp]
        idx = torch.cat((ctx_idx, tgt_idx), dim=1)
        valid = torch.cat((ctx_valid, tgt_valid), dim=1)
        cos_sin = self.rope.cos_sin(idx)
        x = run_blocks(self.blocks, x, cos_sin, valid, self.checkpoint_blocks)  # [B, Kc+Kt, Dp]
        return self.head(self.norm(x[:, -kt:]))
