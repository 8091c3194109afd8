"""Any frozen teacher: tiny random-weight VideoMAE and V-JEPA 2 models saved locally, extracted
through the Ray job, checked token by token against the live adapter, and trained on with the
teacher's folder gone; run at a geometry other than their config's, against transformers built there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.extract import extract_targets
from experiments.runs import run_student
from pipeline.shards import list_shards
from pipeline.loaders import TargetStream
from pipeline.store.layout import PROJECTION
from pipeline.store.read import TargetStore
from pipeline.store.verify import verify_store
from salt.models.frozen import TeacherSpecError, file_sha256, projection_matrix
from salt.models.teachers import load_teacher
from salt.train.loop import prepare_batch
from salt.train.student import TeacherMismatchError
from tests.conftest import tiny_config
from tests.test_pipeline import relative_token_error

# the tiny config's geometry: 16 frames of 32x32, tubelet 2, patch 8 -> grid 8x4x4
TINY_VIDEOMAE = dict(image_size=32, patch_size=8, num_frames=16, tubelet_size=2, hidden_size=48,
                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=96)
TINY_VJEPA2 = dict(crop_size=32, patch_size=8, frames_per_clip=16, tubelet_size=2, hidden_size=48, num_attention_heads=2,
                   num_hidden_layers=2, pred_hidden_size=32, pred_num_attention_heads=2, pred_num_hidden_layers=1)


def save_tiny(kind: str, folder: Path, dtype: torch.dtype = torch.float32, **changes) -> str:
    from transformers import VideoMAEConfig, VideoMAEModel, VJEPA2Config, VJEPA2Model

    torch.manual_seed(0)
    if kind == "hf-videomae":
        model = VideoMAEModel(VideoMAEConfig(**(TINY_VIDEOMAE | changes)))
    else:
        model = VJEPA2Model(VJEPA2Config(**(TINY_VJEPA2 | changes)))
    model.to(dtype).save_pretrained(str(folder))
    return f"{kind}:{folder}"


@pytest.fixture(scope="module")
def hf_stores(digits, ray_local, tmp_path_factory) -> dict:
    """Per adapter: the teacher folder (a copy that the test may delete) and its fp32 store."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in ("hf-videomae", "hf-vjepa2"):
        spec = save_tiny(kind, root / kind)
        store = str(root / f"{kind}-store")
        extract_targets(tiny_config("extract.dtype=float32"), data=digits, teacher=spec, store=store, progress=False)
        out[kind] = (spec, store)
    return out


@pytest.mark.parametrize("kind", ["hf-videomae", "hf-vjepa2"])
def test_hf_teacher_store_equals_live_tokens_and_trains_without_the_teacher(kind, hf_stores, digits, tmp_path):
    spec, store = hf_stores[kind]
    folder = Path(spec.split(":", 1)[1])
    teacher = TargetStore(store).meta["teacher"]
    assert teacher["adapter"] == kind and teacher["model_class"] in ("VideoMAEModel", "VJEPA2Model")
    assert teacher["sha256"] == file_sha256(folder / "model.safetensors") and teacher["width"] == 48
    assert teacher["grid"] == [8, 4, 4] and len(teacher["config_sha256"]) == 64 and teacher["projection"] is None
    assert teacher["dtype"] == "float32"
    assert teacher["geometry"] == teacher["native_geometry"] == {"frames": 16, "crop_size": 32}
    cfg = tiny_config()
    live = load_teacher(spec, cfg)
    dataset = TargetStream(cfg, list_shards(digits), batch_size=4, store=store)
    for g in range(dataset.batches_per_epoch):  # every stored token of every sample
        batch = prepare_batch(dataset.batch(g), "cpu", cfg.data)
        with torch.no_grad():
            assert relative_token_error(batch["targets"], live(batch["clips"])).max() <= 1e-5
    moved = tmp_path / "gone"
    shutil.move(str(folder), moved)  # stage 2 must not need the teacher
    try:
        summary = run_student(tiny_config("student.optim.steps=2"), digits, store, tmp_path / "student", progress=False)
    finally:
        shutil.move(str(moved), folder)
    assert summary["step"] == 2 and np.isfinite(summary["final_loss"])


def test_a_student_refuses_a_store_of_another_adapter(hf_stores, digits, tmp_path):
    run = tmp_path / "student"
    run_student(tiny_config("student.optim.steps=1"), digits, hf_stores["hf-videomae"][1], run, progress=False)
    with pytest.raises(TeacherMismatchError, match="sha256"):
        run_student(tiny_config("student.optim.steps=2"), digits, hf_stores["hf-vjepa2"][1], run, progress=False)


def test_projection_is_stored_recorded_and_applied(hf_stores, digits, ray_local, tmp_path):
    spec = hf_stores["hf-videomae"][0]
    cfg = tiny_config("extract.dtype=float32", "extract.projection=orthogonal", "extract.projection_dim=16", "extract.projection_seed=3")
    store = str(tmp_path / "projected")
    extract_targets(cfg, data=digits, teacher=spec, store=store, progress=False)
    recorded = TargetStore(store).meta["teacher"]
    assert recorded["width"] == 16 and recorded["native_width"] == 48
    assert recorded["projection"] | {"sha256": ""} == {"kind": "orthogonal", "dim": 16, "seed": 3, "from_width": 48, "sha256": ""}
    matrix = load_file(str(Path(store) / PROJECTION))["projection"]
    assert torch.equal(matrix, projection_matrix("orthogonal", 48, 16, 3))
    torch.testing.assert_close(matrix.T @ matrix, torch.eye(16), atol=1e-5, rtol=0)
    assert verify_store(store) == []
    batch = prepare_batch(TargetStream(cfg, list_shards(digits), batch_size=4, store=store).batch(0), "cpu", cfg.data)
    with torch.no_grad():
        full = load_teacher(spec, tiny_config())(batch["clips"])
    assert relative_token_error(batch["targets"], full @ matrix).max() <= 1e-5
    (Path(store) / PROJECTION).write_bytes((Path(store) / PROJECTION).read_bytes()[:-4] + b"\0\0\0\0")
    assert any("differs from the projection" in p for p in verify_store(store))


def test_bad_teachers_fail_before_any_work(tmp_path, digits):
    store = tmp_path / "never"
    wide = save_tiny("hf-videomae", tmp_path / "wide", patch_size=16)  # at the config's 16 x 32 px: grid 8x2x2
    with pytest.raises(TeacherSpecError, match=r"token grid 8x2x2 but this config's is 8x4x4 .*data.crop_size=32 / model.patch_size=8"):
        extract_targets(tiny_config(), data=digits, teacher=wide, store=str(store), progress=False)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "videomae"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(TeacherSpecError, match=r"holds only pickled weights \(pytorch_model.bin\).*save_pretrained"):
        extract_targets(tiny_config(), data=digits, teacher=f"hf-videomae:{pickled}", store=str(store), progress=False)
    with pytest.raises(TeacherSpecError, match=r"looks like a hub name.*huggingface-cli download MCG-NJU/videomae-base"):
        extract_targets(tiny_config(), data=digits, teacher="hf-videomae:MCG-NJU/videomae-base", store=str(store), progress=False)
    with pytest.raises(TeacherSpecError, match=r"holds a 'videomae' model, not 'vjepa2'"):
        load_teacher(f"hf-vjepa2:{tmp_path / 'wide'}", tiny_config("data.crop_size=64"))
    with pytest.raises(TeacherSpecError, match="unknown adapter 'hf-clip'"):
        load_teacher("hf-clip:/x", tiny_config())
    assert not store.exists()


@pytest.mark.parametrize("key, trained, asked", [("data.frames", 16, 8), ("data.crop_size", 32, 48)])
def test_a_run_folder_teacher_refuses_clips_other_than_it_was_trained_on(key, trained, asked, teacher_dir, digits, tmp_path):
    """The encoder's rotary positions fit any grid, so a teacher trained on 16 frames of 32 px would
    run on 8 frames or 48 px and write a complete store of targets it never learned to give."""
    store = tmp_path / "never"
    with pytest.raises(TeacherSpecError, match=rf"trained with {key}={trained}, but this config has {key}={asked}:"):
        extract_targets(tiny_config(f"{key}={asked}"), data=digits, teacher=teacher_dir, store=str(store), progress=False)
    assert not store.exists()


@pytest.mark.parametrize("kind", ["hf-videomae", "hf-vjepa2"])
def test_an_hf_teacher_saved_in_bf16_computes_in_float32(kind, tmp_path):
    """transformers loads weights in the dtype they were saved in unless told otherwise: a bf16
    checkpoint would compute bf16 targets on every device, and the store would not say so."""
    spec = save_tiny(kind, tmp_path / "bf16", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}
    teacher = load_teacher(spec, tiny_config())
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    assert teacher.identity()["dtype"] == "float32"  # what store.json's teacher section records


def test_adapter_converts_our_normalisation_to_the_models(tmp_path):
    spec = save_tiny("hf-vjepa2", tmp_path / "m")
    (tmp_path / "m" / "video_preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    cfg = tiny_config()
    teacher = load_teacher(spec, cfg)
    pixels = torch.rand(2, 3, 16, 32, 32)  # [B, C, T, H, W] in [0, 1]
    ours = (pixels - torch.tensor(cfg.data.mean).view(1, 3, 1, 1, 1)) / torch.tensor(cfg.data.std).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(teacher.in_hf_convention(ours), ((pixels - 0.5) / 0.5).transpose(1, 2), atol=1e-5, rtol=0)


def native_model(kind: str, folder: Path, **geometry):
    """The folder's weights in a transformers model built at `geometry` from its config (no override at load):
    the checkpoint loaded at its own geometry, its state copied in (no parameter depends on the geometry)."""
    from transformers import VideoMAEConfig, VideoMAEModel, VJEPA2Config, VJEPA2Model

    config_cls, model_cls = (VideoMAEConfig, VideoMAEModel) if kind == "hf-videomae" else (VJEPA2Config, VJEPA2Model)
    config = json.loads((folder / "config.json").read_text()) | geometry
    config.pop("transformers_version")
    model = model_cls(config_cls(**config))
    model.load_state_dict(model_cls.from_pretrained(str(folder), local_files_only=True).state_dict())
    return model.eval()


# (adapter, overrides of the tiny config, transformers' keys for that geometry): V-JEPA 2 at fewer frames and a
# larger crop than its config's 16 x 32 px; VideoMAE at fewer frames (its crop is fixed)
OTHER_GEOMETRY = [
    ("hf-vjepa2", ("data.frames=8", "data.crop_size=48"), {"frames_per_clip": 8, "crop_size": 48}),
    ("hf-videomae", ("data.frames=8",), {"num_frames": 8}),
]


@pytest.mark.parametrize("kind, overrides, geometry", OTHER_GEOMETRY)
def test_an_hf_teacher_runs_at_the_configs_geometry_as_transformers_does(kind, overrides, geometry, tmp_path):
    """Through the adapter at a geometry other than the checkpoint config's, and through transformers directly with
    the same weights in a model built at that geometry: the same tokens (float32, same ops: <= 1e-5 relative)."""
    # larger initial weights than transformers' default: attention then depends on positions, so a wrong
    # row/column/frame assignment shows (with std 0.02 attention is near uniform and positions barely matter)
    spec = save_tiny(kind, tmp_path / "m", initializer_range=0.5)
    cfg = tiny_config(*overrides)
    teacher = load_teacher(spec, cfg)
    frames, size = cfg.data.frames, cfg.data.crop_size
    assert teacher.grid == (frames // 2, size // 8, size // 8)
    clips = torch.randn(2, 3, frames, size, size)  # [B, C, T, H, W], normalised as our clips are
    direct = native_model(kind, tmp_path / "m", **geometry)
    with torch.no_grad():
        ours = teacher(clips)
        theirs = direct(teacher.in_hf_convention(clips), **teacher.call_kwargs).last_hidden_state
    assert ours.shape == (2, teacher.num_tokens, 48)
    assert relative_token_error(ours, theirs).max() <= 1e-5
    identity = teacher.identity()  # what store.json's teacher section records
    assert identity["geometry"] == {"frames": frames, "crop_size": size}
    assert identity["native_geometry"] == {"frames": 16, "crop_size": 32}
    if kind == "hf-vjepa2":  # transformers at the config's crop on the same 48 px clip: rows and columns of a 4x4 grid
        from transformers import VJEPA2Model

        stale = VJEPA2Model.from_pretrained(str(tmp_path / "m"), local_files_only=True).eval()
        with torch.no_grad():
            wrong = stale(teacher.in_hf_convention(clips), skip_predictor=True).last_hidden_state
        assert relative_token_error(wrong, theirs).max() > 1e-2


def test_hf_teachers_refuse_a_geometry_they_cannot_take_in_one_line(tmp_path):
    vjepa2 = save_tiny("hf-vjepa2", tmp_path / "vjepa2")
    with pytest.raises(TeacherSpecError, match=r"cannot run at data.frames=16, data.crop_size=36 \(its config: 16 frames of 32 px\): "
                                               r"it takes a multiple of its tubelet_size=2 frames and of its patch_size=8 pixels$"):
        load_teacher(vjepa2, tiny_config("data.crop_size=36", "model.patch_size=4"))
    videomae = save_tiny("hf-videomae", tmp_path / "videomae")
    with pytest.raises(TeacherSpecError, match=r"data.crop_size=48 \(its config: 16 frames of 32 px\): it takes only its own 32 px "
                                               r"crops: its position table is a 1-D sinusoid"):
        load_teacher(videomae, tiny_config("data.crop_size=48"))
