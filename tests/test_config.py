import re

import pytest

from salt.config import ConfigError, load_config

TINY_PATH = "jobs/configs/tiny.yaml"


def test_yaml_and_overrides_resolve(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {teacher: vit_b}\nteacher:\n  optim: {lr: 0.01}\n")
    cfg = load_config(path, ["teacher.optim.steps=7", "masking.generators.1.num_blocks=3", "data.crop_area=[0.5, 1.0]"])
    assert cfg.model.teacher == "vit_b"
    assert cfg.teacher.optim.lr == 0.01 and cfg.teacher.optim.steps == 7
    assert cfg.masking.generators[1].num_blocks == 3 and cfg.masking.generators[0].num_blocks == 8
    assert cfg.data.crop_area == (0.5, 1.0)
    assert cfg.student.optim.lr == 6.25e-4  # untouched defaults are docs/method.md's


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher:\n  optim: {learning_rate: 0.01}\n")
    with pytest.raises(ConfigError, match=r"unknown key config\.teacher\.optim\.learning_rate"):
        load_config(path)


def test_unknown_override_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown key config\.student\.optim\.stepz"):
        load_config(None, ["student.optim.stepz=3"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["student.optim.steps"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"config\.student\.optim\.steps: expected an integer, got 'many'"):
        load_config(None, ["student.optim.steps=many"])


def test_job_exits_with_the_config_error(digits, tmp_path):
    from jobs import teacher

    with pytest.raises(SystemExit, match=r"unknown key config\.teacher\.optim\.lrr"):
        teacher.main(["--data", digits, "--run", str(tmp_path), "teacher.optim.lrr=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.attention=flash", "config.model.attention='flash': expected one of auto, sdpa, xformers"),
        ("extract.dtype=bfloat16", "config.extract.dtype='bfloat16': expected one of float32, float16"),
        ("extract.codec=lz4", "config.extract.codec='lz4': expected one of none, zstd, blosc"),
        ("extract.projection=pca", "config.extract.projection='pca': expected one of none, orthogonal, gaussian"),
        ("model.pixel_loss=huber", "config.model.pixel_loss='huber': expected one of l1, mse"),
        ("extract.keepbits=12", "config.extract.keepbits=12: expected 0 (off) to 9 for float16"),
    ],
)
def test_enum_like_fields_are_checked_at_load_time(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY_PATH, [override])
