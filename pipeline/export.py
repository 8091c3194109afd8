"""make export: a trained encoder taken out of the project, in the formats the field loads.

Input: a teacher or student run folder, or one of its snapshots (`checkpoint.safetensors`, the
run's config in its header): the encoder alone is read, never the predictor or optimizer state.

Output (`OUT`, default `<CKPT>/export`), written to `OUT.tmp` and renamed into place, so a folder
named OUT is always a whole export; a rerun replaces an earlier export, never another folder:

    export.json                  the source checkpoint (sha256, role, step), every format written
                                 with its files and the measured difference, every one refused and why
    salt/encoder.safetensors     the encoder alone under VideoViT's names (header: encoder.json's text)
    salt/encoder.json            architecture, geometry, normalisation, input/output convention, the
                                 run's whole config: `load_salt_encoder` rebuilds it
    hf-vjepa2/                   a transformers save_pretrained folder: config.json, model.safetensors
                                 (VJEPA2Model; predictor a zeroed zero-layer placeholder) and
                                 video_preprocessor_config.json (the run's mean/std)
    vjepa2/vjepa2.pt             V-JEPA 2's checkpoint layout: {"encoder", "target_encoder"}, each the
                                 encoder under "module.backbone." (a dict of tensors: torch.load
                                 with weights_only=True reads it); vjepa2.json: how its code builds it

The two V-JEPA 2 formats are written only where the mapping is exact
(`salt.models.vjepa2_layout`: everything maps tensor for tensor but RoPE's frequency pairing, so
they are refused wherever the two RoPEs differ on the encoder's grid). Every written format is
loaded back from disk and run on one seeded clip beside the project's own forward: the largest
per-token relative difference is recorded, and above TOLERANCE the export fails.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from salt.checkpoint import has_checkpoint, load_module_weights, read_meta
from salt.config import Config, from_dict
from salt.models.factory import build_encoder
from salt.models.frozen import file_sha256
from salt.models.vit import VideoViT
from salt.models.vjepa2_layout import (
    VJEPA2_PREFIX,
    LayoutError,
    architecture,
    from_vjepa2,
    hf_vjepa2_config,
    rope_difference,
    to_hf_vjepa2,
    to_vjepa2,
    vjepa2_builder,
)

FORMATS = ("salt", "hf-vjepa2", "vjepa2")
FORMAT = "salt-encoder/1"
HEADER_KEY = "salt.encoder"  # encoder.json's text in encoder.safetensors' header
# float32 on one device; the formats run the same arithmetic in another order (split vs fused qkv,
# their attention kernel): measured <= 1e-6 on the tests' models
TOLERANCE = 1e-5


class ExportError(ValueError):
    """A checkpoint or a requested format that cannot be exported as asked."""


def load_run_encoder(ckpt: str | Path) -> tuple[VideoViT, dict]:
    """The encoder of a run folder or snapshot, built from the config in its checkpoint, and the metadata."""
    if not has_checkpoint(ckpt):
        raise ExportError(f"{ckpt}: no checkpoint.safetensors (want a teacher or student run folder, or a snapshot)")
    meta = read_meta(ckpt)
    cfg = from_dict(Config, meta["config"])
    # the attention backend is a choice of the machine that trained it: the export computes with SDPA
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="sdpa"))
    encoder = build_encoder(cfg, meta["encoder"]["size"])
    encoder.load_state_dict(load_module_weights(ckpt, "encoder"))
    return encoder.eval().requires_grad_(False), meta


def encoder_description(encoder: VideoViT, meta: dict, source: dict) -> dict:
    data = meta["config"]["data"]
    return {
        "format": FORMAT,
        "architecture": "salt.models.vit.VideoViT",
        **architecture(encoder),
        "rope": {"theta": 10_000.0, "axes": "t, h, w", "dims_per_axis": encoder.rope.axis_dim,
                 "pairing": "interleaved pairs (2p, 2p+1) share frequency p", "unrotated": "the head dims past 3 axes"},
        "input": f"[B, 3, T, H, W] RGB in [0, 1], normalised with mean {data['mean']} std {data['std']}",
        "output": "[B, T/tubelet * (H/patch)^2, width]: every token, (t, h, w) order, after the final LayerNorm",
        "source": source,
        "config": meta["config"],
    }


def load_salt_encoder(folder: str | Path) -> VideoViT:
    """The encoder a `salt/` export holds, rebuilt by this project's factory (its geometry from encoder.json)."""
    folder = Path(folder)
    description = json.loads((folder / "encoder.json").read_text())
    if description.get("format") != FORMAT:
        raise ExportError(f"{folder}/encoder.json: format {description.get('format')!r}, not {FORMAT!r}")
    cfg = from_dict(Config, description["config"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="sdpa"))
    encoder = build_encoder(cfg, description["size"])
    encoder.load_state_dict(load_file(str(folder / "encoder.safetensors")))
    return encoder.eval().requires_grad_(False)


def refusal(fmt: str, encoder: VideoViT) -> str | None:
    """Why `fmt` cannot hold this encoder exactly (None: it can): a tensor without a counterpart, or RoPE."""
    if fmt not in FORMATS:
        return f"unknown format; known: {', '.join(FORMATS)}"
    if fmt == "salt":
        return None
    try:
        (to_hf_vjepa2 if fmt == "hf-vjepa2" else to_vjepa2)(encoder.state_dict())
    except LayoutError as e:
        return str(e)
    return rope_difference(encoder)


def write_salt(encoder: VideoViT, description: dict, folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    text = json.dumps(description, indent=1)
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(folder / "encoder.safetensors"), metadata={HEADER_KEY: text})
    (folder / "encoder.json").write_text(text)
    return ["encoder.safetensors", "encoder.json"]


def hf_model(encoder: VideoViT):
    """transformers VJEPA2Model holding the encoder; its (unused) placeholder predictor zeroed."""
    from transformers import VJEPA2Config, VJEPA2Model

    model = VJEPA2Model(VJEPA2Config(**hf_vjepa2_config(encoder)))
    state = to_hf_vjepa2(encoder.state_dict())
    state |= {f"predictor.{k}": torch.zeros_like(v) for k, v in model.predictor.state_dict().items()}
    model.load_state_dict(state, strict=True)  # every tensor of the model named once
    return model.eval()


def write_hf_vjepa2(encoder: VideoViT, description: dict, folder: Path) -> list[str]:
    hf_model(encoder).save_pretrained(str(folder))
    crop = description["crop_size"]
    data = description["config"]["data"]
    # the run's normalisation (what hf-vjepa2:<folder> and AutoVideoProcessor read), V-JEPA 2's eval resize rule
    processor = {
        "video_processor_type": "VJEPA2VideoProcessor", "image_mean": data["mean"], "image_std": data["std"],
        "crop_size": {"height": crop, "width": crop}, "size": {"shortest_edge": int(crop * 256 / 224)},
        "do_resize": True, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    }
    (folder / "video_preprocessor_config.json").write_text(json.dumps(processor, indent=1))
    return sorted(p.name for p in folder.iterdir())


def write_vjepa2(encoder: VideoViT, description: dict, folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    state = {VJEPA2_PREFIX + k: v.contiguous() for k, v in to_vjepa2(encoder.state_dict()).items()}
    # V-JEPA 2's eval reads checkpoint_key (its configs: target_encoder); its hub loader reads "encoder"
    torch.save({"encoder": state, "target_encoder": state}, folder / "vjepa2.pt")
    builder = vjepa2_builder(encoder)
    info = {
        "checkpoint_keys": ["encoder", "target_encoder"],
        "prefix": VJEPA2_PREFIX,
        **builder,
        "eval_config": {"checkpoint_key": "target_encoder", "model_name": builder["model_name"],
                        "patch_size": description["patch_size"], "tubelet_size": description["tubelet"], "use_rope": True},
        "input": description["input"],
    }
    (folder / "vjepa2.json").write_text(json.dumps(info, indent=1))
    return ["vjepa2.pt", "vjepa2.json"]


WRITERS = {"salt": write_salt, "hf-vjepa2": write_hf_vjepa2, "vjepa2": write_vjepa2}


def reload_forward(fmt: str, folder: Path, clips: torch.Tensor) -> torch.Tensor:
    """Tokens of the format as written on disk: `salt` rebuilt by this project, `hf-vjepa2` through
    from_pretrained, `vjepa2` unpickled with weights_only and run in transformers' port of V-JEPA 2."""
    if fmt == "salt":
        return load_salt_encoder(folder)(clips)
    from transformers import VJEPA2Config, VJEPA2Model

    if fmt == "hf-vjepa2":
        model = VJEPA2Model.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    else:  # transformers' VJEPA2Model is a port of V-JEPA 2's VisionTransformer: built as vjepa2.json says
        saved = torch.load(folder / "vjepa2.pt", map_location="cpu", weights_only=True)["target_encoder"]
        config = json.loads((folder / "vjepa2.json").read_text())["vision_transformer"]
        model = VJEPA2Model(VJEPA2Config(
            patch_size=config["patch_size"], tubelet_size=config["tubelet_size"], crop_size=config["img_size"],
            frames_per_clip=config["num_frames"], hidden_size=config["embed_dim"], num_hidden_layers=config["depth"],
            num_attention_heads=config["num_heads"], mlp_ratio=config["mlp_ratio"], pred_num_hidden_layers=0,
            pred_hidden_size=1, pred_num_attention_heads=1, pred_num_mask_tokens=1))
        model.encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in to_hf_vjepa2(from_vjepa2(saved)).items()})
    return model.eval()(pixel_values_videos=clips.transpose(1, 2), skip_predictor=True).last_hidden_state


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest per-token |ours - theirs| / |ours| (norms over the width)."""
    return ((ours - theirs).norm(dim=-1) / ours.norm(dim=-1)).max().item()


def token_differences(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    """How far a forced (inexact) format's tokens are from ours: relative difference and cosine, mean and worst token."""
    rel = (ours - theirs).norm(dim=-1) / ours.norm(dim=-1)
    cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    return (f"{rel.mean().item():.3g} relative (mean over tokens; worst {rel.max().item():.3g}), cosine "
            f"{cos.mean().item():.4g} (worst {cos.min().item():.4g})")


def export(ckpt: str | Path, out: str | Path, *, formats: list[str] | None = None, seed: int = 0) -> dict:
    """Write the exports of a checkpoint's encoder; returns export.json's content.

    formats None: every format that is exact for this encoder (the others are listed as refused);
    named formats: each must be writable exactly, else ExportError names the first that is not."""
    out = Path(out)
    encoder, meta = load_run_encoder(ckpt)
    wanted = list(formats) if formats else list(FORMATS)
    refused = {f: why for f in wanted if (why := refusal(f, encoder))}
    if formats and refused:
        fmt, why = next(iter(refused.items()))
        raise ExportError(f"cannot export {ckpt} as {fmt}: {why}")
    if out.exists() and not (out / "export.json").is_file():
        raise ExportError(f"{out} exists and is not an export (no export.json): choose another OUT")
    source = {"checkpoint": str(Path(ckpt).resolve()), "sha256": file_sha256(Path(ckpt) / "checkpoint.safetensors"),
              "role": meta.get("role"), "size": meta["encoder"]["size"], "step": meta.get("step")}
    description = encoder_description(encoder, meta, source)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shape = (1, 3, description["frames"], description["crop_size"], description["crop_size"])
    clips = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = encoder(clips)
    written = {}
    rope = rope_difference(encoder)
    if rope and any(refused.get(f) == rope for f in ("hf-vjepa2", "vjepa2")):
        # the tensors map and only the forward differs: say by how much (both formats run transformers' forward)
        with torch.no_grad():
            forced = token_differences(ours, hf_model(encoder)(clips.transpose(1, 2), skip_predictor=True).last_hidden_state)
        refused = {f: f"{why}; forced, the tokens would differ by {forced}" if why == rope else why for f, why in refused.items()}
    for fmt in (f for f in wanted if f not in refused):
        files = WRITERS[fmt](encoder, description, tmp / fmt)
        with torch.no_grad():
            diff = relative_difference(ours, reload_forward(fmt, tmp / fmt, clips))
        if diff > TOLERANCE:
            raise ExportError(f"{fmt} export of {ckpt} differs from the project's forward by {diff:.2e} > {TOLERANCE:g}: a bug")
        written[fmt] = {"folder": fmt, "files": files, "max_relative_token_difference": diff}
    manifest = {
        "source": source,
        "written": written,
        "refused": refused,
        "check": f"one clip of N(0, 1) pixels, seed {seed}, {list(shape)}, float32 CPU; tolerance {TOLERANCE:g}",
        "architecture": architecture(encoder),
    }
    (tmp / "export.json").write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest
