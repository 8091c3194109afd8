"""The replication study end to end at toy scale: both arms, snapshots, probes, the report."""

from __future__ import annotations

import json

from pipeline.replication import Study, run_study, write_report
from tests.conftest import FAST


def test_study_runs_both_arms_and_reports_what_it_measured(digits, ray_local, tmp_path) -> None:
    study = Study(teacher_steps=2, student_steps=4, snapshot_every=2,
                  overrides=[*FAST, "probe.epochs=1", "teacher.optim.warmup_steps=1", "student.optim.warmup_steps=1"])
    out = tmp_path / "study"
    result = run_study(study, data=digits, out=out, progress=False)
    assert set(result["teachers"]) == set(result["students"]) == {"same", "small"}
    assert json.loads((out / "small" / "targets" / "store.json").read_text())["teacher"]["size"] == "vit_cpu_xs"
    points = result["selection"]["points"]
    assert sorted(p["name"] for p in points) == ["same-step2", "same-step4", "small-step2", "small-step4"]
    assert [p["name"] for p in points if p["final"]] == ["same-step4", "small-step4"]
    assert set(result["probes"]) == {p["name"] for p in points} | {"teacher-same", "teacher-small", "random"}
    text = write_report(result, tmp_path / "REPLICATION.md", command="pytest", out=out)
    student = result["probes"]["same-step4"]["motion"]["top1"]
    assert f"| student of the same teacher | " in text and f"{100 * student:.1f}" in text
    assert (out / "selection" / "selection_motion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
