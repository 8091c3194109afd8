"""Stage 1: V-Pixel. The encoder sees the context; the predictor regresses the masked
tubelets' normalised pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch

from salt.checkpoint import checkpoint_meta
from salt.config import Config
from salt.losses import MASKED_DISTANCES, pixel_targets
from salt.models.factory import build_encoder, build_predictor
from salt.optim import make_optimizer
from salt.train.loop import TrainState, fit


def build_teacher_state(cfg: Config) -> TrainState:
    torch.manual_seed(cfg.teacher.seed)
    encoder = build_encoder(cfg, cfg.model.teacher)
    predictor = build_predictor(cfg, encoder, 3 * cfg.model.tubelet * cfg.model.patch_size**2)
    optimizer = make_optimizer([encoder, predictor], cfg.teacher.optim)
    return TrainState(encoder, predictor, optimizer, distance=MASKED_DISTANCES[cfg.model.pixel_loss])


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
    tubelet, patch = cfg.model.tubelet, cfg.model.patch_size
    meta = checkpoint_meta(cfg, "teacher", state.encoder.width)
    return fit(
        state,
        run_dir,
        make_batches,
        lambda batch: pixel_targets(batch["clips"], tubelet, patch, normalize=cfg.model.pixel_norm),
        cfg.teacher,
        data=cfg.data,
        checkpoint_meta=meta,
        stop_after=stop_after,
        progress=progress,
    )
