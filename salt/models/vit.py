"""Video ViT with 3D rotary position embeddings (no absolute position embedding).

Tokens are tubelets of `tubelet x patch x patch` pixels, ordered (t, h, w). A model can
run on any subset of tokens: callers pass the token indices, and RoPE takes each
token's (t, h, w) from its index, so a masked subset keeps its true positions.
Variable-length subsets are padded; `valid` marks real tokens and padded keys are
never attended to. With `checkpoint_blocks` on (training's activation checkpointing), each
block's activations are recomputed in the backward pass instead of kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from salt.models.attention import attention


@dataclass(frozen=True, kw_only=True)
class VitSize:
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0


# docs/method.md's encoder sizes, plus small ones that train on a CPU in minutes.
VIT_SIZES: dict[str, VitSize] = {
    "vit_cpu_xs": VitSize(width=64, depth=3, heads=2),
    "vit_cpu_s": VitSize(width=96, depth=4, heads=3),
    "vit_cpu_m": VitSize(width=192, depth=6, heads=3),
    "vit_b": VitSize(width=768, depth=12, heads=12),
    "vit_l": VitSize(width=1024, depth=24, heads=16),
    "vit_h": VitSize(width=1280, depth=32, heads=16),
    # g and G use wider MLPs (hidden 6144 and 8192): that is what makes them 1.01B and 1.84B
    "vit_g": VitSize(width=1408, depth=40, heads=16, mlp_ratio=48 / 11),
    "vit_G": VitSize(width=1664, depth=48, heads=16, mlp_ratio=64 / 13),
}


def vit_size(name: str) -> VitSize:
    if name not in VIT_SIZES:
        raise ValueError(f"unknown model size {name!r}; known: {', '.join(VIT_SIZES)}")
    return VIT_SIZES[name]


def token_grid(frames: int, crop_size: int, tubelet: int, patch_size: int) -> tuple[int, int, int]:
    if frames % tubelet or crop_size % patch_size:
        raise ValueError(
            f"frames={frames} must divide by tubelet={tubelet} and crop_size={crop_size} by patch_size={patch_size}"
        )
    return frames // tubelet, crop_size // patch_size, crop_size // patch_size


ROPE_PAIRINGS = ("interleaved", "vjepa2")


class Rope3d(nn.Module):
    """Rotary embedding over (t, h, w): the head dim is split in three equal parts.

    `pairing` says which frequency each rotated pair of dims gets. "interleaved" (this project's
    default): both dims of a pair share one frequency, so attention depends on relative position
    only. "vjepa2": dim j of an axis part gets frequency j mod (part/2), as V-JEPA 2's released
    checkpoints were trained (the two dims of a pair then turn by different angles); an encoder
    trained with it maps exactly onto V-JEPA 2's layout (`make export`, docs/export.md)."""

    def __init__(self, head_dim: int, grid: tuple[int, int, int], theta: float = 10_000.0, pairing: str = "interleaved"):
        super().__init__()
        if pairing not in ROPE_PAIRINGS:
            raise ValueError(f"rope pairing {pairing!r}: expected one of {', '.join(ROPE_PAIRINGS)}")
        self.axis_dim = 2 * ((head_dim // 3) // 2)
        self.grid = grid
        self.pairing = pairing
        inv_freq = 1.0 / theta ** (torch.arange(0, self.axis_dim, 2, dtype=torch.float64) / self.axis_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def positions(self, idx: torch.Tensor) -> torch.Tensor:
        _, h, w = self.grid
        return torch.stack((idx // (h * w), (idx // w) % h, idx % w), dim=-1)  # [B, N, 3]

    def cos_sin(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.positions(idx).to(self.inv_freq.dtype)
        angles = pos[..., None] * self.inv_freq  # [B, N, 3, axis_dim/2]
        if self.pairing == "vjepa2":
            angles = torch.cat((angles, angles), dim=-1).flatten(-2)  # [B, N, 3*axis_dim]
        else:
            angles = angles.repeat_interleave(2, dim=-1).flatten(-2)  # [B, N, 3*axis_dim]
        return angles.cos()[:, None], angles.sin()[:, None]  # [B, 1, N, 3*axis_dim]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [B, H, N, head_dim]; dims past 3*axis_dim are left unrotated
        n = cos.shape[-1]
        rot, rest = x[..., :n], x[..., n:]
        pairs = rot.unflatten(-1, (-1, 2))
        rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return torch.cat((rot * cos.to(x.dtype) + rotated_half * sin.to(x.dtype), rest), dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: RoPE self-attention + GELU MLP."""

    def __init__(self, width: int, heads: int, rope: Rope3d, attention_backend: str = "auto", mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.rope = rope
        self.attention_backend = attention_backend
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], valid: torch.Tensor | None):
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, hd]
        q, k = self.rope.apply(q, *cos_sin), self.rope.apply(k, *cos_sin)
        out = attention(q, k, v, valid, backend=self.attention_backend)  # [B, H, N, hd]
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, cos_sin, valid: torch.Tensor | None, checkpointed: bool) -> torch.Tensor:
    """The blocks in turn; checkpointed (and grads on): each block keeps only its input for the
    backward pass and runs again there (same ops, same values), trading compute for memory."""
    for block in blocks:
        if checkpointed and torch.is_grad_enabled():
            x = checkpoint(block, x, cos_sin, valid, use_reentrant=False)
        else:
            x = block(x, cos_sin, valid)
    return x


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VideoViT(nn.Module):
    def __init__(
        self,
        size: str,
        *,
        frames: int,
        crop_size: int,
        patch_size: int,
        tubelet: int,
        attention_backend: str = "auto",
        rope_pairing: str = "interleaved",
    ):
        super().__init__()
        spec = vit_size(size)
        self.size_name = size
        self.width = spec.width
        self.grid = token_grid(frames, crop_size, tubelet, patch_size)
        self.num_tokens = math.prod(self.grid)
        self.patch_embed = nn.Conv3d(
            3, spec.width, kernel_size=(tubelet, patch_size, patch_size), stride=(tubelet, patch_size, patch_size)
        )
        self.rope = Rope3d(spec.width // spec.heads, self.grid, pairing=rope_pairing)
        self.blocks = nn.ModuleList(
            Block(spec.width, spec.heads, self.rope, attention_backend, spec.mlp_ratio) for _ in range(spec.depth)
        )
        self.norm = nn.LayerNorm(spec.width, eps=1e-6)
        self.checkpoint_blocks = False  # activation checkpointing (salt/train/switches.py)
        init_weights(self)

    def forward(
        self, clips: torch.Tensor, idx: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """clips [B, 3, T, H, W] -> tokens [B, N or len(idx), width]; idx/valid [B, K] select tokens."""
        x = self.patch_embed(clips).flatten(2).transpose(1, 2)  # [B, N, D]
        if idx is None:
            idx = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        else:
            x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, D]
        cos_sin = self.rope.cos_sin(idx)
        x = run_blocks(self.blocks, x, cos_sin, valid, self.checkpoint_blocks)
        return self.norm(x)
