"""What both stages share: the masked-prediction loss, the step function, the loop.

Stage 1 and stage 2 differ only in their targets (normalised pixels vs. normalised
teacher latents) and in the predictor's head width, so one step function serves both;
each stage passes a `make_targets(batch) -> [B, N, D]`.
"""

from __future__ import annotations

import contextlib
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
from salt.batching import BatchPlan, plan_for
from salt.checkpoint import has_checkpoint, load_checkpoint
from salt.train.badclips import BadClips
from salt.train.distributed import control_group, current
from salt.train.preemption import PREEMPTED_EXIT, Preempted, PreemptionWatch, take_marker
from salt.train.runlog import RunLog, cut_logs
from salt.train.switches import apply_switches


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
    """One optimizer step on one batch (already on the model's device): `accumulation_step` with
    a single micro-batch of weight 1."""
    return accumulation_step(state, [(batch, targets, 1.0)], 1, cfg)


def accumulation_step(
    state: TrainState, micro_batches: Iterable[tuple[dict, torch.Tensor, float]], count: int, cfg: TrainConfig
) -> dict:
    """One optimizer step over `count` micro-batches: (batch on the model's device, its targets, its
    loss scale: salt/batching.py: BatchPlan.weight), taken one at a time, so only one is on the
    device at once; their gradients accumulate, and DDP reduces them on the last backward.

    Nothing here waits on the device: `loss` (float64, this rank's share of the step's global mean
    loss, summed over ranks by the run log) and `grad_norm` come back as device tensors, read only
    at the run log's reads, where a non-finite loss stops the run (salt/train/runlog.py)."""
    world = current().world_size
    lr, wd = apply_schedule(state.optimizer, state.step, cfg.optim)
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    share = None
    for j, (batch, targets, weight) in enumerate(micro_batches):
        ddp = isinstance(state.model, DistributedDataParallel)
        with state.model.no_sync() if ddp and j < count - 1 else contextlib.nullcontext():
            with autocast(batch["clips"].device, cfg.bf16):
                loss = state.model(batch["clips"], batch["masks"], targets)
            (loss if weight == 1.0 else loss * weight).backward()
        part = loss.detach().double() * (weight / world)
        share = part if share is None else share + part
    params = [p for m in state.modules().values() for p in m.parameters()]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    state.optimizer.step()
    state.step += 1
    return {"loss": share, "lr": lr, "wd": wd, "grad_norm": grad_norm.detach()}


def prepare_batch(batch: dict, device: torch.device | str, data: DataConfig) -> dict:
    """A loader's batch on the training device, with its model input: the uint8 crops are resized,
    flipped and normalised there (`clips` [B, 3, T, S, S], fp32 outside autocast), by the function
    extraction's teacher actor runs on its device, so student and teacher clips agree."""
    out = {k: v for k, v in batch.items() if k != "crops"}
    out["clips"] = model_clips(batch["crops"], batch["flips"], data, device)
    out["masks"] = [m.to(device) for m in batch["masks"]]
    if "targets" in batch:  # they travel in the store's dtype (fp16: half the bytes) and become fp32 here
        out["targets"] = to_device(batch["targets"], device).float()
    return out


def resume(state: TrainState, run_dir: str | Path) -> dict | None:
    """Load the run folder's checkpoint into `state` if there is one; its logs are cut back to it
    (to nothing when a run was killed before its first checkpoint)."""
    meta = load_checkpoint(run_dir, state.modules(), state.optimizer) if has_checkpoint(run_dir) else None
    if meta:
        state.step = meta["step"]
    cut_logs(run_dir, state.step)
    return meta


# what the run log keeps of a micro-batch once it has trained: host values only
KEPT = ("keys", "views", "index", "skipped", "bad", "loader_state")


def micro_batches(iterator, plan: BatchPlan, step: int, device: torch.device, data: DataConfig,
                  make_targets: Callable[[dict], torch.Tensor], kept: list[dict], waits: list[float]):
    """The step's micro-batches, fetched and put on the device one at a time (as accumulation_step
    takes them): (batch, targets, weight). Each one's host values go to `kept`, its loader wait to `waits`."""
    for j in range(plan.accumulation):
        t0 = time.perf_counter()
        loaded = next(iterator)
        waits.append(time.perf_counter() - t0)
        cut = (loaded.get("micro", j), loaded.get("micro_batches", plan.accumulation))
        loader_batch = loaded.get("loader_state", {}).get("batch_size", plan.global_batch)
        if cut != (j, plan.accumulation) or loader_batch != plan.global_batch:
            raise ValueError(
                f"step {step + 1}: the loader gives micro-batch {cut[0]} of {cut[1]} of a global batch of {loader_batch}, "
                f"but this run expects micro-batch {j} of {plan.accumulation} of {plan.global_batch} ({plan.describe()})"
            )
        batch = prepare_batch(loaded, device, data)
        samples = batch["clips"].shape[0]
        kept.append({k: loaded[k] for k in KEPT if k in loaded} | {"samples": samples})
        yield batch, make_targets(batch), plan.weight(loaded.get("planned", samples))


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
    bad_clips: dict[str, str] | None = None,
) -> dict:
    """Train until cfg.optim.steps (or `stop_after` more steps): fetch the step's micro-batches,
    step, record; stop after a whole step on SIGTERM / SIGUSR1 (salt/train/preemption.py).

    No step waits on the device: the run log reads the losses at its log steps and checkpoints,
    and the loop's only per-step agreement between ranks (the preemption flag) is a CPU collective.
    Data-wait time (waiting on the loader, host time: with the device running behind, it can
    overlap device work) and compute time are measured apart. `bad_clips`: the stage-2 clips
    a resumed run had already found bad (salt/train/badclips.py).
    """
    rank = current()
    plan = plan_for(cfg.optim, rank.world_size, data.views_per_decode)
    last = cfg.optim.steps if stop_after is None else min(cfg.optim.steps, state.step + stop_after)
    iterator = iter(batches) if state.step < last else None  # a finished run starts no loader workers
    group = control_group()
    bad = BadClips(data.max_bad_fraction, bad_clips)
    try:
        with PreemptionWatch() as watch, RunLog(run_dir, cfg, start_step=state.step, last=last, device=device,
                                                checkpoint_meta=checkpoint_meta, progress=progress, bad_clips=bad,
                                                group=group) as log:
            while state.step < last:
                kept, waits = [], []
                t0 = time.perf_counter()  # the resize of prepare_batch is device work: it counts as compute
                micro = micro_batches(iterator, plan, state.step, device, data, make_targets, kept, waits)
                metrics = accumulation_step(state, micro, plan.accumulation, cfg)
                wait = sum(waits)
                log.record(state, kept, metrics, wait_s=wait, compute_s=time.perf_counter() - t0 - wait)
                signal_name = watch.agreed(rank.world_size, group)
                if signal_name and state.step < last:
                    log.preempted(state, kept[-1], signal_name)
                    if rank.is_main:
                        print(f"{Path(run_dir).name}: preempted by {signal_name} after step {state.step}; "
                              f"checkpoint written; exit status {PREEMPTED_EXIT}", flush=True)
                    raise Preempted(state.step, signal_name, run_dir)
        return log.summary(state.step)
    finally:
        close_batches(batches)


def close_batches(batches: Iterable[dict]) -> None:
    """Release what the batches hold now: a loader's worker processes (pipeline/loaders.py:
    WorkerLoader.close), a generator's frames; an iterable without `close` holds nothing to release."""
    close = getattr(batches, "close", None)
    if callable(close):
        close()


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
    (None: the start), on this run's world size, whatever the checkpoint's was. The memory and
    speed switches apply before DDP wraps the model under torchrun.
    """
    rank = current()
    device = rank.device if rank.world_size > 1 else default_device()
    plan = plan_for(cfg.optim, rank.world_size, data.views_per_decode)  # a batch that does not split fails here
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    # placed before the resume: Optimizer.load_state_dict puts each state tensor on its
    # parameter's device, so moments loaded first would stay on the CPU under CUDA parameters
    state.encoder.to(device)
    state.predictor.to(device)
    meta = resume(state, run_dir)
    if rank.is_main:
        say_where(run_dir, state.step, cfg.optim.steps, plan, meta, take_marker(run_dir))
    apply_switches(state.encoder, state.predictor, cfg)
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
        checkpoint_meta=checkpoint_meta | {"batch": plan.as_dict()},
        stop_after=stop_after,
        progress=progress,
        bad_clips=(meta or {}).get("bad_clips"),
    )


def say_where(run_dir: str | Path, step: int, steps: int, plan: BatchPlan, meta: dict | None, preempted: dict | None) -> None:
    """Rank 0's first lines: the batch split, and where a resumed run resumes (and why)."""
    name = Path(run_dir).name
    print(f"{name}: {plan.describe()}", flush=True)
    if meta is None or step >= steps:
        return
    was = (meta.get("batch") or {}).get("world_size")
    moved = f", world size {was} -> {plan.world_size}" if was and was != plan.world_size else ""
    why = f" after a preemption ({preempted['signal']})" if preempted else ""
    seen = (meta.get("loader") or {}).get("samples_seen", step * plan.global_batch)
    print(f"{name}: resuming{why} at step {step} of {steps} from its checkpoint (global samples seen {seen}{moved})", flush=True)
