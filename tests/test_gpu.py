"""What only a CUDA machine can show; every test here is marked gpu and skipped elsewhere (conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.shards import list_shards
from pipeline.stream import TargetStream
from pipeline.targets import TargetStore
from salt.train.student import train_student
from tests.conftest import tiny_config

pytestmark = pytest.mark.gpu

# Not exact: CUDA backward kernels accumulate with atomics (the gathers of masked tokens, attention),
# so two runs of the same steps differ in the last bits, which bf16 autocast can round up to ~1e-3.
LOSS_RTOL = 1e-3


@pytest.mark.parametrize("bf16", [False, True])
def test_resume_on_cuda_equals_an_uninterrupted_run(bf16, store_fp32, digits, tmp_path):
    """A checkpoint loaded onto CUDA parameters: the optimizer's moments must be on CUDA too
    (a resume that left them on the CPU failed at its first step), and training goes on as if
    never stopped."""
    cfg = tiny_config(f"student.bf16={str(bf16).lower()}", "student.optim.steps=6")
    shards = list_shards(digits)
    meta = TargetStore(store_fp32).meta

    def batches(state: dict | None):
        return TargetStream(cfg, shards, batch_size=4, store=store_fp32).at(state)

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    whole, split = tmp_path / "whole", tmp_path / "split"
    train_student(cfg, whole, batches, teacher_width=96, store_meta=meta, progress=False)
    train_student(cfg, split, batches, teacher_width=96, store_meta=meta, progress=False, stop_after=3)
    train_student(cfg, split, batches, teacher_width=96, store_meta=meta, progress=False)
    assert len(losses(whole)) == len(losses(split)) == 6
    assert losses(split) == pytest.approx(losses(whole), rel=LOSS_RTOL)
