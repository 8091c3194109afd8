"""Frozen-backbone evaluation: encode clips once, then train a grid of attentive probes.

Pure torch, no files. Every head of the grid sees the same shuffled batches of the same
cached features, so the grid costs one pass over the data (docs/method.md, "Evaluation":
the heads differ only by lr and weight decay; they also share their initialisation, so
the comparison is between settings, not seeds).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from salt.config import OptimConfig, ProbeConfig
from salt.models.probe import AttentiveProbe
from salt.optim import apply_schedule, make_optimizer


def encode_features(
    encoder: nn.Module, clips: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int
) -> torch.Tensor:
    """clips [N, 3, T, H, W] (or an iterable of such batches) -> frozen tokens [N, tokens, D].

    The features stay on the encoder's device: the probes train on them many times over.
    """
    param = next(encoder.parameters(), None)
    device = param.device if param is not None else None  # a parameter-free encoder runs where the clips are
    batches = clips.split(batch_size) if isinstance(clips, torch.Tensor) else clips
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            out = [encoder(b if device is None else b.to(device)).float() for b in batches]  # [B, tokens, D] each
    finally:
        encoder.train(was_training)
    return torch.cat(out)


def effective_rank(features: torch.Tensor) -> float:
    """RankMe (Garrido et al., 2023) of frozen tokens [..., D]: exp of the entropy of the token
    matrix's normalised singular values; 1 when every token points the same way, D when all
    directions are used alike. A collapse check, not a quality score (the SALT paper: RankMe
    does not predict student quality). Through the D x D Gram matrix, so it costs O(N D^2)."""
    x = features.reshape(-1, features.shape[-1]).double()
    singular = torch.linalg.eigvalsh(x.T @ x).clamp_min(0).sqrt()
    p = singular / singular.sum() + 1e-7
    return float(torch.exp(-(p * p.log()).sum()))


def whitening(train: torch.Tensor, *, rel_eps: float = 1e-4) -> Callable[[torch.Tensor], torch.Tensor]:
    """ZCA whitening fitted on frozen train tokens [N, tokens, D]; returns the map to apply to
    any split's tokens [..., D] (centred on the train mean, unit variance along every principal
    direction, rotated back to the original axes).

    Why: a frozen encoder's tokens can carry a task in directions that hold a tiny share of
    their variance (a small V-Pixel teacher's tokens spend ~99% of it on a few per-clip colour
    directions), and the probe's LayerNorm and lr cannot find them in a few epochs. Whitening
    is linear and fitted on the train split only, so it reads what the tokens hold without
    adding to it. Eigenvalues are floored at rel_eps x the largest, so directions that hold
    nothing stay small instead of amplifying rounding noise.
    """
    flat = train.reshape(-1, train.shape[-1]).double()
    mean = flat.mean(0)
    eigvals, eigvecs = torch.linalg.eigh(torch.cov((flat - mean).T))
    scale = (eigvals.clamp_min(0) + rel_eps * eigvals.max()).rsqrt()
    matrix = (eigvecs * scale) @ eigvecs.T  # [D, D]

    def apply(x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - mean.to(x.device)) @ matrix.to(x.device)).to(x.dtype)

    return apply


def grid_settings(cfg: ProbeConfig) -> list[tuple[float, float]]:
    """(lr, wd) of every head, lr-major, in the order results report them."""
    return [(lr, wd) for lr in cfg.lrs for wd in cfg.wds]


def head_optim(cfg: ProbeConfig, *, lr: float, wd: float, steps_per_epoch: int) -> OptimConfig:
    # salt.optim's warmup + cosine schedule, per step; constant weight decay (start == end).
    return OptimConfig(
        steps=cfg.epochs * steps_per_epoch,
        batch_size=cfg.batch_size,
        warmup_steps=cfg.warmup_epochs * steps_per_epoch,
        start_lr=0.0,
        lr=lr,
        final_lr=0.0,
        weight_decay=(wd, wd),
        betas=(0.9, 0.999),
        grad_clip=0.0,
    )


def predict_proba(probe: nn.Module, x: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """features [M, tokens, D] -> softmax probabilities [M, C]."""
    probe.eval()
    with torch.no_grad():
        return torch.cat([probe(b).float().softmax(-1) for b in x.split(batch_size)])


def group_labels(y: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """Per-group label [G] from per-view labels [M]; views of one video must agree."""
    if groups is None:
        return y
    out = torch.full((int(groups.max()) + 1,), -1, dtype=y.dtype, device=y.device).scatter_(0, groups, y)
    if not torch.equal(out[groups], y):
        raise ValueError("views of one video carry different labels")
    return out


def top1(probs: torch.Tensor, y: torch.Tensor, groups: torch.Tensor | None = None) -> float:
    """Top-1 accuracy; with `groups` ([M] video id per view), probabilities are averaged
    over the views of each video before the argmax (the multi-view protocol)."""
    labels = group_labels(y, groups)
    if groups is not None:
        probs = torch.zeros(len(labels), probs.shape[1], device=probs.device).index_add_(0, groups, probs)
    return (probs.argmax(-1) == labels).sum().item() / len(labels)


def majority_rate(y: torch.Tensor) -> float:
    """Accuracy of always answering the most frequent class: the floor a probe must clear."""
    return torch.bincount(y).max().item() / len(y)


def train_probe_grid(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    num_classes: int,
    probe_cfg: ProbeConfig,
    encoder_heads: int,
    val_groups: torch.Tensor | None = None,
    attention_backend: str = "auto",
    progress: bool = False,
) -> dict:
    """Trains one probe per (lr, wd) of the grid in one pass; returns the best head's
    top-1 with its setting, every head's top-1 and per-epoch mean train loss, and chance.

    train_x [N, tokens, D], train_y [N]; val_x [M, tokens, D], val_y [M]; val_groups [M]
    maps each val row (a view) to its video. Deterministic given probe_cfg.seed.
    """
    device = train_x.device
    train_y, val_y = train_y.to(device), val_y.to(device)
    val_groups = None if val_groups is None else val_groups.to(device)
    heads = probe_cfg.heads or encoder_heads
    steps_per_epoch = math.ceil(len(train_x) / probe_cfg.batch_size)
    settings = grid_settings(probe_cfg)
    probes, optims, schedules = [], [], []
    for lr, wd in settings:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG alone
            torch.manual_seed(probe_cfg.seed)
            probe = AttentiveProbe(
                train_x.shape[-1], num_classes, depth=probe_cfg.depth, heads=heads, attention_backend=attention_backend
            )
        schedule = head_optim(probe_cfg, lr=lr, wd=wd, steps_per_epoch=steps_per_epoch)
        probes.append(probe.to(device))
        optims.append(make_optimizer([probe], schedule))
        schedules.append(schedule)

    order_rng = torch.Generator().manual_seed(probe_cfg.seed)
    losses: list[list[float]] = [[] for _ in settings]
    diverged: list[int | None] = [None] * len(settings)
    step = 0
    for _ in tqdm(range(probe_cfg.epochs), desc="probe", unit="epoch", disable=not progress, leave=False):
        sums = [0.0] * len(settings)
        for idx in torch.randperm(len(train_x), generator=order_rng).split(probe_cfg.batch_size):
            idx = idx.to(device)
            x, y = train_x[idx], train_y[idx]
            for k, (probe, optim) in enumerate(zip(probes, optims)):
                if diverged[k] is not None:
                    continue
                probe.train()
                apply_schedule(optim, step, schedules[k])
                loss = F.cross_entropy(probe(x), y)
                if not torch.isfinite(loss):
                    diverged[k] = step  # a too-high lr in the grid must not stop the other heads
                    continue
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                sums[k] += loss.item() * len(idx)
            step += 1
        for k in range(len(settings)):
            if diverged[k] is None:
                losses[k].append(sums[k] / len(train_x))
    if all(d is not None for d in diverged):
        raise FloatingPointError(f"every probe head diverged (first at step {min(diverged)})")

    results = []
    for k, ((lr, wd), probe) in enumerate(zip(settings, probes)):
        acc = None
        if diverged[k] is None:
            acc = top1(predict_proba(probe, val_x, batch_size=probe_cfg.batch_size), val_y, val_groups)
        results.append({"lr": lr, "wd": wd, "top1": acc, "train_loss": losses[k], "diverged_step": diverged[k]})
    best = max((r for r in results if r["top1"] is not None), key=lambda r: r["top1"])  # first of ties: grid order
    val_labels = group_labels(val_y, val_groups)
    return {
        "top1": best["top1"],
        "lr": best["lr"],
        "wd": best["wd"],
        "train_loss": best["train_loss"],
        "chance": majority_rate(val_labels),
        "chance_uniform": 1.0 / num_classes,
        "num_classes": num_classes,
        "num_train": len(train_x),
        "num_val": len(val_labels),
        "val_views": len(val_y),
        "epochs": probe_cfg.epochs,
        "heads": results,
    }
