"""make export: the encoder alone, loaded back from each format the way its users load it, gives the
project's tokens on the same clip; the V-JEPA 2 formats are written only where the mapping is exact
(RoPE's frequency pairing decides) and refused, in one line, elsewhere.

Tolerances: the `salt` format is the same code on the same weights (equal, bit for bit); the
transformers and V-JEPA 2 layouts run the same float32 arithmetic in another module structure
(split vs fused qkv): <= 1e-5 relative per token (measured 0.0 on CPU)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from jobs.export import main as export_main
from pipeline.export import ExportError, export, hf_model, load_run_encoder, load_salt_encoder
from salt.checkpoint import checkpoint_meta, save_snapshot
from salt.models.factory import build_encoder
from salt.models.teachers import load_teacher
from salt.models.vit import VIT_SIZES, VitSize
from salt.models.vjepa2_layout import rope_difference
from tests.conftest import tiny_config

TOL = 1e-5
# head_dim 8: each RoPE axis slice is 2 dims, one frequency, so V-JEPA 2's pairing and ours coincide
# (salt.models.vjepa2_layout); no size of salt.models.vit.VIT_SIZES has a head that small
ROPE2 = VitSize(width=24, depth=2, heads=3)


def relative_token_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per token: |a - b| / |b| (norms over the width), [B, N]."""
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


def sharpened_snapshot(folder, size: str, *overrides: str):
    """A snapshot (as student.snapshot_every writes) of a seeded encoder whose queries and keys are scaled
    up, so attention depends on positions: a wrong RoPE then shows in the tokens (at init it barely does)."""
    cfg = tiny_config(f"model.student={size}", *overrides)
    torch.manual_seed(0)
    encoder = build_encoder(cfg, size)
    with torch.no_grad():
        for block in encoder.blocks:
            block.qkv.weight[: 2 * encoder.width] *= 6  # rows [q; k; v]
    save_snapshot(folder, encoder, checkpoint_meta(cfg, "student", encoder.width, step=7))
    return folder, cfg


def project_tokens(ckpt, clips: torch.Tensor) -> torch.Tensor:
    encoder, _ = load_run_encoder(ckpt)
    with torch.no_grad():
        return encoder(clips)


def vjepa2_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """V-JEPA 2 VisionTransformer names -> transformers VJEPA2Model's, written here from the two models'
    module trees (independently of salt.models.vjepa2_layout, which the export uses)."""
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key):
            q, k, v = value.chunk(3)
            for name, part in (("query", q), ("key", k), ("value", v)):
                out[f"encoder.layer.{m[1]}.attention.{name}.{m[2]}"] = part
            continue
        key = re.sub(r"^blocks\.(\d+)\.attn\.proj", r"encoder.layer.\1.attention.proj", key)
        key = re.sub(r"^blocks\.(\d+)\.", r"encoder.layer.\1.", key)
        key = key.replace("patch_embed.proj.", "encoder.embeddings.patch_embeddings.proj.")
        out[re.sub(r"^norm\.", "encoder.layernorm.", key)] = value
    return out


def vjepa2_keys(depth: int) -> set[str]:
    """The state dict keys of V-JEPA 2's VisionTransformer(use_rope=True) (no pos_embed with RoPE)."""
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    names = ["patch_embed.proj", "norm", *(f"blocks.{i}.{b}" for i in range(depth) for b in block)]
    return {f"{n}.{p}" for n in names for p in ("weight", "bias")}


def test_export_of_a_run_folder_writes_the_encoder_alone_and_refuses_vjepa2_layouts(teacher_dir, tmp_path, capsys):
    out = tmp_path / "export"
    manifest = export_main(["--ckpt", teacher_dir, "--out", str(out)])
    printed = capsys.readouterr().out
    assert set(manifest["written"]) == {"salt"} and set(manifest["refused"]) == {"hf-vjepa2", "vjepa2"}
    for fmt in ("hf-vjepa2", "vjepa2"):  # one line each, naming the part that differs and the measured cost
        assert re.search(rf"^{fmt} +not written: RoPE frequency pairing: .*forced, the tokens would differ by", printed, re.M)
        assert not (out / fmt).exists()
    salt = out / "salt"
    tensors = load_file(str(salt / "encoder.safetensors"))
    encoder, meta = load_run_encoder(teacher_dir)
    assert set(tensors) == set(encoder.state_dict())  # the encoder alone: no predictor, no optimizer state
    description = json.loads((salt / "encoder.json").read_text())
    with safe_open(str(salt / "encoder.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["salt.encoder"]) == description
    assert description["size"] == "vit_cpu_s" and description["grid"] == [8, 4, 4] and description["config"] == meta["config"]
    assert manifest["source"]["role"] == "teacher" and len(manifest["source"]["sha256"]) == 64
    clips = torch.randn(2, 3, 16, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_salt_encoder(salt)(clips), encoder(clips))


def test_where_ropes_agree_every_format_loads_and_gives_the_projects_tokens(tmp_path, monkeypatch):
    from transformers import VJEPA2Config, VJEPA2Model

    monkeypatch.setitem(VIT_SIZES, "vit_rope2", ROPE2)
    ckpt, cfg = sharpened_snapshot(tmp_path / "snapshot", "vit_rope2")
    out = tmp_path / "export"
    manifest = export(ckpt, out)
    assert set(manifest["written"]) == {"salt", "hf-vjepa2", "vjepa2"} and manifest["refused"] == {}
    clips = torch.randn(2, 3, 16, 32, 32)  # [B, C, T, H, W], normalised with data.mean/std
    ours = project_tokens(ckpt, clips)

    # transformers, offline, from the folder alone
    hf = VJEPA2Model.from_pretrained(str(out / "hf-vjepa2"), local_files_only=True).eval()
    with torch.no_grad():
        theirs = hf(pixel_values_videos=clips.transpose(1, 2), skip_predictor=True).last_hidden_state
    assert relative_token_error(theirs, ours).max() <= TOL
    # and back in as a frozen teacher of this project: its preprocessor config carries the run's mean/std
    teacher = load_teacher(f"hf-vjepa2:{out / 'hf-vjepa2'}", cfg)
    assert not teacher.renormalise
    with torch.no_grad():
        assert relative_token_error(teacher(clips), ours).max() <= TOL

    # V-JEPA 2's layout: a dict of tensors (weights_only), keys as its evaluation loader expects them
    saved = torch.load(out / "vjepa2" / "vjepa2.pt", map_location="cpu", weights_only=True)
    assert set(saved) == {"encoder", "target_encoder"}
    state = saved["target_encoder"]
    assert all(k.startswith("module.backbone.") for k in state)
    state = {k.replace("module.", "").replace("backbone.", ""): v for k, v in state.items()}  # as its eval does
    assert set(state) == vjepa2_keys(depth=2)
    assert state["blocks.0.attn.qkv.weight"].shape == (72, 24) and state["patch_embed.proj.weight"].shape == (24, 3, 2, 8, 8)
    built = json.loads((out / "vjepa2" / "vjepa2.json").read_text())["vision_transformer"]
    assert (built["embed_dim"], built["depth"], built["num_heads"], built["use_rope"]) == (24, 2, 3, True)
    model = VJEPA2Model(VJEPA2Config(crop_size=32, frames_per_clip=16, patch_size=8, tubelet_size=2, hidden_size=24,
                                     num_attention_heads=3, num_hidden_layers=2)).eval()
    missing, unexpected = model.load_state_dict(vjepa2_to_transformers(state), strict=False)
    assert unexpected == [] and all(k.startswith("predictor.") for k in missing)
    with torch.no_grad():
        theirs = model(pixel_values_videos=clips.transpose(1, 2), skip_predictor=True).last_hidden_state
    assert relative_token_error(theirs, ours).max() <= TOL


def test_an_encoder_with_vjepa2_rope_pairing_exports_to_every_format(tmp_path):
    """model.rope_pairing=vjepa2 on a real size (vit_cpu_xs, head_dim 32): the three formats are written
    and transformers gives the project's tokens; the same weights under the default pairing do not."""
    from transformers import VJEPA2Model

    ckpt, _ = sharpened_snapshot(tmp_path / "snapshot", "vit_cpu_xs", "model.rope_pairing=vjepa2")
    manifest = export(ckpt, tmp_path / "export")
    assert set(manifest["written"]) == {"salt", "hf-vjepa2", "vjepa2"} and manifest["refused"] == {}
    clips = torch.randn(2, 3, 16, 32, 32)
    ours = project_tokens(ckpt, clips)
    hf = VJEPA2Model.from_pretrained(str(tmp_path / "export" / "hf-vjepa2"), local_files_only=True).eval()
    with torch.no_grad():
        theirs = hf(pixel_values_videos=clips.transpose(1, 2), skip_predictor=True).last_hidden_state
    assert relative_token_error(theirs, ours).max() <= TOL
    encoder, _ = load_run_encoder(ckpt)
    encoder.rope.pairing = "interleaved"
    with torch.no_grad():
        assert relative_token_error(encoder(clips), ours).mean() > 100 * TOL


def test_where_ropes_differ_the_vjepa2_formats_are_refused_and_forcing_them_changes_the_tokens(tmp_path):
    """vit_cpu_xs (head_dim 32: 10-dim RoPE slices): the weights map tensor for tensor, the forward does not."""
    ckpt, _ = sharpened_snapshot(tmp_path / "snapshot", "vit_cpu_xs")
    encoder, _ = load_run_encoder(ckpt)
    assert "RoPE frequency pairing" in rope_difference(encoder)
    clips = torch.randn(2, 3, 16, 32, 32)
    with torch.no_grad():
        forced = hf_model(encoder)(pixel_values_videos=clips.transpose(1, 2), skip_predictor=True).last_hidden_state
        assert relative_token_error(forced, encoder(clips)).mean() > 100 * TOL  # measured 7e-3 here; a trained encoder: docs/export.md
    for fmt in ("hf-vjepa2", "vjepa2"):
        with pytest.raises(ExportError, match=rf"^cannot export .* as {fmt}: RoPE frequency pairing: here both dims"):
            export(ckpt, tmp_path / "out", formats=[fmt])
    assert not (tmp_path / "out").exists()


def test_export_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        from jobs.cli import entry

        entry(lambda: export_main(["--ckpt", str(tmp_path / "nothing")]))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    ckpt, _ = sharpened_snapshot(tmp_path / "snapshot", "vit_cpu_xs")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="exists and is not an export"):
        export(ckpt, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    export(ckpt, tmp_path / "again")
    export(ckpt, tmp_path / "again")  # a rerun replaces its own earlier export
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["export.json", "salt"]
