"""What both stages share: the masked-prediction loss, the step function, the loop.

Stage 1 and stage 2 differ only in their targets (normalised pixels vs. normalised
teacher latents) and in the predictor's head width, so one step function serves both;
each stage passes a `make_targets(batch) -> [B, N, D]`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from salt.clips import model_clips
from salt.config import DataConfig, TrainConfig
from salt.devices import autocast, default_device, to_device
from salt.losses import gather_tokens, masked_l1
from salt.masking import MaskBatch
from salt.optim import apply_schedule
from salt.checkpoint import has_checkpoint, load_checkpoint
from salt.train.distributed import current, mean_across_ranks
from salt.train.runlog import RunLog, cut_logs


Distance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def masked_prediction_loss(
    encoder: nn.Module, predictor: nn.Module, clips: torch.Tensor, masks: list[MaskBatch], targets: torch.Tensor,
    distance: Distance = masked_l1,
) -> torch.Tensor:
    """Mean over the sample's masks of the distance (L1 unless told) between predictions and
    targets at masked tokens.

    clips [B, 3, T, H, W]; targets [B, N, D] for every token of the grid.
    """
    losses = []
    for m in masks:
        context = encoder(clips, m.ctx_idx, m.ctx_valid)  # [B, Kc, De]
        pred = predictor(context, m.ctx_idx, m.ctx_valid, m.tgt_idx, m.tgt_valid)  # [B, Kt, D]
        losses.append(distance(pred, gather_tokens(targets, m.tgt_idx), m.tgt_valid))
    return torch.stack(losses).mean()


class MaskedPrediction(nn.Module):
    """Encoder + predictor as one module, so DDP sees one forward (both masks) per backward."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module, distance: Distance = masked_l1):
        super().__init__()
        self.encoder, self.predictor, self.distance = encoder, predictor, distance

    def forward(self, clips: torch.Tensor, masks: list[MaskBatch], targets: torch.Tensor) -> torch.Tensor:
        return masked_prediction_loss(self.encoder, self.predictor, clips, masks, targets, self.distance)


@dataclass
class TrainState:
    encoder: nn.Module
    predictor: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    distance: Distance = masked_l1
    model: nn.Module = field(init=False)  # what train_step calls: MaskedPrediction, DDP-wrapped under torchrun

    def __post_init__(self):
        self.model = MaskedPrediction(self.encoder, self.predictor, self.distance)

    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "predictor": self.predictor}


def train_step(state: TrainState, batch: dict, targets: torch.Tensor, cfg: TrainConfig) -> dict:
    """One optimizer step on one batch (already on the model's device); returns its metrics."""
    lr, wd = apply_schedule(state.optimizer, state.step, cfg.optim)
    state.model.train()
    with autocast(batch["clips"].device, cfg.bf16):
        loss = state.model(batch["clips"], batch["masks"], targets)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {state.step}: stopping")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for m in state.modules().values() for p in m.parameters()]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    state.optimizer.step()
    state.step += 1
    return {"loss": loss.item(), "lr": lr, "wd": wd, "grad_norm": grad_norm.item()}


def prepare_batch(batch: dict, device: torch.device | str, data: DataConfig) -> dict:
    """A loader's batch on the training device, with its model input: the uint8 crops are resized,
    flipped and normalised there (`clips` [B, 3, T, S, S], fp32 outside autocast), by the function
    extraction's teacher actor runs on its device, so student and teacher clips agree."""
    out = {k: v for k, v in batch.items() if k != "crops"}
    out["clips"] = model_clips(batch["crops"], batch["flips"], data, device)
    out["masks"] = [m.to(device) for m in batch["masks"]]
    if "targets" in batch:
        out["targets"] = to_device(batch["targets"], device)
    return out


def resume(state: TrainState, run_dir: str | Path) -> dict | None:
    """Load the run folder's checkpoint into `state` if there is one; its logs are cut back to it
    (to nothing when a run was killed before its first checkpoint)."""
    meta = load_checkpoint(run_dir, state.modules(), state.optimizer) if has_checkpoint(run_dir) else None
    if meta:
        state.step = meta["step"]
    cut_logs(run_dir, state.step)
    return meta


def run_training(
    state: TrainState,
    batches: Iterable[dict],
    make_targets: Callable[[dict], torch.Tensor],
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    data: DataConfig,
    device: torch.device,
    checkpoint_meta: dict,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Train until cfg.optim.steps (or `stop_after` more steps): fetch a batch, step, record.

    Data-wait time (waiting on the loader) and compute time are measured apart; the run log
    (salt/train/runlog.py) writes metrics, snapshots, checkpoints and the summary. The logged loss
    is the mean over ranks.
    """
    last = cfg.optim.steps if stop_after is None else min(cfg.optim.steps, state.step + stop_after)
    iterator = iter(batches) if state.step < last else None  # a finished run starts no loader workers
    with RunLog(run_dir, cfg, start_step=state.step, last=last, device=device, checkpoint_meta=checkpoint_meta,
                progress=progress) as log:
        while state.step < last:
            t0 = time.perf_counter()
            loaded = next(iterator)
            t1 = time.perf_counter()  # the resize of prepare_batch is device work: it counts as compute
            batch = prepare_batch(loaded, device, data)
            metrics = train_step(state, batch, make_targets(batch), cfg)
            metrics["loss"] = mean_across_ranks(metrics["loss"], device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            log.record(state, batch, metrics, wait_s=t1 - t0, compute_s=time.perf_counter() - t1)
    return log.summary(state.step)


def fit(
    state: TrainState,
    run_dir: str | Path,
    make_batches: Callable[[dict | None], Iterable[dict]],
    make_targets: Callable[[dict], torch.Tensor],
    cfg: TrainConfig,
    *,
    data: DataConfig,
    checkpoint_meta: dict,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Resume from the run folder if it holds a checkpoint, then train; `data` says how the
    batches' crops become clips (`prepare_batch`).

    `make_batches(loader_state)` builds the loader at the checkpoint's loader position
    (None: the start). Under torchrun the model is wrapped in DDP after loading.
    """
    rank = current()
    device = rank.device if rank.world_size > 1 else default_device()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    # placed before the resume: Optimizer.load_state_dict puts each state tensor on its
    # parameter's device, so moments loaded first would stay on the CPU under CUDA parameters
    state.encoder.to(device)
    state.predictor.to(device)
    meta = resume(state, run_dir)
    if rank.world_size > 1:
        state.model = DistributedDataParallel(state.model, device_ids=[device.index] if device.type == "cuda" else None)
    return run_training(
        state,
        make_batches(meta.get("loader") if meta else None),
        make_targets,
        cfg,
        run_dir,
        data=data,
        device=device,
        checkpoint_meta=checkpoint_meta,
        stop_after=stop_after,
        progress=progress,
    )
