"""What both stages share: the masked-prediction loss, the step function, the loop.

Stage 1 and stage 2 differ only in their targets (normalised pixels vs. normalised
teacher latents) and in the predictor's head width, so one step function serves both;
each stage passes a `make_targets(batch) -> [B, N, D]`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from salt.clips import model_clips
from salt.config import DataConfig, TrainConfig
from salt.devices import autocast, default_device, to_device
from salt.losses import gather_tokens, masked_l1
from salt.masking import MaskBatch
from salt.optim import apply_schedule
from salt.plots import plot_loss_curves
from salt.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint, save_snapshot
from salt.train.distributed import current, mean_across_ranks


# A snapshot's loss is the mean training loss of the steps just before it: one batch is too noisy
# to rank checkpoints by.
SNAPSHOT_LOSS_WINDOW = 50


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


def _cut_log(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint's step: the resumed run logs them again."""
    if path.is_file():
        kept = [l for l in path.read_text().splitlines() if json.loads(l).get("step", 0) <= step]
        path.write_text("".join(l + "\n" for l in kept))


def resume(state: TrainState, run_dir: str | Path) -> dict | None:
    """Load the run folder's checkpoint into `state` if there is one; its logs are cut back to it."""
    if not has_checkpoint(run_dir):
        return None
    meta = load_checkpoint(run_dir, state.modules(), state.optimizer)
    state.step = meta["step"]
    if current().is_main:
        _cut_log(Path(run_dir) / "metrics.jsonl", state.step)
    _cut_log(Path(run_dir) / f"samples.rank{current().rank}.jsonl", state.step)
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
    """Train until cfg.optim.steps (or `stop_after` more steps); log, checkpoint, summarise.

    Data-wait time (waiting on the loader) and compute time are logged apart. Under
    torchrun only rank 0 writes metrics and checkpoints; the logged loss is the mean
    over ranks. The checkpoint carries the loader position of the last trained batch.
    """
    run_dir = Path(run_dir)
    rank = current()
    last = cfg.optim.steps if stop_after is None else min(cfg.optim.steps, state.step + stop_after)
    metrics_file = (run_dir / "metrics.jsonl").open("a") if rank.is_main else None
    samples_file = (run_dir / f"samples.rank{rank.rank}.jsonl").open("a") if cfg.log_samples else None
    bar = tqdm(
        total=last,
        initial=state.step,
        desc=run_dir.name,
        disable=not (progress and rank.is_main),
        dynamic_ncols=True,
        mininterval=0.1 if sys.stderr.isatty() else 30,  # logs get a line every 30 s, not every step
    )
    history: list[float] = []
    wait_total = compute_total = 0.0
    iterator = iter(batches) if state.step < last else None  # a finished run starts no loader workers
    start_step = state.step
    t_start = time.perf_counter()
    while state.step < last:
        t0 = time.perf_counter()
        loaded = next(iterator)
        t1 = time.perf_counter()  # the resize of prepare_batch is device work: it counts as compute
        batch = prepare_batch(loaded, device, data)
        targets = make_targets(batch)
        metrics = train_step(state, batch, targets, cfg)
        metrics["loss"] = mean_across_ranks(metrics["loss"], device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        wait_total += t1 - t0
        compute_total += t2 - t1
        history.append(metrics["loss"])
        if samples_file is not None:
            samples_file.write(json.dumps({"step": state.step, "batch": batch["index"], "keys": batch["keys"], "views": batch["views"]}) + "\n")
            samples_file.flush()
        record = {"step": state.step, **metrics, "data_wait_s": t1 - t0, "compute_s": t2 - t1, "batch": batch["index"]}
        if batch.get("skipped"):
            record["skipped"] = batch["skipped"]
        if metrics_file is not None and (state.step % cfg.log_every == 0 or state.step == last):
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if rank.is_main and cfg.snapshot_every and state.step % cfg.snapshot_every == 0:
            window = history[-min(cfg.snapshot_every, SNAPSHOT_LOSS_WINDOW) :]
            save_snapshot(run_dir / "snapshots" / f"step-{state.step:06d}", state.encoder,
                          checkpoint_meta | {"step": state.step, "train_loss": sum(window) / len(window)})
        if rank.is_main and (state.step % cfg.checkpoint_every == 0 or state.step == last):
            meta = checkpoint_meta | {"step": state.step, "loader": batch.get("loader_state")}
            save_checkpoint(run_dir, state.modules(), state.optimizer, meta)
    bar.close()
    for f in (metrics_file, samples_file):
        if f is not None:
            f.close()
    steps_run = state.step - start_step
    summary_file = run_dir / "summary.json"
    if steps_run == 0 and summary_file.is_file():  # a finished run, started again: report what it did
        return json.loads(summary_file.read_text())
    tail = history[-max(1, min(len(history), 10)) :] if history else [math.nan]
    summary = {
        "step": state.step,
        "final_loss": sum(tail) / len(tail),
        "steps_run": steps_run,
        "wall_s": time.perf_counter() - t_start,
        "data_wait_fraction": wait_total / max(wait_total + compute_total, 1e-9),
    }
    if rank.is_main:
        summary_file.write_text(json.dumps(summary, indent=1) + "\n")
        plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"{run_dir.name} training loss")
    return summary


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
