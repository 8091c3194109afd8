"""Attention backends: torch SDPA always; xformers only where it is installed and runs.

xformers 0.0.35 installs on CPU-only machines but has no CPU kernels, so "installed"
is not enough: the first CUDA call probes it once and falls back to SDPA for good if
the probe fails.

Padded batches (masked subsets of different lengths: every training forward) go to
xformers as one packed sequence of the real tokens with a block-diagonal mask, so no
work is spent on padding. `packed_attention` with the SDPA kernel is the same packing
on any device; the tests check it against the padded SDPA path on CPU.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F


@functools.cache
def xformers_works(device_type: str) -> bool:
    if device_type != "cuda":
        return False
    try:
        import xformers.ops as xops

        q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception:  # not installed, no kernel for this GPU, ABI mismatch: all mean "use SDPA"
        return False


def resolve_backend(backend: str, device_type: str) -> str:
    if backend not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"model.attention={backend!r}: expected auto, sdpa or xformers")
    if backend == "sdpa":
        return "sdpa"
    works = xformers_works(device_type)
    if backend == "xformers" and not works:
        raise RuntimeError(f"model.attention=xformers but xformers does not run on device {device_type!r}")
    return "xformers" if works else "sdpa"


def xformers_block_diagonal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[1, T, H, hd] packed sequences of `lengths` -> [1, T, H, hd], each attending within itself."""
    import xformers.ops as xops
    from xformers.ops import fmha

    bias = fmha.BlockDiagonalMask.from_seqlens(q_seqlen=lengths, device=q.device)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)


def sdpa_block_diagonal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The same contract through SDPA and a dense mask: the reference for the xformers kernel."""
    sample = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device))
    mask = sample[:, None] == sample[None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, kernel: Callable | None = None
) -> torch.Tensor:
    """Padded [B, H, N, hd] with valid [B, N] -> the real tokens packed as [1, T, H, hd] -> kernel ->
    back to [B, H, N, hd]. Padded positions come back as zeros (every caller ignores them)."""
    lengths = valid.sum(1).tolist()
    real = valid[:, :, None, None]
    pack = lambda x: x.transpose(1, 2)[valid][None]  # [1, T, H, hd], samples one after another
    out = (kernel or xformers_block_diagonal)(pack(q), pack(k), pack(v), lengths)[0]
    padded = q.new_zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).masked_scatter(real, out)
    return padded.transpose(1, 2)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, *, backend: str = "auto"
) -> torch.Tensor:
    """q, k, v [B, H, N, hd]; valid [B, N] marks real (unpadded) tokens; returns [B, H, N, hd]."""
    if resolve_backend(backend, q.device.type) == "xformers":
        if valid is not None:
            return packed_attention(q, k, v, valid)
        import xformers.ops as xops

        return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    mask = None if valid is None else valid[:, None, None, :]  # keys only: padded queries are ignored later
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
