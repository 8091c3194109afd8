"""The replication study end to end at toy scale: seeds with their own data, every arm, the ladder,
snapshots, probes and the report; and the transfer-control arithmetic."""

from __future__ import annotations

import json
import math

import pytest

from experiments.replication import FLOOR, Study, run_study
from experiments.replication_report import _margin_kept, write_report
from tests.conftest import FAST, tree_digest


def test_study_runs_every_arm_per_seed_and_reports(ray_local, tmp_path) -> None:
    # one label rung: the ladder is still untrained -> labels-4, and each arm costs an extraction per seed
    study = Study(seeds=[0, 1], teacher_steps=2, ladder_steps=[4], ladder_batch=4, student_steps=4, snapshot_every=2,
                  num_train=8, num_val=8, tasks=["motion"], overrides=[*FAST, "probe.epochs=1"])
    assert study.arms() == ["vpixel-same", "untrained", "labels-4"]
    out = tmp_path / "study"
    result = run_study(study, out=out, progress=False)
    # each seed generated its own data
    assert tree_digest(str(out / "seed-0" / "data")) != tree_digest(str(out / "seed-1" / "data"))
    assert set(result["students"]) == {f"{s}/{arm}" for s in (0, 1) for arm in study.arms()}
    store = json.loads((out / "seed-1" / "labels-4" / "targets" / "store.json").read_text())
    assert store["teacher"]["size"] == "vit_cpu_xs" and store["teacher"]["step"] == 4
    vpixel = json.loads((out / "seed-0" / "vpixel-same" / "targets" / "store.json").read_text())
    assert vpixel["teacher"]["size"] == study.student == "vit_cpu_xs"
    probes = result["probes"]["0"]
    expected = {FLOOR} | {f"{role}/{arm}" for role in ("teacher", "student") for arm in study.arms()}
    assert expected <= set(probes)
    # snapshots of the V-Pixel and label-rung students are the R^2 points, over both seeds
    names = sorted(p["name"] for p in result["selection"]["points"])
    assert names == sorted(f"s{s}-{arm}-step{k}" for s in (0, 1) for arm in ("vpixel-same", "labels-4") for k in (2, 4))
    text = write_report(result, tmp_path / "REPLICATION.md", command="pytest", out=out)
    assert "## Teacher-quality ladder" in text and "| labels-4 |" in text and "| untrained |" in text
    kept = [f"{a:.2f} / {b:.2f}".replace("nan", "n/a") for a, b in
            zip(_margin_kept(result, "labels-4", "motion"), _margin_kept(result, "labels-4", "motion", "knn_top1"))]
    assert f"| labels-4 | motion | {kept[0]} | {kept[1]} |" in text  # each seed's share, by both readouts
    knn = [result["probes"][s]["student/labels-4"]["motion"]["knn_top1"] for s in ("0", "1")]
    assert f"{100 * sum(knn) / 2:.1f} ± " in text  # the k-NN readout beside the linear one
    student = [result["probes"][s]["student/labels-4"]["motion"]["top1"] for s in ("0", "1")]
    assert f"{100 * sum(student) / 2:.1f} ± " in text
    assert (out / "selection" / "selection_motion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_margin_kept_is_the_students_share_of_the_teachers_lead_over_the_floor():
    def seed(floor, teacher, student):
        top1 = lambda x: {"motion": {"top1": x, "knn_top1": x / 2}}  # noqa: E731
        return {FLOOR: top1(floor), "teacher/labels-9": top1(teacher), "student/labels-9": top1(student)}

    result = {"probes": {"0": seed(0.4, 0.8, 0.7), "1": seed(0.3, 0.5, 0.2), "2": seed(0.5, 0.5, 0.6)}}
    for readout in ("top1", "knn_top1"):  # a share is a ratio: halving every reading leaves it
        kept = _margin_kept(result, "labels-9", "motion", readout)
        assert math.isclose(kept[0], 0.75) and math.isclose(kept[1], -0.5) and math.isnan(kept[2])


def test_a_ladder_past_its_lr_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match=r"ladder_schedule=400 is shorter than the ladder's top rung \(500 steps\)"):
        Study(ladder_steps=[250, 500], ladder_schedule=400)
