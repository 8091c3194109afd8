"""The stage-1 variants study at toy scale: a teacher per variant and seed, the learning curve read at
its snapshots, a floor per token geometry, and the report's arithmetic against the floor."""

from __future__ import annotations

import math

import pytest

from experiments.stage1 import Stage1Study, _versus_floor, run_stage1_study, write_report
from tests.conftest import FAST


def test_every_variant_is_read_against_a_random_init_of_its_own_token_geometry(tmp_path) -> None:
    study = Stage1Study(seeds=[0, 1], variants={"baseline": [], "4 px patches": ["model.patch_size=4"]},
                        curve_steps=[2, 4], num_train=8, num_val=8, overrides=FAST)
    result = run_stage1_study(study, out=tmp_path / "study", progress=False)
    for s in ("0", "1"):
        assert set(result["readings"][s]) == {"baseline", "4 px patches", "curve-2", "curve-4",
                                              "floor:default", "floor:model.patch_size=4"}
    assert (tmp_path / "study" / "config.yaml").is_file() and (tmp_path / "study" / "run_info.yaml").is_file()
    curve = result["teachers"]["0/curve"]
    assert curve["step"] == 4  # trained to the curve's end, read at its snapshot 2 and at 4
    # a 4 px random init has 8x8x8 tokens, the 8 px one 8x4x4: their readings differ
    assert result["readings"]["0"]["floor:default"] != result["readings"]["0"]["floor:model.patch_size=4"]
    text = write_report(result, tmp_path / "STAGE1.md", command="pytest")
    assert "| learning curve, 4 steps |" in text and "| random init (model.patch_size=4) |" in text
    lin = [result["readings"][s]["4 px patches"]["motion"]["top1"] for s in ("0", "1")]
    assert f"{100 * sum(lin) / 2:.1f} ± " in text


@pytest.mark.parametrize("diffs, verdict", [([0.10, 0.12, 0.11], "above"), ([-0.10, -0.12, -0.11], "below"),
                                            ([0.10, -0.09, 0.02], "within")])
def test_versus_floor_clears_two_standard_errors_or_says_within(diffs, verdict) -> None:
    text = _versus_floor(diffs, [0.001] * 3)  # the seeds' spread binds
    se = (sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2) ** 0.5 / math.sqrt(3)
    assert text == f"{100 * sum(diffs) / 3:+.1f} ± {100 * se:.1f} ({verdict})"


def test_versus_floor_never_claims_more_than_the_val_split_can_measure() -> None:
    # two seeds that happen to agree: their spread says 0, one reading's binomial SE says otherwise
    assert _versus_floor([0.003, 0.003], [0.0125, 0.0125]) == "+0.3 ± 0.9 (within)"
