"""AdamW with docs/method.md's parameter groups and schedules (pure functions of the step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from salt.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup start_lr -> lr, then cosine lr -> final_lr."""
    if step < cfg.warmup_steps:
        return cfg.start_lr + (cfg.lr - cfg.start_lr) * step / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * progress))


def weight_decay_at(step: int, cfg: OptimConfig) -> float:
    """Cosine from weight_decay[0] to weight_decay[1] over the whole run."""
    start, end = cfg.weight_decay
    progress = min(step / max(cfg.steps, 1), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def make_optimizer(modules: list[nn.Module], cfg: OptimConfig, *, fused: bool = False) -> torch.optim.AdamW:
    """Two groups: weights decay; biases and other 1-D parameters (norm gains) do not. fused: one
    kernel per step (the probe's small heads, where the per-tensor steps cost more than the math)."""
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay[0], "decays": True},
        {"params": no_decay, "weight_decay": 0.0, "decays": False},
    ]
    return torch.optim.AdamW(groups, lr=cfg.start_lr, betas=cfg.betas, fused=fused or None)


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, cfg: OptimConfig) -> tuple[float, float]:
    lr, wd = lr_at(step, cfg), weight_decay_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group["decays"]:
            group["weight_decay"] = wd
    return lr, wd
