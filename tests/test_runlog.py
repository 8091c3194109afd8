"""The run log (salt/train/runlog.py): TensorBoard and W&B offline writers, the throughput it logs,
and a resumed run continuing its log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from pipeline.shards import list_shards
from pipeline.loaders import ClipStream, TargetStream
from pipeline.store.read import TargetStore
from salt.flops import count_params, inputs_from_config, stage1_flops_per_sample, student_flops_per_sample
from salt.train.student import train_student
from salt.train.teacher import train_teacher
from tests.conftest import read_tensorboard, tiny_config

SCALARS = {"train/loss", "train/lr", "train/wd", "train/grad_norm",
           "perf/samples_per_s", "perf/data_wait_share", "perf/tflops", "perf/peak_mem_gb"}


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def student(cfg, store: str, digits: str, run: Path, make=None, **kwargs) -> dict:
    shards = list_shards(digits)
    make = make or (lambda state: TargetStream(cfg, shards, batch_size=4, store=store).at(state))
    return train_student(cfg, run, make, teacher_width=96, store_meta=TargetStore(store).meta, progress=False, **kwargs)


def test_tensorboard_of_a_teacher_and_a_student_run_holds_every_scalar(digits, store_fp32, tmp_path) -> None:
    t_cfg = tiny_config("teacher.log.tensorboard=true")
    shards = list_shards(digits)
    train_teacher(t_cfg, tmp_path / "teacher", lambda state: ClipStream(t_cfg, shards, batch_size=4).at(state), progress=False)
    s_cfg = tiny_config("student.log.tensorboard=true", "student.log.peak_tflops=0.5")
    student(s_cfg, store_fp32, digits, tmp_path / "student")

    for run, cfg, per_sample in ((tmp_path / "teacher", t_cfg, stage1_flops_per_sample),
                                 (tmp_path / "student", s_cfg, student_flops_per_sample)):
        scalars = read_tensorboard(run / "tensorboard")
        records = read_metrics(run)
        assert SCALARS <= set(scalars), run.name
        # the same numbers as metrics.jsonl, at the same steps
        assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in records]
        # log_every=1: each line's window is its own step, so its TFLOP/s are the planner's FLOPs of
        # its 4 samples over the step's wall time, and samples/s are 4 over that time
        inp = inputs_from_config(cfg)
        flops = per_sample(inp, count_params(inp))
        for r in records:
            seconds = r["data_wait_s"] + r["compute_s"]
            assert r["tflops"] * 1e12 * seconds == pytest.approx(4 * flops, rel=1e-6)
            assert r["samples_per_s"] * seconds == pytest.approx(4, rel=1e-6)
            assert 0 <= r["data_wait_share"] <= 1 and r["peak_mem_gb"] > 0
    # MFU needs the device's peak: a CPU's is unknown unless the config says it
    assert "perf/mfu" not in read_tensorboard(tmp_path / "teacher" / "tensorboard")
    student_records = read_metrics(tmp_path / "student")
    assert [r["mfu"] for r in student_records] == [pytest.approx(r["tflops"] / 0.5) for r in student_records]


@pytest.mark.parametrize("killed_at, resumes_from", [(3, 2), (1, 0)])
def test_a_resumed_run_continues_its_log_at_the_checkpoint(killed_at, resumes_from, digits, store_fp32, tmp_path) -> None:
    """A run killed after step 3 resumes from its step-2 checkpoint (killed after step 1, from the
    start): metrics.jsonl and TensorBoard each show steps 1-4 once, with an uninterrupted run's losses,
    and the resumed event file hides what the killed run logged after the checkpoint."""
    cfg = tiny_config("student.log.tensorboard=true", "student.checkpoint_every=2")
    shards = list_shards(digits)

    def dies_after_the_kill_step(state):
        for i, batch in enumerate(TargetStream(cfg, shards, batch_size=4, store=store_fp32).at(state)):
            if i == killed_at:
                raise RuntimeError("killed")
            yield batch

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        student(cfg, store_fp32, digits, run, make=dies_after_the_kill_step)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, killed_at + 1))
    student(cfg, store_fp32, digits, run)
    student(cfg, store_fp32, digits, tmp_path / "whole")

    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == [r["loss"] for r in read_metrics(tmp_path / "whole")]
    assert read_tensorboard(run / "tensorboard")["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in records]
    first, resumed = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    purges = [e.step for e in EventFileLoader(str(resumed)).Load() if e.HasField("session_log")]
    assert purges == [resumes_from + 1]


def test_a_wandb_offline_run_writes_its_files_in_the_run_folder(digits, store_fp32, tmp_path) -> None:
    cfg = tiny_config("student.log.wandb=true")
    run = tmp_path / "run"
    student(cfg, store_fp32, digits, run, stop_after=2)
    student(cfg, store_fp32, digits, run)  # the resumed run keeps its W&B id
    run_id = (run / "wandb" / "run_id").read_text()
    offline = sorted((run / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(offline) == 2
    for folder in offline:
        history = (folder / f"run-{run_id}.wandb").read_bytes()  # protobuf records: the scalar names appear as they are
        assert all(name.encode() in history for name in SCALARS)
