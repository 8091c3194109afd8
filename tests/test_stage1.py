"""The stage-1 variants study at toy scale: a teacher per variant and seed, the learning curve read at
its snapshots, a floor per token geometry, and the report's arithmetic against the floor."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.runs import first_teacher_batches
from experiments.stage1 import EARLIER, Stage1Study, _versus_floor, block_name, run_stage1_study, write_report
from salt.losses import MASKED_DISTANCES, gather_tokens
from salt.train.teacher import constant_prediction_loss, stage1_targets
from tests.conftest import FAST, tiny_config


def test_every_variant_is_read_against_a_random_init_of_its_own_token_geometry(tmp_path) -> None:
    study = Stage1Study(seeds=[0, 1], variants={"baseline": [], "4 px patches": ["model.patch_size=4"]},
                        curve_steps=[2, 4], num_train=8, num_val=8, overrides=FAST)
    result = run_stage1_study(study, out=tmp_path / "study", progress=False)
    whole = {"baseline", "4 px patches", "floor:default", "floor:model.patch_size=4"}
    for s in ("0", "1"):  # the variants and floors also after blocks 1 and 2 of their 3
        assert set(result["readings"][s]) == whole | {"curve-2", "curve-4"} | {block_name(k, b) for k in whole for b in (1, 2)}
    floor = result["readings"]["0"]
    assert floor[block_name("floor:default", 1)]["motion"] != floor["floor:default"]["motion"]
    assert (tmp_path / "study" / "config.yaml").is_file() and (tmp_path / "study" / "run_info.yaml").is_file()
    curve = result["teachers"]["0/curve"]
    assert curve["step"] == 4  # trained to the curve's end, read at its snapshot 2 and at 4
    # a 4 px random init has 8x8x8 tokens, the 8 px one 8x4x4: their readings differ
    assert result["readings"]["0"]["floor:default"] != result["readings"]["0"]["floor:model.patch_size=4"]
    report = tmp_path / "STAGE1.md"
    report.write_text(f"# an earlier report\n\n{EARLIER}\n\n| a negative result |\n")
    text = write_report(result, report, command="pytest")
    assert "| learning curve, 4 steps |" in text and "| random init (model.patch_size=4) |" in text
    lin = [result["readings"][s]["4 px patches"]["motion"]["top1"] for s in ("0", "1")]
    assert f"{100 * sum(lin) / 2:.1f} ± " in text
    # 3 steps leave the loss far above a constant prediction's: reported as not trained, not read against the floor
    assert all(result["teachers"][f"{s}/baseline"]["final_loss"] > result["teachers"][f"{s}/baseline"]["constant_loss"]
               for s in ("0", "1"))
    assert "| baseline | (none) |" in text and "| **no: not trained** |" in text and "(not trained)" in text
    assert "Not trained (final loss at the constant prediction's on every seed): baseline, 4 px patches." in text
    assert text.endswith(f"{EARLIER}\n\n| a negative result |\n")  # the earlier runs' section is kept


@pytest.mark.parametrize("norm, distance", [("true", "l1"), ("true", "mse"), ("false", "l1")])
def test_the_constant_prediction_is_the_predict_zero_level_for_normalised_pixels(digits, norm, distance) -> None:
    cfg = tiny_config(f"model.pixel_norm={norm}", f"model.pixel_loss={distance}")
    batches = first_teacher_batches(cfg, digits, 2)
    constant = constant_prediction_loss(cfg, batches)
    zero = torch.stack([MASKED_DISTANCES[distance](torch.zeros(()), gather_tokens(stage1_targets(cfg, b), m.tgt_idx), m.tgt_valid)
                        for b in batches for m in b["masks"]]).mean().item()
    if norm == "true":  # zero is each tubelet's mean: no constant does better
        assert constant == pytest.approx(zero, rel=0.03)
    else:  # raw pixels are not centred on 0 (ImageNet-normalised dark frames): the constant does better than zero
        assert constant < 0.9 * zero


@pytest.mark.parametrize("diffs, verdict", [([0.10, 0.12, 0.11], "above"), ([-0.10, -0.12, -0.11], "below"),
                                            ([0.10, -0.09, 0.02], "within")])
def test_versus_floor_clears_two_standard_errors_or_says_within(diffs, verdict) -> None:
    text = _versus_floor(diffs, [0.001] * 3)  # the seeds' spread binds
    se = (sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2) ** 0.5 / math.sqrt(3)
    assert text == f"{100 * sum(diffs) / 3:+.1f} ± {100 * se:.1f} ({verdict})"


def test_versus_floor_never_claims_more_than_the_val_split_can_measure() -> None:
    # two seeds that happen to agree: their spread says 0, one reading's binomial SE says otherwise
    assert _versus_floor([0.003, 0.003], [0.0125, 0.0125]) == "+0.3 ± 0.9 (within)"
