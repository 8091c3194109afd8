"""The transfer control's teachers (experiments/controls.py): encoders whose knowledge is known, saved
as teacher run folders. The control on real clips (a label teacher reads motion far above a random
init) and its chain through extraction to a student are tested beside the probe's label-trained
encoder (tests/test_probe.py); the student's share of the margin is measured by `make demo` and
`make replicate` (docs/yardstick.md, "The transfer control on this data")."""

from __future__ import annotations

from experiments.controls import save_untrained_teacher, train_label_teachers
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
        assert meta["trained_with"] == "labels (motion), seed 0"
    weights = {s: (tmp_path / "labels" / f"step-{s:06d}" / "checkpoint.safetensors").read_bytes() for s in folders}
    assert weights[2] != weights[4]  # the lower rung is the same run, earlier
    again = train_label_teachers(cfg, digits, tmp_path / "labels", size="vit_cpu_xs", steps=[2, 4], tasks=["motion"],
                                 batch_size=4, progress=False)
    assert again == folders and all(
        (tmp_path / "labels" / f"step-{s:06d}" / "checkpoint.safetensors").read_bytes() == weights[s] for s in folders)


def test_untrained_teacher_is_a_seeded_random_init(tmp_path):
    cfg = tiny_config()
    a = save_untrained_teacher(cfg, tmp_path / "a", size="vit_cpu_xs", seed=3)
    b = save_untrained_teacher(cfg, tmp_path / "b", size="vit_cpu_xs", seed=3)
    c = save_untrained_teacher(cfg, tmp_path / "c", size="vit_cpu_xs", seed=4)
    weights = lambda d: (tmp_path / d / "checkpoint.safetensors").read_bytes()  # noqa: E731
    assert weights("a") == weights("b") != weights("c")
    assert read_meta(a)["role"] == "teacher" and read_meta(a)["step"] == 0
