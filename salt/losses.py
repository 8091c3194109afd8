"""The masked-prediction distances, and the targets of both stages.

Each sample's loss is the mean distance over its own target tokens (and dims), then
averaged over samples: padding never weighs in, and a sample's loss does not depend on
which other samples share its batch. Stage 2 is always L1 (the paper's latent loss); stage 1
takes L1 or MSE (`model.pixel_loss`: the paper names both for its pixel objective).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D], idx [B, K] -> [B, K, D]."""
    return torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))


def _per_sample_mean(err: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    err = err * valid  # [B, K]
    return (err.sum(1) / valid.sum(1).clamp_min(1)).mean()


def masked_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """pred, target [B, K, D]; valid [B, K] -> scalar mean over samples of per-sample MAE."""
    return _per_sample_mean((pred.float() - target.float()).abs().mean(-1), valid)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """As masked_l1, with the squared error (VideoMAE's pixel objective)."""
    return _per_sample_mean((pred.float() - target.float()).square().mean(-1), valid)


MASKED_DISTANCES = {"l1": masked_l1, "mse": masked_mse}


def patchify(clips: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """clips [B, C, T, H, W] -> [B, N, tubelet*patch*patch, C] in token order (t, h, w)."""
    b, c, t, h, w = clips.shape
    x = clips.reshape(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, T', H', W', tubelet, p, p, C]
    return x.reshape(b, -1, tubelet * patch * patch, c)


def pixel_targets(clips: torch.Tensor, tubelet: int, patch: int, *, normalize: bool = True) -> torch.Tensor:
    """Per-tubelet, per-channel normalised pixels (VideoMAE's norm_pix_loss) -> [B, N, tubelet*p*p*C].

    Per-channel statistics make the targets invariant to the ImageNet mean/std applied
    to the clip, so stage 1 can take the normalised clip directly. normalize=False gives
    the clip's own (ImageNet-normalised) pixels, colour and brightness included.
    """
    x = patchify(clips.float(), tubelet, patch)
    if normalize:
        x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return x.flatten(-2)


def latent_targets(teacher_tokens: torch.Tensor) -> torch.Tensor:
    """Parameter-free LayerNorm over the feature dim of the teacher's output tokens."""
    return F.layer_norm(teacher_tokens.float(), teacher_tokens.shape[-1:])
