"""Frozen-backbone evaluation: read frozen features three ways, in bounded memory, on any number of ranks.

Pure torch, no files. The attentive probe (docs/method.md, "Evaluation") trains a grid of
heads in one pass over frozen features, chooses one on rows of the train split it never
trained on, and is repeated over probe seeds; k-NN and a logistic regression on mean-pooled
tokens are the cheap, seed-free readouts beside it. Why each choice: docs/yardstick.md.

Where the features live: a tensor in memory (tests, small sets) or any `Rows`, which hands out
the tokens of the samples it is asked for, batch by batch (the feature store does:
pipeline/features.py). The attentive probe asks for one batch at a time, so its memory is the
batch's, not the split's; the pooled readouts keep one mean-pooled vector per sample ([N, D]:
small beside the tokens, and what their full-batch solvers need).

Ranks. Under torch.distributed every function here is collective and gives every rank the same
result: a pass over rows splits its batches between the ranks (batch b to rank b % world), and
the attentive heads train data-parallel, each rank taking every world-th sample of the global
batch and the heads' gradients summed across ranks before each step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from salt.config import OptimConfig, ProbeConfig
from salt.models.attentive_probe import AttentiveProbe, layer_norm
from salt.optim import apply_schedule, make_optimizer
from salt.seeds import sample_rng


class Rows(Protocol):
    """Samples read by index: `take(idx, epoch)` -> float32 tokens [len(idx), tokens, D] on the CPU or
    any device. `epoch` picks a sample's view where it has several (augmented train views)."""

    def __len__(self) -> int: ...

    def take(self, idx: torch.Tensor, epoch: int = 0) -> torch.Tensor: ...


class TensorRows:
    """A tensor [N, tokens, D] in memory as `Rows` (the same view every epoch)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        return self.x[idx.to(self.x.device)]


class MappedRows:
    """`fn` applied to each batch another `Rows` hands out (a normalisation, streamed)."""

    def __init__(self, rows: Rows, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.rows, self.fn = rows, fn

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, idx: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        return self.fn(self.rows.take(idx, epoch))


def as_rows(x: torch.Tensor | Rows) -> Rows:
    return TensorRows(x) if isinstance(x, torch.Tensor) else x


def world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(value: object) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    _, size = world()
    if size == 1:
        return [value]
    out: list = [None] * size
    dist.all_gather_object(out, value)
    return out


def batch_indices(n: int, batch_size: int) -> list[torch.Tensor]:
    return list(torch.arange(n).split(batch_size))


def my_batches(n: int, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(b, indices) of this rank's batches of a pass over n samples: batch b goes to rank b % world."""
    rank, size = world()
    for b, idx in enumerate(batch_indices(n, batch_size)):
        if b % size == rank:
            yield b, idx


def in_batch_order(pieces: list[dict[int, torch.Tensor]]) -> list[torch.Tensor]:
    """Per-rank {batch: value} dicts -> the values in batch order."""
    merged = {b: v for piece in pieces for b, v in piece.items()}
    return [merged[b] for b in sorted(merged)]


def encode_features(
    encoder: nn.Module, clips: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int
) -> torch.Tensor:
    """clips [N, 3, T, H, W] (or an iterable of such batches) -> frozen tokens [N, tokens, D], in memory.

    For small sets (the tests, a label-trained encoder's checks). The probe itself streams clips
    through the feature store (pipeline/features.py) and never holds a split's tokens."""
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


def rank_of_gram(gram: torch.Tensor) -> float:
    """RankMe from the D x D Gram matrix of the tokens (float64): see `effective_rank`."""
    singular = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    p = singular / singular.sum() + 1e-7
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(features: torch.Tensor) -> float:
    """RankMe (Garrido et al., 2023) of frozen tokens [..., D]: exp of the entropy of the token
    matrix's normalised singular values; 1 when every token points the same way, D when all
    directions are used alike. A collapse check, not a quality score (the SALT paper: RankMe
    does not predict student quality). Through the D x D Gram matrix, so it costs O(N D^2)."""
    x = features.reshape(-1, features.shape[-1]).double()
    return rank_of_gram(x.T @ x)


@dataclass(frozen=True)
class RowSummary:
    """One streamed pass over samples: each sample's mean-pooled tokens (pooled [N, D], float32, the
    same numbers as tokens.mean(1) in memory) and the Gram matrix of all their tokens (float64 [D, D])."""

    pooled: torch.Tensor
    gram: torch.Tensor


def summarize_rows(rows: Rows, *, batch_size: int, progress: bool = False, desc: str = "features") -> RowSummary:
    """Pooled vectors and the token Gram matrix of every sample (epoch 0's view), one pass, batches
    split between the ranks; every rank gets the whole result.

    Each batch's tokens go through one float64 buffer allocated once, and the sums accumulate in
    place: a large temporary per batch let glibc's heap grow by about its size every batch (its
    mmap threshold adapts upwards to freed blocks; measured: +0.7 MB per batch of 16, 660 MB over
    8,000 clips, where this loop stays flat)."""
    rank, size = world()
    n = len(rows)
    pooled: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    flat64: torch.Tensor | None = None
    mine = list(my_batches(n, batch_size))
    for b, idx in tqdm(mine, desc=desc, unit="batch", disable=not progress, leave=False):
        x = rows.take(idx).float().cpu()  # [B, tokens, D]
        if pooled is None:
            pooled = torch.empty(n, x.shape[-1])
            gram = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
        torch.mean(x, 1, out=pooled[int(idx[0]) : int(idx[-1]) + 1])  # the batches are runs of consecutive samples
        tokens = x.reshape(-1, x.shape[-1])
        if flat64 is None or len(flat64) < len(tokens):
            flat64 = torch.empty(len(tokens), tokens.shape[1], dtype=torch.float64)
        buffer = flat64[: len(tokens)]
        buffer.copy_(tokens)
        gram.addmm_(buffer.T, buffer)
    if size == 1:
        return RowSummary(pooled=pooled, gram=gram)
    width = next(w for w in gather(None if pooled is None else pooled.shape[-1]) if w is not None)
    gram = torch.zeros(width, width, dtype=torch.float64) if gram is None else gram
    dist.all_reduce(gram)
    pieces = gather({b: pooled[int(idx[0]) : int(idx[-1]) + 1].clone() for b, idx in mine} if pooled is not None else {})
    return RowSummary(pooled=torch.cat(in_batch_order(pieces)), gram=gram)


def whitening(train: torch.Tensor, *, rel_eps: float = 1e-4) -> Callable[[torch.Tensor], torch.Tensor]:
    """ZCA whitening fitted on frozen train tokens [N, tokens, D]; returns the map to apply to
    any split's tokens [..., D] (centred on the train mean, unit variance along every principal
    direction, rotated back to the original axes). Eigenvalues are floored at rel_eps x the
    largest, so directions that hold nothing stay small instead of amplifying rounding noise.
    A diagnostic (probe.norm=whiten): it tells "cannot be read" from "not there"."""
    flat = train.reshape(-1, train.shape[-1]).double()
    mean = flat.mean(0)
    return whitening_of(mean, torch.cov((flat - mean).T), rel_eps=rel_eps)


def whitening_of(mean: torch.Tensor, cov: torch.Tensor, *, rel_eps: float = 1e-4) -> Callable[[torch.Tensor], torch.Tensor]:
    """`whitening` from the train tokens' mean [D] and covariance [D, D] (float64)."""
    eigvals, eigvecs = torch.linalg.eigh(cov)
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
    return standardizing_of(flat.mean(0), flat.std(0), eps=eps)


def standardizing_of(mean: torch.Tensor, std: torch.Tensor, *, eps: float = 1e-6) -> Callable[[torch.Tensor], torch.Tensor]:
    """`standardizing` from the train features' mean and standard deviation [D]."""
    std = std + eps

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


def streamed_norm(kind: str, rows: Rows, *, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """probe.norm fitted on the tokens of `rows` (epoch 0's view) in one streamed pass.

    standardize: each batch's count, mean and centred sum of squares (float64), combined in batch
    order (Chan et al.'s pairwise update), so the statistics are the same bits on any number of
    ranks; they agree with `standardizing` on the same tokens in memory to float32 rounding.
    whiten: each batch's mean and Gram matrix (float64), combined in batch order (a diagnostic:
    its D x D per batch is gathered from every rank)."""
    if kind == "none":
        return lambda x: x
    if kind not in ("standardize", "whiten"):
        raise ValueError(f"probe.norm={kind!r}: expected none, standardize or whiten")
    parts: dict[int, tuple] = {}
    flat64: torch.Tensor | None = None
    for b, idx in my_batches(len(rows), batch_size):
        tokens = rows.take(idx).float().cpu()
        tokens = tokens.reshape(-1, tokens.shape[-1])  # [B * tokens, D]
        if flat64 is None or len(flat64) < len(tokens):  # one buffer for every batch (see summarize_rows)
            flat64 = torch.empty(len(tokens), tokens.shape[1], dtype=torch.float64)
        flat = flat64[: len(tokens)]
        flat.copy_(tokens)
        mean = flat.mean(0)
        if kind == "whiten":
            parts[b] = (len(flat), mean, torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64).addmm_(flat.T, flat))
        else:
            flat.sub_(mean).square_()
            parts[b] = (len(flat), mean, flat.sum(0))
    ordered = in_batch_order(gather(parts))
    if kind == "whiten":
        n = sum(count for count, _, _ in ordered)
        mean = sum(count * m for count, m, _ in ordered) / n
        gram = sum(g for _, _, g in ordered)
        return whitening_of(mean, (gram - n * torch.outer(mean, mean)) / (n - 1))
    n, mean, m2 = ordered[0]
    for count, m, s in ordered[1:]:
        delta = m - mean
        mean = mean + delta * count / (n + count)
        m2 = m2 + s + delta**2 * n * count / (n + count)
        n += count
    return standardizing_of(mean.float(), (m2 / (n - 1)).sqrt().float())


def selection_split(n: int, fraction: float, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, select) row indices of a seeded split of n train rows: heads train on `fit` and are
    chosen on `select`, so the split a reading is reported on never chose it."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, round(n * fraction))
    if cut >= n:
        raise ValueError(f"probe.select_fraction={fraction} leaves no train rows of {n} to fit on")
    return order[cut:].sort().values, order[:cut].sort().values


class SubsetRows:
    """The samples `idx` of another `Rows`, renumbered 0..len(idx)-1."""

    def __init__(self, rows: Rows, idx: torch.Tensor):
        self.rows, self.idx = rows, idx

    def __len__(self) -> int:
        return len(self.idx)

    def take(self, idx: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        return self.rows.take(self.idx[idx.cpu()], epoch)


KNN_BLOCK_ELEMENTS = 1 << 22


def knn_proba(
    train_f: torch.Tensor, train_y: torch.Tensor, query_f: torch.Tensor, *, num_classes: int, k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Cosine k-NN (DINO's: similarity-weighted votes, exp(sim / T)) over pooled features
    [N, D] -> class scores [M, C] normalised to sum to 1. Deterministic: no training."""
    train_f, query_f = F.normalize(train_f, dim=-1), F.normalize(query_f, dim=-1)
    # the similarities of a block of queries at a time: [M, N] at once grew with the data set (K400's
    # val x train would be ~15 GB); a block of KNN_BLOCK_ELEMENTS similarities is 16 MB
    block = max(1, KNN_BLOCK_ELEMENTS // max(1, len(train_f)))
    top = [(q @ train_f.T).topk(min(k, len(train_f)), dim=1) for q in query_f.split(block)]
    sims, idx = torch.cat([t.values for t in top]), torch.cat([t.indices for t in top])  # [M, k]
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
    cfg = cfg.resolved()
    return [(lr, wd) for lr in cfg.lrs for wd in cfg.wds]


def head_optim(cfg: ProbeConfig, *, lr: float, wd: float, steps_per_epoch: int) -> OptimConfig:
    # salt.optim's warmup + cosine schedule, per step; constant weight decay (start == end).
    cfg = cfg.resolved()
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


def predict_proba(
    probe: nn.Module, x: torch.Tensor | Rows, *, batch_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """features [M, tokens, D] (or `Rows` of M samples) -> softmax probabilities [M, C] on the CPU;
    batches split between the ranks, every rank gets all M."""
    rows = as_rows(x)
    device = device or next(probe.parameters()).device
    probe.eval()
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for b, idx in my_batches(len(rows), batch_size):
            out[b] = probe(rows.take(idx).to(device)).float().softmax(-1).cpu()
    return torch.cat(in_batch_order(gather(out)))


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
    """One task's samples as every readout takes them: frozen tokens and labels of the samples it
    trains on, of the train samples held out to choose a setting, and of val, which only reports.

    train_x [N, tokens, D] or `Rows` of N, train_y [N]; select_x (S samples), select_y [S] (train
    samples no readout trains on); val_x (M samples), val_y [M]; val_groups [M] maps each val sample
    (a view) to its video (None: a sample is a video); labels in range(num_classes).
    """

    train_x: torch.Tensor | Rows
    train_y: torch.Tensor
    select_x: torch.Tensor | Rows
    select_y: torch.Tensor
    val_x: torch.Tensor | Rows
    val_y: torch.Tensor
    num_classes: int
    val_groups: torch.Tensor | None = None

    def map_features(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ReadoutSplits:
        """The same samples with `fn` applied to each split's tokens (train, select, val, in that
        order), e.g. a normalisation fitted on the train samples: at once to a tensor, batch by
        batch to `Rows`."""
        def mapped(x):
            return fn(x) if isinstance(x, torch.Tensor) else MappedRows(x, fn)

        return dataclasses.replace(self, train_x=mapped(self.train_x), select_x=mapped(self.select_x),
                                   val_x=mapped(self.val_x))


def train_probe_grid(
    splits: ReadoutSplits,
    *,
    probe_cfg: ProbeConfig,
    encoder_heads: int,
    seed: int,
    attention_backend: str = "auto",
    progress: bool = False,
    device: torch.device | str | None = None,
) -> dict:
    """Trains one attentive probe per (lr, wd) of the grid in one pass over the train samples,
    chooses the head with the best top-1 on the selection samples (ties: the lower selection loss)
    and reports that head's top-1 on val (views averaged per video by val_groups); returns it
    with its setting, every head's selection and val top-1 and per-epoch mean train loss, and
    chance.

    A head is initialised from (seed, its lr and wd) and every head sees the same batches
    (seeded by `seed`): the heads are independent draws of the probe, a head trains as it would
    alone, and the choice among them is made on data the reported number never touches.
    Deterministic given `seed`. Epoch e reads the train samples' view e (`Rows.take`). The
    batches come one at a time: memory is a batch's tokens and the heads. `device`: where the
    heads train (default: a tensor's device, else the CPU).
    """
    probe_cfg = probe_cfg.resolved()
    rank, size = world()
    train, select, val = as_rows(splits.train_x), as_rows(splits.select_x), as_rows(splits.val_x)
    num_classes = splits.num_classes
    if device is None:
        device = splits.train_x.device if isinstance(splits.train_x, torch.Tensor) else torch.device("cpu")
    train_y = splits.train_y.to(device)
    select_y, val_y = splits.select_y.cpu(), splits.val_y.cpu()
    val_groups = None if splits.val_groups is None else splits.val_groups.cpu()
    heads = probe_cfg.heads or encoder_heads
    prenormed = probe_cfg.depth == 1  # the features are frozen: their LayerNorm is computed once per batch, not per head
    if prenormed:
        train, select, val = (MappedRows(r, layer_norm) if not isinstance(r, TensorRows) else TensorRows(layer_norm(r.x))
                              for r in (train, select, val))
    width = train.take(torch.tensor([0])).shape[-1]
    n = len(train)
    steps_per_epoch = math.ceil(n / probe_cfg.batch_size)
    settings = grid_settings(probe_cfg)
    probes, optims, schedules = [], [], []
    for lr, wd in settings:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG alone
            torch.manual_seed(int(sample_rng(seed, "probe head", 0, f"{lr}/{wd}").integers(2**62)))
            probe = AttentiveProbe(width, num_classes, depth=probe_cfg.depth, heads=heads,
                                   attention_backend=attention_backend, prenormed=prenormed)
        schedule = head_optim(probe_cfg, lr=lr, wd=wd, steps_per_epoch=steps_per_epoch)
        probes.append(probe.to(device))
        optims.append(make_optimizer([probe], schedule, fused=True))
        schedules.append(schedule)

    order_rng = torch.Generator().manual_seed(seed)
    losses: list[list[float]] = [[] for _ in settings]
    diverged: list[int | None] = [None] * len(settings)
    step = 0
    for epoch in tqdm(range(probe_cfg.epochs), desc="probe", unit="epoch", disable=not progress, leave=False):
        sums = [0.0] * len(settings)
        for idx in torch.randperm(n, generator=order_rng).split(probe_cfg.batch_size):
            mine = idx[rank::size]  # this rank's share of the global batch
            x, y = train.take(mine, epoch).to(device), train_y[mine.to(device)]
            alive = [k for k in range(len(settings)) if diverged[k] is None]
            batch_loss = {}
            for k in alive:
                probe = probes[k]
                probe.train()
                apply_schedule(optims[k], step, schedules[k])
                # the global batch's mean: this rank's sum over the global count (equal, bit for
                # bit, to the mean on one rank), summed across ranks below
                loss = F.cross_entropy(probe(x), y, reduction="sum") / len(idx)
                if size == 1 and not torch.isfinite(loss):
                    diverged[k] = step  # a too-high lr in the grid must not stop the other heads
                    continue
                optims[k].zero_grad(set_to_none=True)
                loss.backward()
                batch_loss[k] = loss.detach()
            if size > 1:
                batch_loss = reduce_heads(probes, batch_loss)
            for k, loss in batch_loss.items():
                if not torch.isfinite(loss):
                    diverged[k] = step
                    continue
                optims[k].step()
                sums[k] += loss.item() * len(idx)
            step += 1
        for k in range(len(settings)):
            if diverged[k] is None:
                losses[k].append(sums[k] / n)
    if all(d is not None for d in diverged):
        raise FloatingPointError(f"every probe head diverged (first at step {min(diverged)})")

    results = []
    for k, ((lr, wd), probe) in enumerate(zip(settings, probes)):
        row = {"lr": lr, "wd": wd, "select_top1": None, "select_loss": None, "top1": None,
               "train_loss": losses[k], "diverged_step": diverged[k]}
        if diverged[k] is None:
            select_probs = predict_proba(probe, select, batch_size=probe_cfg.batch_size, device=device)
            row["select_top1"] = top1(select_probs, select_y)
            row["select_loss"] = F.nll_loss(select_probs.clamp_min(1e-12).log(), select_y).item()
            row["top1"] = top1(predict_proba(probe, val, batch_size=probe_cfg.batch_size, device=device), val_y,
                               val_groups)
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
        "num_train": n,
        "num_select": len(select),
        "num_val": len(val_labels),
        "val_views": len(val_y),
        "epochs": probe_cfg.epochs,
        "seed": seed,
        "heads": results,
    }


def reduce_heads(probes: list[nn.Module], losses: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Sum the live heads' gradients and losses across ranks in one all-reduce; returns each head's
    global loss (non-finite on every rank alike when any rank's was)."""
    heads = sorted(losses)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for k in heads for p in probes[k].parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.stack([losses[k] for k in heads]).to(grads[0].dtype)])
    dist.all_reduce(flat)
    offset = 0
    for k in heads:
        for p in probes[k].parameters():
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
    return {k: flat[offset + i] for i, k in enumerate(heads)}


def pooled_readouts(splits: ReadoutSplits, *, probe_cfg: ProbeConfig) -> dict:
    """The two cheap readouts on mean-pooled tokens (tensors in memory): see `read_pooled`."""
    return read_pooled(splits.train_x.mean(1), splits.train_y, splits.select_x.mean(1), splits.select_y,
                       splits.val_x.mean(1), splits.val_y, num_classes=splits.num_classes,
                       val_groups=splits.val_groups, probe_cfg=probe_cfg)


def read_pooled(
    train_f: torch.Tensor, train_y: torch.Tensor, select_f: torch.Tensor, select_y: torch.Tensor, val_f: torch.Tensor,
    val_y: torch.Tensor, *, num_classes: int, val_groups: torch.Tensor | None, probe_cfg: ProbeConfig,
) -> dict:
    """The two cheap readouts on mean-pooled tokens [samples, D], standardised with the train
    samples' statistics: cosine k-NN (fixed k and temperature) and logistic regression (its l2
    chosen on the selection samples from probe.linear_l2s). The same splits as
    `train_probe_grid`; no seed enters either. Returns their val top-1 and the chosen l2."""
    norm = standardizing(train_f)
    fit, select, val = (norm(x) for x in (train_f, select_f, val_f))  # [samples, D]
    train_y, select_y, val_y = (y.to(fit.device) for y in (train_y, select_y, val_y))
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
