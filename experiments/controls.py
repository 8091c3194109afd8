"""Teachers whose knowledge is known: the controls that measure stage 2 apart from stage 1.

- `train_label_teachers`: an encoder trained with the labels of the train split
  (`salt.supervised`), saved as teacher run folders at a few step counts: the transfer
  control (a teacher known to carry the tasks) and the rungs of a teacher-quality ladder.
- `save_untrained_teacher`: a randomly initialised encoder saved as a teacher: the
  "student of an untrained teacher" arm.

Each folder holds what `make extract-targets` reads (`checkpoint.safetensors` +
`checkpoint.json` with role "teacher"), so these teachers go through the same
extraction and stage 2 as a V-Pixel teacher.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipeline.labelled import load_labelled
from experiments.probing import probe_data_config
from salt.checkpoint import checkpoint_meta, has_checkpoint, save_snapshot
from salt.config import Config
from salt.models.factory import build_encoder
from salt.runinfo import write_run_info
from salt.supervised import train_with_labels


def _as_teacher(cfg: Config, size: str) -> Config:
    """The config a teacher of `size` records (its run_info and checkpoint say what it is)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, teacher=size))


def label_teacher_dir(out_root: str | Path, step: int) -> Path:
    return Path(out_root) / f"step-{step:06d}"


def save_teacher(cfg: Config, out: str | Path, encoder: torch.nn.Module, *, size: str, step: int, trained_with: str,
                 **run_info: str) -> str:
    """`encoder` (a `size` encoder) saved as a teacher run folder: the weights, checkpoint.json with role
    "teacher", its step and what it was trained with, and the run info (`run_info`: e.g. data=...)."""
    cfg = _as_teacher(cfg, size)
    save_snapshot(out, encoder, checkpoint_meta(cfg, "teacher", encoder.width, step=step, trained_with=trained_with))
    write_run_info(out, cfg, **run_info)
    return str(out)


def train_label_teachers(
    cfg: Config, data: str, out_root: str | Path, *, size: str, steps: list[int], seed: int = 0,
    tasks: list[str] | None = None, lr: float = 2e-3, batch_size: int = 16, schedule_steps: int | None = None,
    progress: bool = True,
) -> dict[int, str]:
    """Trains one `size` encoder (init seed `seed`) on the train split's labels of `tasks` (None:
    every task of labels.json) and saves it at each step count of `steps` as a teacher run folder; {step: folder}.
    The lr schedule spans `schedule_steps` (default: the last of `steps`); the run stops at the last of
    `steps`, so a rung at step 500 of a 2,000-step schedule costs 500 steps and equals the same run's
    step 500 when it goes on to 2,000.

    The clips are the probe's (1 temporal window, the whole frame, no flip), so the label
    teacher and the probe read clips alike. Folders already saved are kept (a rerun trains
    nothing when every one exists)."""
    steps = sorted(set(steps))
    schedule_steps = steps[-1] if schedule_steps is None else schedule_steps
    folders = {s: str(label_teacher_dir(out_root, s)) for s in steps}
    if all(has_checkpoint(f) for f in folders.values()):
        return folders
    train = load_labelled(data, "train", probe_data_config(cfg).data, views=1, tasks=tasks, progress=progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_encoder(cfg, size)
    trained_with = f"labels ({', '.join(sorted(train.labels))}), seed {seed}, a {schedule_steps}-step lr schedule"

    def save(step: int, trained: torch.nn.Module) -> None:
        save_teacher(cfg, folders[step], trained, size=size, step=step, trained_with=trained_with, data=data)

    # Warm-up over a tenth of the schedule, then cosine decay: at a constant 2e-3 one motion encoder of three
    # (data seed 2) stayed at 0.41 after 750 steps; with this schedule the same run reads 0.97 (docs/yardstick.md)
    train_with_labels(
        encoder, train.clips, train.labels, {t: len(n) for t, n in train.class_names.items()},
        steps=steps[-1], batch_size=batch_size, lr=lr, seed=seed, warmup_steps=schedule_steps // 10, cosine=True,
        schedule_steps=schedule_steps, save_at=steps, on_save=save, progress=progress,
    )
    return folders


def save_untrained_teacher(cfg: Config, out: str | Path, *, size: str, seed: int = 0) -> str:
    """A randomly initialised `size` encoder (init seed `seed`) saved as a teacher run folder."""
    if not has_checkpoint(out):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = build_encoder(cfg, size).eval()
        save_teacher(cfg, out, encoder, size=size, step=0, trained_with=f"nothing (random init, seed {seed})")
    return str(out)
