"""The transfer control: a teacher known to carry motion (trained with labels) goes through
extraction and stage 2; its student, which never sees a label, must keep at least half of
the teacher's margin over a random-init encoder (README, "Evaluation": the transfer control)."""

from __future__ import annotations

import json

import pytest

from pipeline.experiments.controls import save_untrained_teacher, train_label_teachers
from pipeline.extract import extract_targets
from pipeline.experiments.probe import probe_encoders
from pipeline.experiments.runs import run_student
from salt.checkpoint import read_meta
from salt.config import load_config
from tests.conftest import TINY, tiny_config


@pytest.fixture(scope="module")
def transfer_digits(tmp_path_factory) -> str:
    """The embedded dataset as `make data` writes it (512 train / 256 val clips): on 160 clips
    a student kept 19% (400 steps) and 37% (800 steps) of the margin, too little data to carry it."""
    from pipeline.digits import write_moving_digits

    out = str(tmp_path_factory.mktemp("transfer-digits"))
    write_moving_digits(out, progress=False)
    return out


def test_student_of_a_label_teacher_keeps_half_its_margin(transfer_digits, ray_local, tmp_path):
    """The slowest test of the suite (~5 min): the demo's data, 800 student steps, and a student
    of the teacher's own size (`vit_cpu_xs`). Measured on this setting (probe seed 0; floor
    0.234, teacher 0.824): student seeds 0-3 read 0.602, 0.758, 0.797, 0.699 (62-95% kept);
    600 steps read 0.500, 0.570, 0.676, 0.691 (45-77%), too close to the bar to save the time.
    A `vit_cpu_s` student (the demo's) is a lottery here: 0.520 (34% kept) with seed 0 and
    0.715 (76%) with seed 1, and its floor reads 0.31-0.57 across probe seeds (README, "The
    transfer control")."""
    cfg = load_config(TINY, ["student.optim.steps=800", "model.student=vit_cpu_xs"])
    folders = train_label_teachers(cfg, transfer_digits, tmp_path / "labels", size="vit_cpu_xs", steps=[300, 600],
                                   progress=False)
    teacher = folders[600]
    meta = read_meta(teacher)
    assert meta["role"] == "teacher" and meta["step"] == 600 and meta["encoder"]["size"] == "vit_cpu_xs"
    assert read_meta(folders[300])["step"] == 300  # a lower rung of the same run
    store = str(tmp_path / "targets")
    extract_targets(cfg, data=transfer_digits, teacher=teacher, store=store, progress=False)
    assert json.loads((tmp_path / "targets" / "store.json").read_text())["teacher"]["step"] == 600
    run_student(cfg, transfer_digits, store, tmp_path / "student", progress=False)
    specs = {"teacher": teacher, "student": str(tmp_path / "student"), "floor": f"random:{cfg.model.student}"}
    r = {k: v["motion"]["top1"] for k, v in
         probe_encoders(specs, cfg, transfer_digits, tmp_path / "probe", tasks=["motion"], progress=False).items()}
    margin = r["teacher"] - r["floor"]
    assert margin >= 0.2, r  # the control is a control: the teacher carries motion
    assert r["student"] - r["floor"] >= 0.5 * margin, r


def test_untrained_teacher_is_a_seeded_random_init(tmp_path):
    cfg = tiny_config()
    a = save_untrained_teacher(cfg, tmp_path / "a", size="vit_cpu_xs", seed=3)
    b = save_untrained_teacher(cfg, tmp_path / "b", size="vit_cpu_xs", seed=3)
    c = save_untrained_teacher(cfg, tmp_path / "c", size="vit_cpu_xs", seed=4)
    weights = lambda d: (tmp_path / d / "checkpoint.safetensors").read_bytes()  # noqa: E731
    assert weights("a") == weights("b") != weights("c")
    assert read_meta(a)["role"] == "teacher" and read_meta(a)["step"] == 0
