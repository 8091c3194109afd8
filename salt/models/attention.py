"""Attention backends: torch SDPA always; xformers only where it is installed and runs.

xformers 0.0.35 installs on CPU-only machines but has no CPU kernels, so "installed"
is not enough: the first CUDA call probes it once and falls back to SDPA for good if
the probe fails.
"""

from __future__ import annotations

import functools

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


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, *, backend: str = "auto"
) -> torch.Tensor:
    """q, k, v [B, H, N, hd]; valid [B, N] marks real (unpadded) tokens; returns [B, H, N, hd]."""
    if valid is None and resolve_backend(backend, q.device.type) == "xformers":
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    mask = None if valid is None else valid[:, None, None, :]  # keys only: padded queries are ignored later
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
