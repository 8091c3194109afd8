"""Frozen-backbone readouts of checkpoints on a labelled dataset (`make probe`, the demo, selection, the studies).

Decoding the clips is the slow part and does not depend on the encoder, so the clips
of both splits are decoded once (`load_probe_data`) and shared by every encoder probed;
each encoder encodes them once and the features serve every task and every readout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from pipeline.labelled import LabelledClips, load_labelled
from salt.config import Config, from_dict
from salt.models.vit import VideoViT, vit_size
from salt.plots import plot_loss_curves
from salt.readouts import (
    ReadoutSplits, effective_rank, encode_features, feature_norm, group_labels, majority_rate, over_seeds,
    pooled_readouts, selection_split, train_probe_grid,
)
from salt.runinfo import write_run_info
from salt.checkpoint import has_checkpoint, load_module_weights, read_meta
from salt.devices import default_device
from salt.models.factory import build_encoder

RANDOM = "random:"
# Fields that decide the token grid: a checkpoint can only be probed on clips of its own geometry.
GEOMETRY = (("data", "frames"), ("data", "crop_size"), ("model", "patch_size"), ("model", "tubelet"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeData:
    train: LabelledClips  # 1 view per video
    val: LabelledClips  # eval_views x eval_crops views per video
    decode_s: float


def probe_data_config(cfg: Config) -> Config:
    """The data config as the probe uses it, for the run folder's record: no random crop (a crop
    can cut the object out of view; `load_labelled` cuts `spatial_crops` instead), no flip (a flip
    turns "right" into "left"). The frames still come from (seed, key, view)."""
    data = dataclasses.replace(cfg.data, hflip_prob=0.0, crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0))
    return dataclasses.replace(cfg, data=data)


def load_probe_data(cfg: Config, data: str, *, tasks: list[str] | None = None, progress: bool = True) -> ProbeData:
    t0 = time.perf_counter()
    data_cfg = probe_data_config(cfg).data
    train = load_labelled(data, "train", data_cfg, views=1, tasks=tasks, progress=progress)
    val = load_labelled(
        data, "val", data_cfg, views=cfg.probe.eval_views, crops=cfg.probe.eval_crops, tasks=tasks, progress=progress
    )
    return ProbeData(train=train, val=val, decode_s=time.perf_counter() - t0)


def check_spec(spec: str, cfg: Config) -> dict | None:
    """Fails before any decoding on a missing checkpoint, unknown size or foreign geometry;
    returns the checkpoint's metadata (None for random:<size>)."""
    if spec.startswith(RANDOM):
        vit_size(spec.removeprefix(RANDOM))
        return None
    if not has_checkpoint(spec):
        raise FileNotFoundError(
            f"{spec}: no checkpoint.safetensors (want a teacher or student run folder, or random:<size>)"
        )
    meta = read_meta(spec)
    ckpt_cfg = from_dict(Config, meta["config"])
    for section, name in GEOMETRY:
        mine, theirs = getattr(getattr(cfg, section), name), getattr(getattr(ckpt_cfg, section), name)
        if mine != theirs:
            raise ValueError(f"{section}.{name}={mine} but checkpoint {spec} was trained with {theirs}")
    return meta


def load_encoder(spec: str, cfg: Config, *, device: str = "cpu") -> tuple[VideoViT, str]:
    """A frozen encoder from a teacher/student run folder, or `random:<size>` (seeded by
    cfg.probe.seed): the floor a trained encoder has to beat. Returns (encoder, description)."""
    meta = check_spec(spec, cfg)
    if meta is None:
        size = spec.removeprefix(RANDOM)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.probe.seed)
            encoder = build_encoder(cfg, size)
        description = f"random {size} (seed {cfg.probe.seed})"
    else:
        ckpt_cfg = from_dict(Config, meta["config"])
        # the attention backend is a choice of this machine, not of the checkpoint
        ckpt_cfg = dataclasses.replace(ckpt_cfg, model=dataclasses.replace(ckpt_cfg.model, attention=cfg.model.attention))
        encoder = build_encoder(ckpt_cfg, meta["encoder"]["size"])
        encoder.load_state_dict(load_module_weights(spec, "encoder"))
        description = f"{meta['role']} {meta['encoder']['size']} from {spec} (step {meta.get('step')})"
    return encoder.to(device).eval().requires_grad_(False), description


def probe_encoder(
    spec: str, cfg: Config, loaded: ProbeData, out_dir: str | Path, *, data: str, tasks: list[str] | None = None,
    device: str | None = None, progress: bool = True,
) -> dict[str, dict]:
    """Probes one encoder on already decoded clips, on `tasks` (None: every task decoded); writes
    out_dir (see `write_probe`). device None: the GPU where there is one."""
    device = device or default_device()
    encoder, description = load_encoder(spec, cfg, device=device)
    t0 = time.perf_counter()
    train_x = encode_features(encoder, loaded.train.clips, batch_size=cfg.probe.batch_size)  # [N, tokens, D]
    val_x = encode_features(encoder, loaded.val.clips, batch_size=cfg.probe.batch_size)  # [M * views, tokens, D]
    encode_s = time.perf_counter() - t0
    feature_stats = {"width": train_x.shape[-1], "effective_rank": round(effective_rank(train_x), 2)}  # train split, as encoded
    results = {task: read_task(train_x, val_x, loaded, task, cfg, encoder_heads=vit_size(encoder.size_name).heads,
                               progress=progress) for task in tasks or loaded.train.class_names}
    write_probe(
        out_dir, cfg, results, checkpoint=spec, encoder=description, data=data,
        timing={"decode_s": round(loaded.decode_s, 2), "encode_s": round(encode_s, 2)},
        decode_errors=loaded.train.errors + loaded.val.errors, features=feature_stats,
    )
    return results


def read_task(
    train_x: torch.Tensor, val_x: torch.Tensor, loaded: ProbeData, task: str, cfg: Config, *, encoder_heads: int,
    progress: bool = True,
) -> dict:
    """Every readout of one task from frozen tokens (train [N, tokens, D], val [M * views, tokens, D]).

    The reported `top1` is the linear readout (docs/yardstick.md: deterministic, and it tells a
    trained encoder from a random one); k-NN beside it; the attentive grid, once per probe seed
    (probe.seeds, 0: none), under `attentive`. A seeded share of the train videos chooses heads
    and l2; the rest trains; val only reports."""
    t0 = time.perf_counter()
    fit, select = selection_split(len(train_x), cfg.probe.select_fraction, seed=cfg.probe.seed)
    y, val_y = loaded.train.labels[task], loaded.val.row_labels(task)
    splits = ReadoutSplits(train_x[fit], y[fit], train_x[select], y[select], val_x, val_y,
                           num_classes=len(loaded.train.class_names[task]), val_groups=loaded.val.video)
    result = pooled_readouts(splits, probe_cfg=cfg.probe)
    val_labels = group_labels(val_y, loaded.val.video)
    chance, top1 = majority_rate(val_labels), result["linear_top1"]
    result |= {"top1": top1, "chance": chance, "num_classes": splits.num_classes, "num_train": len(fit),
               "num_select": len(select), "num_val": len(val_labels), "binomial_se": math.sqrt(top1 * (1 - top1) / len(val_labels))}
    if cfg.probe.seeds:
        normed = splits.map_features(feature_norm(cfg.probe.norm, splits.train_x))
        runs = [
            train_probe_grid(normed, probe_cfg=cfg.probe, encoder_heads=encoder_heads, seed=cfg.probe.seed + i,
                             attention_backend=cfg.model.attention, progress=progress)
            for i in range(cfg.probe.seeds)
        ]
        result["attentive"] = over_seeds(runs)
    return result | {"train_s": round(time.perf_counter() - t0, 2)}


def write_probe(
    out_dir: str | Path, cfg: Config, results: dict[str, dict], *, checkpoint: str, encoder: str, data: str,
    timing: dict, decode_errors: list[dict], features: dict,
) -> None:
    """config.yaml + run_info.yaml, probe_results.json (with the train tokens' width and
    effective rank), metrics.jsonl (per task and epoch, the best head's mean train loss) and probe_loss.png."""
    out = Path(out_dir)
    write_run_info(out, probe_data_config(cfg), checkpoint=checkpoint, encoder=encoder, data=data)  # as used
    summary = {"checkpoint": checkpoint, "encoder": encoder, "data": data, "timing": timing,
               "decode_errors": decode_errors, "features": features, "tasks": results}
    (out / "probe_results.json").write_text(json.dumps(summary, indent=1))
    records = [  # the attentive probe's chosen head (first probe seed), where it ran
        {"task": task, "epoch": epoch, "loss": loss, "lr": r["attentive"]["lr"], "wd": r["attentive"]["wd"]}
        for task, r in results.items() if "attentive" in r
        for epoch, loss in enumerate(r["attentive"]["train_loss"], start=1)
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if records:
        plot_loss_curves(records, out / "probe_loss.png", title=f"probe train loss: {encoder}", x="epoch", group_by="task")


def read_probe_features(out_dir: str | Path) -> dict:
    """{width, effective_rank} of the frozen train tokens, from a probe folder `write_probe` wrote."""
    return json.loads((Path(out_dir) / "probe_results.json").read_text())["features"]


def probe_checkpoint(
    spec: str, cfg: Config, data: str, out_dir: str | Path, *, tasks: list[str] | None = None,
    device: str | None = None, progress: bool = True,
) -> dict[str, dict]:
    """task -> result (see `read_task`) for one encoder."""
    check_spec(spec, cfg)
    loaded = load_probe_data(cfg, data, tasks=tasks, progress=progress)
    return probe_encoder(spec, cfg, loaded, out_dir, data=data, device=device, progress=progress)


def probe_encoders(
    specs: dict[str, str], cfg: Config, data: str, out_root: str | Path, *, tasks: list[str] | None = None,
    device: str | None = None, progress: bool = True,
) -> dict[str, dict[str, dict]]:
    """name -> task -> result, for several encoders on clips decoded once; each writes out_root/<name>/."""
    for spec in specs.values():
        check_spec(spec, cfg)
    loaded = load_probe_data(cfg, data, tasks=tasks, progress=progress)
    return {
        name: probe_encoder(spec, cfg, loaded, Path(out_root) / name, data=data, device=device, progress=progress)
        for name, spec in specs.items()
    }
