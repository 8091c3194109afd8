"""Stage 1: V-Pixel. The encoder sees the context; the predictor regresses the masked
tubelets' normalised pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch

from salt.checkpoint import checkpoint_meta
from salt.config import Config
from salt.losses import MASKED_DISTANCES, gather_tokens, pixel_targets
from salt.models.factory import build_encoder, build_predictor
from salt.optim import make_optimizer
from salt.train.loop import TrainState, fit


def build_teacher_state(cfg: Config) -> TrainState:
    torch.manual_seed(cfg.teacher.seed)
    encoder = build_encoder(cfg, cfg.model.teacher)
    predictor = build_predictor(cfg, encoder, 3 * cfg.model.tubelet * cfg.model.patch_size**2)
    optimizer = make_optimizer([encoder, predictor], cfg.teacher.optim)
    return TrainState(encoder, predictor, optimizer, distance=MASKED_DISTANCES[cfg.model.pixel_loss])


def stage1_targets(cfg: Config, batch: dict) -> torch.Tensor:
    """The pixels every token of the batch's clips is to predict -> [B, N, tubelet*patch*patch*3]."""
    return pixel_targets(batch["clips"], cfg.model.tubelet, cfg.model.patch_size, normalize=cfg.model.pixel_norm)


def constant_prediction_loss(cfg: Config, batches: Iterable[dict]) -> float:
    """Stage 1's loss for one prediction made at every masked tubelet of these batches (per output
    dim the best constant for the distance: the median for L1, the mean for MSE, fitted on them): the
    level of a predictor that learned nothing of the clip. With normalised pixels it is the
    predict-zero loss; a run whose loss stays near it did not train."""
    distance = MASKED_DISTANCES[cfg.model.pixel_loss]
    pairs = []
    for batch in batches:
        targets = stage1_targets(cfg, batch)
        pairs += [(gather_tokens(targets, m.tgt_idx), m.tgt_valid) for m in batch["masks"]]
    rows = torch.cat([t[v.bool()] for t, v in pairs])  # [masked tubelets, D]
    constant = rows.median(0).values if cfg.model.pixel_loss == "l1" else rows.mean(0)
    return float(torch.stack([distance(constant.expand_as(t), t, v) for t, v in pairs]).mean())


def train_teacher(
    cfg: Config,
    run_dir: str | Path,
    make_batches: Callable[[dict | None], Iterable[dict]],
    *,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Train (or resume) a V-Pixel teacher; `make_batches(loader_state)` gives the loader."""
    state = build_teacher_state(cfg)
    meta = checkpoint_meta(cfg, "teacher", state.encoder.width)
    return fit(
        state,
        run_dir,
        make_batches,
        lambda batch: stage1_targets(cfg, batch),
        cfg.teacher,
        data=cfg.data,
        checkpoint_meta=meta,
        stop_after=stop_after,
        progress=progress,
    )
