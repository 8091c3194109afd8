"""Stage 2: the student predicts a frozen teacher's normalised latents at masked tokens.

Targets come from the batch (`batch["targets"]`, the stored teacher tokens of every
grid position); this module never builds a teacher. `online_targets` exists for the
cached-equals-online test and the benchmark, which bring their own teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from salt.config import Config
from salt.losses import latent_targets
from salt.optim import make_optimizer
from salt.checkpoint import checkpoint_meta, has_checkpoint, read_meta
from salt.devices import autocast
from salt.train.loop import TrainState, fit
from salt.models.factory import build_encoder, build_predictor


def build_student_state(cfg: Config, teacher_width: int) -> TrainState:
    torch.manual_seed(cfg.student.seed)
    encoder = build_encoder(cfg, cfg.model.student)
    predictor = build_predictor(cfg, encoder, teacher_width)  # latent head of the teacher's width
    return TrainState(encoder, predictor, make_optimizer([encoder, predictor], cfg.student.optim))


def cached_targets(batch: dict) -> torch.Tensor:
    return latent_targets(batch["targets"])


def online_targets(teacher: nn.Module, bf16: bool = False) -> Callable[[dict], torch.Tensor]:
    """Targets from a live teacher, under the student's autocast (bf16 on CUDA when the run uses it),
    so a cached-vs-online comparison times both sides at the same precision."""

    def make(batch: dict) -> torch.Tensor:
        with torch.no_grad(), autocast(batch["clips"].device, bf16):
            return latent_targets(teacher(batch["clips"]).float())

    return make


class TeacherMismatchError(ValueError):
    pass


def check_same_teacher(run_dir: str | Path, store_meta: dict) -> None:
    """A run folder resumes only on targets of the teacher it started with: other targets
    (another teacher's width, or the same width but other weights) would silently change the task."""
    if not has_checkpoint(run_dir):
        return
    had = read_meta(run_dir).get("teacher", {})
    now = store_meta["teacher"]
    for field in ("width", "sha256", "projection"):
        if had.get(field) != now.get(field):
            raise TeacherMismatchError(
                f"run folder {run_dir} was trained on targets of a teacher with {field}={had.get(field)!r}, "
                f"but this store's teacher has {field}={now.get(field)!r}: use a new run folder for a new store"
            )


def train_student(
    cfg: Config,
    run_dir: str | Path,
    make_batches: Callable[[dict | None], Iterable[dict]],
    *,
    teacher_width: int,
    store_meta: dict,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    check_same_teacher(run_dir, store_meta)
    state = build_student_state(cfg, teacher_width)
    meta = checkpoint_meta(cfg, "student", state.encoder.width, teacher=store_meta["teacher"])
    return fit(
        state,
        run_dir,
        make_batches,
        cached_targets,
        cfg.student,
        data=cfg.data,
        checkpoint_meta=meta,
        stop_after=stop_after,
        progress=progress,
    )
