"""What both stages share: the masked-prediction loss, the step function, the loop.

Stage 1 and stage 2 differ only in their targets (normalised pixels vs. normalised
teacher latents) and in the predictor's head width, so one step function serves both;
each stage passes a `make_targets(batch) -> [B, N, D]`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from salt.config import TrainConfig
from salt.losses import gather_tokens, masked_l1
from salt.masking import MaskBatch
from salt.optim import apply_schedule
from salt.train.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU trains in fp32: bf16 matmuls there are slow and lossy


def masked_prediction_loss(
    encoder: nn.Module, predictor: nn.Module, clips: torch.Tensor, masks: list[MaskBatch], targets: torch.Tensor
) -> torch.Tensor:
    """Mean over the sample's masks of the L1 between predictions and targets at masked tokens.

    clips [B, 3, T, H, W]; targets [B, N, D] for every token of the grid.
    """
    losses = []
    for m in masks:
        context = encoder(clips, m.ctx_idx, m.ctx_valid)  # [B, Kc, De]
        pred = predictor(context, m.ctx_idx, m.ctx_valid, m.tgt_idx, m.tgt_valid)  # [B, Kt, D]
        losses.append(masked_l1(pred, gather_tokens(targets, m.tgt_idx), m.tgt_valid))
    return torch.stack(losses).mean()


@dataclass
class TrainState:
    encoder: nn.Module
    predictor: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0

    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "predictor": self.predictor}


def train_step(state: TrainState, batch: dict, targets: torch.Tensor, cfg: TrainConfig) -> dict:
    """One optimizer step on one batch (already on the model's device); returns its metrics."""
    lr, wd = apply_schedule(state.optimizer, state.step, cfg.optim)
    state.encoder.train()
    state.predictor.train()
    with autocast(batch["clips"].device, cfg.bf16):
        loss = masked_prediction_loss(state.encoder, state.predictor, batch["clips"], batch["masks"], targets)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {state.step}: stopping")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for m in state.modules().values() for p in m.parameters()]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    state.optimizer.step()
    state.step += 1
    return {"loss": loss.item(), "lr": lr, "wd": wd, "grad_norm": grad_norm.item()}


def to_device(batch: dict, device: torch.device) -> dict:
    out = dict(batch)
    out["clips"] = batch["clips"].to(device, non_blocking=True)
    out["masks"] = [m.to(device) for m in batch["masks"]]
    if "targets" in batch:
        out["targets"] = batch["targets"].to(device, non_blocking=True)
    return out


def resume(state: TrainState, run_dir: str | Path) -> dict | None:
    """Load the run folder's checkpoint into `state` if there is one; the metrics file is cut back to it."""
    if not has_checkpoint(run_dir):
        return None
    meta = load_checkpoint(run_dir, state.modules(), state.optimizer)
    state.step = meta["step"]
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file():  # drop lines logged after the checkpoint: they will be logged again
        kept = [l for l in metrics.read_text().splitlines() if json.loads(l).get("step", 0) <= state.step]
        metrics.write_text("".join(l + "\n" for l in kept))
    return meta


def run_training(
    state: TrainState,
    batches: Iterable[dict],
    make_targets: Callable[[dict], torch.Tensor],
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    device: torch.device,
    checkpoint_meta: dict,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Train until cfg.optim.steps (or `stop_after` more steps); log, checkpoint, summarise.

    Data-wait time (waiting on the loader) and compute time are logged apart.
    """
    run_dir = Path(run_dir)
    last = cfg.optim.steps if stop_after is None else min(cfg.optim.steps, state.step + stop_after)
    metrics_file = (run_dir / "metrics.jsonl").open("a")
    bar = tqdm(
        total=last,
        initial=state.step,
        desc=run_dir.name,
        disable=not progress,
        dynamic_ncols=True,
        mininterval=0.1 if sys.stderr.isatty() else 30,  # logs get a line every 30 s, not every step
    )
    history: list[float] = []
    wait_total = compute_total = 0.0
    iterator = iter(batches)
    start_step = state.step
    t_start = time.perf_counter()
    while state.step < last:
        t0 = time.perf_counter()
        batch = to_device(next(iterator), device)
        t1 = time.perf_counter()
        targets = make_targets(batch)
        metrics = train_step(state, batch, targets, cfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        wait_total += t1 - t0
        compute_total += t2 - t1
        history.append(metrics["loss"])
        record = {"step": state.step, **metrics, "data_wait_s": t1 - t0, "compute_s": t2 - t1, "batch": batch["index"]}
        if batch.get("skipped"):
            record["skipped"] = batch["skipped"]
        if state.step % cfg.log_every == 0 or state.step == last:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if state.step % cfg.checkpoint_every == 0 or state.step == last:
            save_checkpoint(run_dir, state.modules(), state.optimizer, checkpoint_meta | {"step": state.step})
    bar.close()
    metrics_file.close()
    steps_run = state.step - start_step
    tail = history[-max(1, min(len(history), 10)) :] if history else [math.nan]
    return {
        "step": state.step,
        "final_loss": sum(tail) / len(tail),
        "steps_run": steps_run,
        "wall_s": time.perf_counter() - t_start,
        "data_wait_fraction": wait_total / max(wait_total + compute_total, 1e-9),
    }


def fit(
    state: TrainState,
    run_dir: str | Path,
    make_batches: Callable[[int], Iterable[dict]],
    make_targets: Callable[[dict], torch.Tensor],
    cfg: TrainConfig,
    *,
    checkpoint_meta: dict,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Resume from the run folder if it holds a checkpoint, then train; `make_batches(start_batch)`."""
    device = default_device()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    resume(state, run_dir)
    state.encoder.to(device)
    state.predictor.to(device)
    return run_training(
        state,
        make_batches(state.step),
        make_targets,
        cfg,
        run_dir,
        device=device,
        checkpoint_meta=checkpoint_meta,
        stop_after=stop_after,
        progress=progress,
    )
