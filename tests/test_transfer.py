"""The transfer control's teachers (experiments/controls.py): encoders whose knowledge is known, saved
as teacher run folders. The control on real clips (a label teacher reads motion far above a random
init) and its chain through extraction to a student are tested beside the probe's label-trained
encoder (tests/test_probe.py). What the control promises, a student that keeps at least half of its
teacher's motion margin, is held by the demo test below (the whole `make demo`, with --run-demo:
`make demo-check`) and measured over seeds by `make replicate` (docs/yardstick.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.controls import save_untrained_teacher, train_label_teachers
from jobs.demo import main as demo
from salt.checkpoint import read_meta
from tests.conftest import tiny_config


def test_label_teachers_are_saved_at_each_rung_and_never_trained_twice(digits, tmp_path):
    """One run, saved at every step count asked for (the rungs of a teacher-quality ladder), each a
    teacher run folder saying what it was trained with; a rerun finds them and trains nothing."""
    cfg = tiny_config()
    folders = train_label_teachers(cfg, digits, tmp_path / "labels", size="vit_cpu_xs", steps=[4, 2], tasks=["motion"],
                                   batch_size=4, progress=False)
    assert sorted(folders) == [2, 4]
    for step, folder in folders.items():
        meta = read_meta(folder)
        assert (meta["role"], meta["step"], meta["encoder"]["size"]) == ("teacher", step, "vit_cpu_xs")
        assert meta["trained_with"] == "labels (motion), seed 0, a 4-step lr schedule"
    weights = {s: (tmp_path / "labels" / f"step-{s:06d}" / "checkpoint.safetensors").read_bytes() for s in folders}
    assert weights[2] != weights[4]  # the lower rung is the same run, earlier
    again = train_label_teachers(cfg, digits, tmp_path / "labels", size="vit_cpu_xs", steps=[2, 4], tasks=["motion"],
                                 batch_size=4, progress=False)
    assert again == folders and all(
        (tmp_path / "labels" / f"step-{s:06d}" / "checkpoint.safetensors").read_bytes() == weights[s] for s in folders)


def test_a_rung_stopped_early_in_a_longer_schedule_is_that_run_at_its_step(digits, tmp_path):
    """The demo's control teacher is step 500 of a 2,000-step lr schedule, trained for 500 steps: the same
    weights as the replicate's labels-500 rung, whose run goes on to 2,000; its own 500-step schedule differs."""
    cfg = tiny_config()
    train = lambda out, steps, schedule=None: train_label_teachers(  # noqa: E731
        cfg, digits, tmp_path / out, size="vit_cpu_xs", steps=steps, tasks=["motion"], batch_size=4,
        schedule_steps=schedule, progress=False)[2]
    weights = lambda folder: (Path(folder) / "checkpoint.safetensors").read_bytes()  # noqa: E731
    early, whole, own = train("early", [2], 4), train("whole", [2, 4]), train("own", [2])
    assert weights(early) == weights(whole) != weights(own)
    assert read_meta(early)["trained_with"] == "labels (motion), seed 0, a 4-step lr schedule"
    with pytest.raises(ValueError, match="schedule_steps=3 is shorter than the run's 4 steps"):
        train("short", [2, 4], 3)


def test_untrained_teacher_is_a_seeded_random_init(tmp_path):
    cfg = tiny_config()
    a = save_untrained_teacher(cfg, tmp_path / "a", size="vit_cpu_xs", seed=3)
    b = save_untrained_teacher(cfg, tmp_path / "b", size="vit_cpu_xs", seed=3)
    c = save_untrained_teacher(cfg, tmp_path / "c", size="vit_cpu_xs", seed=4)
    weights = lambda d: (tmp_path / d / "checkpoint.safetensors").read_bytes()  # noqa: E731
    assert weights("a") == weights("b") != weights("c")
    assert read_meta(a)["role"] == "teacher" and read_meta(a)["step"] == 0


@pytest.mark.demo
def test_the_demo_control_student_keeps_half_of_its_teachers_motion_margin(tmp_path):
    """`make demo` end to end on the embedded dataset (data/moving-digits, written when missing): the control's
    student, which never saw a label, keeps at least half of its label teacher's lead in motion over a random
    init of its size, by the linear readout and by k-NN (REPLICATION.md: 0.92 / 0.64 on this data seed)."""
    summary = demo(["--data", "data/moving-digits", "--run", str(tmp_path / "demo"), "--no-progress"])
    linear, knn = summary["probe_top1"], summary["knn_top1"]
    assert summary["store_errors"] == 0
    for readout in (linear, knn):  # a margin worth keeping: the teacher reads motion far above the floor
        assert readout["control-teacher"]["motion"] - readout["random-xs"]["motion"] > 0.3, readout
    kept = summary["control_margin_kept"]["motion"]
    assert kept["top1"] >= 0.5 and kept["knn_top1"] >= 0.5, kept
