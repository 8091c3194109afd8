"""Frozen-backbone evaluation: encode clips once, then read them three ways.

Pure torch, no files. The attentive probe (docs/method.md, "Evaluation") trains a grid of
heads in one pass over cached features, chooses one on rows of the train split it never
trained on, and is repeated over probe seeds; k-NN and a logistic regression on mean-pooled
tokens are the cheap, seed-free readouts beside it. Why each choice: docs/yardstick.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from salt.config import OptimConfig, ProbeConfig
from salt.models.attentive_probe import AttentiveProbe, layer_norm
from salt.optim import apply_schedule, make_optimizer
from salt.seeds import sample_rng


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
    direction, rotated back to the original axes). Eigenvalues are floored at rel_eps x the
    largest, so directions that hold nothing stay small instead of amplifying rounding noise.
    A diagnostic (probe.norm=whiten): it tells "cannot be read" from "not there"."""
    flat = train.reshape(-1, train.shape[-1]).double()
    mean = flat.mean(0)
    eigvals, eigvecs = torch.linalg.eigh(torch.cov((flat - mean).T))
    scale = (eigvals.clamp_min(0) + rel_eps * eigvals.max()).rsqrt()
    matrix = (eigvecs * scale) @ eigvecs.T  # [D, D]

    def apply(x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - mean.to(x.device)) @ matrix.to(x.device)).to(x.dtype)

    return apply


def standardizing(train: torch.Tensor, *, eps: float = 1e-6) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-feature standardisation fitted on train features [..., D] (a BatchNorm without affine,
    frozen at the train statistics, as MAE's linear probe puts before its classifier).

    Why: a frozen encoder's features can spend nearly all their variance on a few directions
    (a small V-Pixel teacher's tokens: nearly all on per-clip colour); on unit-scale features the
    same probe lr means the same step for every encoder, so readings compare encoders, not
    how well one lr happens to fit each one's scale."""
    flat = train.reshape(-1, train.shape[-1])
    mean, std = flat.mean(0), flat.std(0) + eps

    def apply(x: torch.Tensor) -> torch.Tensor:
        return (x - mean.to(x.device)) / std.to(x.device)

    return apply


def feature_norm(kind: str, train: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """probe.norm: the map fitted on train tokens [N, tokens, D] that every split goes through."""
    if kind == "standardize":
        return standardizing(train)
    if kind == "whiten":
        return whitening(train)
    if kind == "none":
        return lambda x: x
    raise ValueError(f"probe.norm={kind!r}: expected none, standardize or whiten")


def selection_split(n: int, fraction: float, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, select) row indices of a seeded split of n train rows: heads train on `fit` and are
    chosen on `select`, so the split a reading is reported on never chose it."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, round(n * fraction))
    if cut >= n:
        raise ValueError(f"probe.select_fraction={fraction} leaves no train rows of {n} to fit on")
    return order[cut:].sort().values, order[:cut].sort().values


def knn_proba(
    train_f: torch.Tensor, train_y: torch.Tensor, query_f: torch.Tensor, *, num_classes: int, k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Cosine k-NN (DINO's: similarity-weighted votes, exp(sim / T)) over pooled features
    [N, D] -> class scores [M, C] normalised to sum to 1. Deterministic: no training."""
    train_f, query_f = F.normalize(train_f, dim=-1), F.normalize(query_f, dim=-1)
    sims, idx = (query_f @ train_f.T).topk(min(k, len(train_f)), dim=1)  # [M, k]
    votes = torch.zeros(len(query_f), num_classes, device=query_f.device)
    votes.scatter_add_(1, train_y[idx], (sims / temperature).exp())
    return votes / votes.sum(1, keepdim=True)


def linear_proba(
    train_f: torch.Tensor, train_y: torch.Tensor, query_f: torch.Tensor, *, num_classes: int, l2: float,
    max_iter: int = 200,
) -> torch.Tensor:
    """Multinomial logistic regression on pooled features [N, D] (mean cross-entropy + l2 x
    |W|^2, full batch, L-BFGS from zero weights) -> softmax probabilities [M, C]. Deterministic:
    the objective is convex and the start fixed, so no seed enters."""
    w = torch.zeros(train_f.shape[1], num_classes, dtype=train_f.dtype, device=train_f.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=train_f.dtype, device=train_f.device, requires_grad=True)
    optim = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def objective():
        optim.zero_grad()
        loss = F.cross_entropy(train_f @ w + b, train_y) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optim.step(objective)
    return (query_f @ w + b).detach().softmax(-1)


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


@dataclass(frozen=True)
class ReadoutSplits:
    """One task's rows as every readout takes them: frozen tokens and labels of the rows it
    trains on, of the train rows held out to choose a setting, and of val, which only reports.

    train_x [N, tokens, D], train_y [N]; select_x [S, tokens, D], select_y [S] (rows of the
    train split no readout trains on); val_x [M, tokens, D], val_y [M]; val_groups [M] maps each
    val row (a view) to its video (None: a row is a video); labels in range(num_classes).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    select_x: torch.Tensor
    select_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    val_groups: torch.Tensor | None = None

    def map_features(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ReadoutSplits:
        """The same rows with `fn` applied to each split's tokens (train, select, val, in that
        order), e.g. a normalisation fitted on the train rows."""
        return dataclasses.replace(self, train_x=fn(self.train_x), select_x=fn(self.select_x), val_x=fn(self.val_x))


def train_probe_grid(
    splits: ReadoutSplits,
    *,
    probe_cfg: ProbeConfig,
    encoder_heads: int,
    seed: int,
    attention_backend: str = "auto",
    progress: bool = False,
) -> dict:
    """Trains one attentive probe per (lr, wd) of the grid in one pass over the train rows,
    chooses the head with the best top-1 on the selection rows (ties: the lower selection loss)
    and reports that head's top-1 on val (views averaged per video by val_groups); returns it
    with its setting, every head's selection and val top-1 and per-epoch mean train loss, and
    chance.

    A head is initialised from (seed, its lr and wd) and every head sees the same batches
    (seeded by `seed`): the heads are independent draws of the probe, a head trains as it would
    alone, and the choice among them is made on data the reported number never touches.
    Deterministic given `seed`.
    """
    train_x, select_x, val_x, num_classes = splits.train_x, splits.select_x, splits.val_x, splits.num_classes
    device = train_x.device
    train_y, select_y, val_y = splits.train_y.to(device), splits.select_y.to(device), splits.val_y.to(device)
    val_groups = None if splits.val_groups is None else splits.val_groups.to(device)
    heads = probe_cfg.heads or encoder_heads
    prenormed = probe_cfg.depth == 1  # the features are frozen: their LayerNorm is computed once, not per head and step
    if prenormed:
        train_x, select_x, val_x = layer_norm(train_x), layer_norm(select_x), layer_norm(val_x)
    steps_per_epoch = math.ceil(len(train_x) / probe_cfg.batch_size)
    settings = grid_settings(probe_cfg)
    probes, optims, schedules = [], [], []
    for lr, wd in settings:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG alone
            torch.manual_seed(int(sample_rng(seed, "probe head", 0, f"{lr}/{wd}").integers(2**62)))
            probe = AttentiveProbe(train_x.shape[-1], num_classes, depth=probe_cfg.depth, heads=heads,
                                   attention_backend=attention_backend, prenormed=prenormed)
        schedule = head_optim(probe_cfg, lr=lr, wd=wd, steps_per_epoch=steps_per_epoch)
        probes.append(probe.to(device))
        optims.append(make_optimizer([probe], schedule, fused=True))
        schedules.append(schedule)

    order_rng = torch.Generator().manual_seed(seed)
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
        row = {"lr": lr, "wd": wd, "select_top1": None, "select_loss": None, "top1": None,
               "train_loss": losses[k], "diverged_step": diverged[k]}
        if diverged[k] is None:
            select_probs = predict_proba(probe, select_x, batch_size=probe_cfg.batch_size)
            row["select_top1"] = top1(select_probs, select_y)
            row["select_loss"] = F.nll_loss(select_probs.clamp_min(1e-12).log(), select_y).item()
            row["top1"] = top1(predict_proba(probe, val_x, batch_size=probe_cfg.batch_size), val_y, val_groups)
        results.append(row)
    best = max((r for r in results if r["top1"] is not None), key=lambda r: (r["select_top1"], -r["select_loss"]))
    val_labels = group_labels(val_y, val_groups)
    return {
        "top1": best["top1"],
        "select_top1": best["select_top1"],
        "lr": best["lr"],
        "wd": best["wd"],
        "train_loss": best["train_loss"],
        "chance": majority_rate(val_labels),
        "chance_uniform": 1.0 / num_classes,
        "num_classes": num_classes,
        "num_train": len(train_x),
        "num_select": len(select_x),
        "num_val": len(val_labels),
        "val_views": len(val_y),
        "epochs": probe_cfg.epochs,
        "seed": seed,
        "heads": results,
    }


def pooled_readouts(splits: ReadoutSplits, *, probe_cfg: ProbeConfig) -> dict:
    """The two cheap readouts on mean-pooled tokens, standardised with the train rows'
    statistics: cosine k-NN (fixed k and temperature) and logistic regression (its l2 chosen
    on the selection rows from probe.linear_l2s). The same splits as `train_probe_grid`; no
    seed enters either. Returns their val top-1 and the chosen l2."""
    num_classes, val_groups = splits.num_classes, splits.val_groups
    norm = standardizing(splits.train_x.mean(1))
    fit, select, val = (norm(x.mean(1)) for x in (splits.train_x, splits.select_x, splits.val_x))  # [rows, D]
    train_y, select_y, val_y = (y.to(fit.device) for y in (splits.train_y, splits.select_y, splits.val_y))
    knn = dict(num_classes=num_classes, k=probe_cfg.knn_k, temperature=probe_cfg.knn_temperature)
    scored = [
        (top1(linear_proba(fit, train_y, select, num_classes=num_classes, l2=l2), select_y), -l2, l2)
        for l2 in probe_cfg.linear_l2s
    ]
    l2 = max(scored)[2]  # ties: the stronger l2
    return {
        "knn_top1": top1(knn_proba(fit, train_y, val, **knn), val_y, val_groups),
        "linear_top1": top1(linear_proba(fit, train_y, val, num_classes=num_classes, l2=l2), val_y, val_groups),
        "linear_l2": l2,
    }


def over_seeds(runs: list[dict]) -> dict:
    """One task's attentive readings over probe seeds -> {top1 (the mean), sd, per-seed readings,
    seeds} and, for plots and the record, the first seed's chosen head (lr, wd, train_loss, heads)."""
    readings = [r["top1"] for r in runs]
    mean = sum(readings) / len(readings)
    sd = math.sqrt(sum((x - mean) ** 2 for x in readings) / (len(readings) - 1)) if len(readings) > 1 else 0.0
    first = runs[0]
    return {"top1": mean, "sd": sd, "per_seed": readings, "seeds": [r["seed"] for r in runs],
            "lr": first["lr"], "wd": first["wd"], "train_loss": first["train_loss"], "heads": first["heads"]}
