"""The run log of a training run: everything `run_training` records after a step, and where it goes.

- `metrics.jsonl`: one line per logged step (every `log_every` and the last): the step's loss (the
  mean over the global batch), lr, weight decay, grad norm, data-wait and compute seconds, and over
  the steps since the previous line samples/s (all ranks), the data-wait share, TFLOP/s per device
  and MFU, and the peak memory;
- snapshots (`snapshot_every`) and checkpoints (`checkpoint_every`, the last step, and the step a
  preemption stops at: salt/train/preemption.py, which also writes `preempted.json`);
- `bad_clips.jsonl`: each stage-2 clip the loader had to replace (step, key, reason), once;
- `summary.json` and `loss.png` when the run ends;
- the same scalars to TensorBoard and W&B (offline) when `log.tensorboard` / `log.wandb` are on.

Only rank 0 writes, except `samples.rank<r>.jsonl` (`log_samples`: the keys and views of the
step's micro-batches), which every rank writes.

Reads. A step's loss and grad norm stay on the device; the log reads them only at its reads: log
steps, snapshot and checkpoint steps, the last step and a preemption stop. There the ranks sum their
shares of each step's loss (one all-reduce for all the steps since the last read), a non-finite one
stops the run naming its step (before any checkpoint could keep it), and the bad clips are pooled
and checked against data.max_bad_fraction. Those reads are the only host syncs of the loop: under
torch.cuda.set_sync_debug_mode("error") they set the mode aside (`host_reads`), so any other
sync fails.

A resumed run continues the log: `cut_logs` drops lines after the checkpoint's step, metrics.jsonl
appends, and TensorBoard hides the events a killed run wrote after its checkpoint (`purge_step`).

TFLOP/s are the planner's (salt/flops.py, 6ND): FLOPs per sample of the run's role and config,
times samples, over wall time including data wait. They count parameter matmuls only, so MFU here
is the paper's accounting, below what a profiler would count.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import secrets
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from salt.checkpoint import save_checkpoint, save_snapshot
from salt.config import Config, LogConfig, TrainConfig, from_dict
from salt.flops import count_params, inputs_from_config, stage1_flops_per_sample, student_flops_per_sample
from salt.plots import plot_loss_curves
from salt.train.badclips import BadClips
from salt.train.distributed import barrier, current, sum_across_ranks
from salt.train.preemption import write_marker

# A snapshot's loss is the mean training loss of the steps just before it: one batch is too noisy
# to rank checkpoints by.
SNAPSHOT_LOSS_WINDOW = 50

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets, by a substring of
# torch.cuda.get_device_name; the first match wins, so "H100 PCIe" comes before "H100". A device not
# listed (and every CPU) counts as unknown: no MFU unless log.peak_tflops says its peak.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)

TRAIN_SCALARS = ("loss", "lr", "wd", "grad_norm")
PERF_SCALARS = ("samples_per_s", "data_wait_share", "tflops", "mfu", "peak_mem_gb")


def peak_tflops(log: LogConfig, device: torch.device) -> float:
    if log.peak_tflops is not None:
        return log.peak_tflops
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((peak for kind, peak in PEAK_TFLOPS if kind in name), 0.0)


def peak_memory_gb(device: torch.device) -> float:
    """The most the run has held: CUDA memory allocated by torch on a GPU, the process's resident
    set on a CPU (where the model lives in host memory)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9  # bytes on macOS, KiB on Linux


def flops_per_sample(checkpoint_meta: dict) -> float:
    """The planner's training FLOPs of one sample of this run, from the role and config its
    checkpoint records; 0 (no TFLOP/s logged) for a run that records none. A student's predictor
    head is counted at the width of `model.teacher`, a few hundred thousand parameters off for a
    teacher of another width."""
    if "config" not in checkpoint_meta:
        return 0.0
    inp = inputs_from_config(from_dict(Config, checkpoint_meta["config"]))
    per_sample = stage1_flops_per_sample if checkpoint_meta.get("role") == "teacher" else student_flops_per_sample
    return per_sample(inp, count_params(inp))


def cut_logs(run_dir: str | Path, step: int) -> None:
    """Drop lines logged after the checkpoint's step: the resumed run logs them again. Rank 0 also
    cuts the sample logs of ranks a resume on fewer ranks no longer has."""
    rank, run = current(), Path(run_dir)
    paths = [run / f"samples.rank{rank.rank}.jsonl"]
    if rank.is_main:
        paths += [run / "metrics.jsonl", run / "bad_clips.jsonl"]
        paths += [p for p in run.glob("samples.rank*.jsonl") if int(p.stem.removeprefix("samples.rank")) >= rank.world_size]
    for path in paths:
        if path.is_file():
            kept = [l for l in path.read_text().splitlines() if json.loads(l).get("step", 0) <= step]
            path.write_text("".join(l + "\n" for l in kept))


class _TensorBoard:
    def __init__(self, run_dir: Path, log: LogConfig, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("log.tensorboard=true needs tensorboard: pip install 'salt-pipeline[track]'") from None
        # purge_step: events a killed run wrote after its checkpoint (or, killed before its first, at
        # all) are hidden, so the resumed run's steps are the only ones shown from there on
        self.writer = SummaryWriter(str(run_dir / log.tensorboard_dir), purge_step=start_step + 1)

    def write(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, log: LogConfig, config: dict | None):
        try:
            import wandb
        except ImportError:
            raise ImportError("log.wandb=true needs wandb: pip install 'salt-pipeline[track]'") from None
        # one W&B run per run folder: a resumed run continues the id it started with
        id_file = run_dir / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        if not id_file.is_file():
            id_file.write_text(secrets.token_hex(4))
        os.environ["WANDB_MODE"] = "offline"  # also for anything wandb starts on its own
        self.run = wandb.init(
            project=log.wandb_project, name=run_dir.name, id=id_file.read_text().strip(), resume="allow",
            dir=str(run_dir), mode="offline", config=config,
            settings=wandb.Settings(silent=True, disable_git=True, save_code=False, x_disable_stats=True),
        )

    def write(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


@contextlib.contextmanager
def host_reads(device: torch.device):
    """Where the run log reads device values (and copies a checkpoint to the host): the loop's
    planned syncs, allowed under torch.cuda.set_sync_debug_mode("error"), which a test sets to
    show that the steps between them never wait on the device."""
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


class RunLog:
    """What a training loop records after each step (`record`), and the run's summary (`summary`).
    A context manager: files and writers close however the loop ends."""

    def __init__(
        self, run_dir: str | Path, cfg: TrainConfig, *, start_step: int, last: int, device: torch.device,
        checkpoint_meta: dict, progress: bool = True, bad_clips: BadClips | None = None, group=None,
    ):
        self.run_dir, self.cfg, self.device, self.last = Path(run_dir), cfg, device, last
        self.start_step, self.checkpoint_meta = start_step, checkpoint_meta
        self.group = group  # control_group(): where the bad clips are pooled and a preemption waits
        self.bad = bad_clips or BadClips(0.0)
        self.rank = current()
        self.pending: list[torch.Tensor] = []  # the device losses of the steps since the last read
        self.grad_norm: torch.Tensor | None = None
        self.latest: dict = {}  # what the last read found: loss, grad_norm
        main = self.rank.is_main
        self.metrics = (self.run_dir / "metrics.jsonl").open("a") if main else None
        self.samples = (self.run_dir / f"samples.rank{self.rank.rank}.jsonl").open("a") if cfg.log_samples else None
        self.writers: list = []
        if main and start_step < last:  # a finished run, started again, adds nothing to them
            if cfg.log.tensorboard:
                self.writers.append(_TensorBoard(self.run_dir, cfg.log, start_step))
            if cfg.log.wandb:
                self.writers.append(_WandB(self.run_dir, cfg.log, checkpoint_meta.get("config")))
        self.flops = flops_per_sample(checkpoint_meta) if main else 0.0
        self.peak = peak_tflops(cfg.log, device)
        self.bar = tqdm(
            total=last, initial=start_step, desc=self.run_dir.name, disable=not (progress and main), dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 30,  # logs get a line every 30 s, not every step
        )
        self.history: list[float] = []
        self.totals = {"wait": 0.0, "compute": 0.0, "samples": 0}
        self.window = dict(self.totals)  # since the last logged line
        self.t_start = time.perf_counter()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.bar.close()
        for f in (self.metrics, self.samples):
            if f is not None:
                f.close()
        for w in self.writers:
            w.close(failed=exc_type is not None and not issubclass(exc_type, SystemExit))

    def _throughput(self, span: dict) -> dict:
        seconds = max(span["wait"] + span["compute"], 1e-9)
        out = {
            "samples_per_s": span["samples"] * self.rank.world_size / seconds,
            "data_wait_share": span["wait"] / seconds,
            "peak_mem_gb": peak_memory_gb(self.device),
        }
        if self.flops:
            out["tflops"] = self.flops * span["samples"] / seconds / 1e12  # per device
            if self.peak:
                out["mfu"] = out["tflops"] / self.peak
        return out

    def record(self, state, batches: list[dict], metrics: dict, *, wait_s: float, compute_s: float) -> None:
        """After a step (`state.step` is its number, from 1) on its micro-batches (their host values:
        keys, views, index, samples, skipped, bad, loader_state): note it, and at a read log it, then
        snapshot and checkpoint when their cadence says so."""
        step, cfg = state.step, self.cfg
        self.pending.append(metrics["loss"])
        self.grad_norm = metrics["grad_norm"]
        samples = sum(b["samples"] for b in batches)
        for span in (self.totals, self.window):
            span["wait"] += wait_s
            span["compute"] += compute_s
            span["samples"] += samples
        for b in batches:
            self.bad.add(b.get("bad", []), step)
        if self.samples is not None:
            keys = [k for b in batches for k in b["keys"]]
            views = [v for b in batches for v in b["views"]]
            self.samples.write(json.dumps({"step": step, "batch": batches[0]["index"], "keys": keys, "views": views}) + "\n")
            self.samples.flush()
        log_step = step % cfg.log_every == 0 or step == self.last
        snapshot = bool(cfg.snapshot_every) and step % cfg.snapshot_every == 0
        checkpoint = step % cfg.checkpoint_every == 0 or step == self.last
        self.bar.update(1)
        if not (log_step or snapshot or checkpoint):
            return
        self.read(step, batches)
        if self.metrics is not None and log_step:
            perf = self._throughput(self.window)
            self.window = {k: 0 for k in self.window}
            record = {"step": step, **self.latest, "lr": metrics["lr"], "wd": metrics["wd"], "data_wait_s": wait_s,
                      "compute_s": compute_s, "batch": batches[0]["index"], **perf}
            skipped = [s for b in batches for s in b.get("skipped", [])]
            if skipped:
                record["skipped"] = skipped
            if self.bad.known:
                record["bad_clips"] = len(self.bad.known)
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            scalars = {f"train/{k}": record[k] for k in TRAIN_SCALARS if k in record}
            scalars |= {f"perf/{k}": perf[k] for k in PERF_SCALARS if k in perf}
            for w in self.writers:
                w.write(scalars, step)
        if not self.rank.is_main:
            return
        if snapshot:
            window = self.history[-min(cfg.snapshot_every, SNAPSHOT_LOSS_WINDOW) :]
            with host_reads(self.device):
                save_snapshot(self.run_dir / "snapshots" / f"step-{step:06d}", state.encoder,
                              self.checkpoint_meta | {"step": step, "train_loss": sum(window) / len(window)})
        if checkpoint:
            self.checkpoint(state, batches[-1])

    def read(self, step: int, batches: list[dict]) -> None:
        """The steps since the last read: their global losses (summed over ranks), checked finite, and
        the bad clips pooled over ranks and checked against the bound. Every rank calls it at the same steps."""
        if self.pending:
            first = step - len(self.pending) + 1
            with host_reads(self.device):
                losses = sum_across_ranks(torch.stack(self.pending)).tolist()
                grad_norm = float(self.grad_norm)
            self.pending = []
            for i, loss in enumerate(losses):
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss} at step {first + i} (read at step {step}; log_every={self.cfg.log_every}): "
                        "stopping; the run folder's checkpoint is from before it"
                    )
            self.history += losses
            self.latest = {"loss": losses[-1], "grad_norm": grad_norm}
            self.bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        new = self.bad.pool(self.rank.world_size, self.group)
        if new and self.rank.is_main:
            with (self.run_dir / "bad_clips.jsonl").open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
        clips = batches[-1].get("loader_state", {}).get("samples")
        if self.bad.known and clips:
            self.bad.check(clips, step)

    def checkpoint(self, state, batch: dict) -> None:
        meta = self.checkpoint_meta | {"step": state.step, "loader": batch.get("loader_state")}
        if self.bad.known:
            meta["bad_clips"] = self.bad.known
        with host_reads(self.device):
            save_checkpoint(self.run_dir, state.modules(), state.optimizer, meta)

    def preempted(self, state, batch: dict, signal_name: str) -> None:
        """A preemption stops the run after this step: read what is pending, rank 0 checkpoints (unless
        this step's checkpoint is written already) and leaves preempted.json, every rank waits for it."""
        step = state.step
        self.read(step, [batch])
        if self.rank.is_main:
            if not (step % self.cfg.checkpoint_every == 0 or step == self.last):
                self.checkpoint(state, batch)
            write_marker(self.run_dir, step, signal_name, self.rank.world_size)
        barrier(self.group)

    def summary(self, step: int) -> dict:
        """The run's summary.json (and loss.png), after the log is closed. A finished run, started
        again, reports what it did."""
        summary_file = self.run_dir / "summary.json"
        if step == self.start_step and summary_file.is_file():
            return json.loads(summary_file.read_text())
        tail = self.history[-max(1, min(len(self.history), 10)) :] if self.history else [math.nan]
        perf = self._throughput(self.totals)
        summary = {
            "step": step,
            "final_loss": sum(tail) / len(tail),
            "steps_run": step - self.start_step,
            "wall_s": time.perf_counter() - self.t_start,
            "data_wait_fraction": perf.pop("data_wait_share"),
            **perf,
        }
        if self.rank.is_main:
            summary_file.write_text(json.dumps(summary, indent=1) + "\n")
            plot_loss_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", title=f"{self.run_dir.name} training loss")
        return summary
