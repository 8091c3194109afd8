"""Frozen-backbone readouts of checkpoints on a labelled dataset (`make probe`, the demo, selection, the studies).

The evaluation streams (docs/evaluation.md). Each encoder's features of each split are computed once
into a feature store (pipeline/features.py) under the probe's cache folder: loader workers decode
the clips in batches, each batch decoded once for every encoder of the call that still lacks it,
and every later run, readout, probe seed or grid re-reads the store: an encoder whose features are
cached is not run at all (the log says so, and probe_results.json's `features.encoded_rows` is 0).
The readouts then stream the store batch by batch (salt/readouts.py): the linear readout and k-NN
on mean-pooled tokens (one vector per sample in memory), the attentive grid on every token.

Ranks: under torchrun every function here runs on every rank. The units of a split are shared out
(unit i to rank i % world), rank 0 opens and finishes each store, and the readouts' passes split
their batches between the ranks; every rank returns the same results, rank 0 writes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from pipeline import fs
from pipeline.features import (
    Extraction, FeatureSplit, SplitStore, StoreRows, extract_units, finish_split, my_units, open_split, sample_rows,
    source_fingerprints, split_store, tensor_sha256,
)
from pipeline.labelled import ViewPlan, check_tasks, list_units, read_class_names, read_labels
from salt.checkpoint import WEIGHTS, has_checkpoint, load_module_weights, read_meta
from salt.config import Config, from_dict
from salt.devices import default_device
from salt.models.factory import build_encoder
from salt.models.vit import VideoViT, vit_size
from salt.plots import plot_loss_curves
from salt.readouts import (
    ReadoutSplits, SubsetRows, gather, majority_rate, over_seeds, rank_of_gram, read_pooled, selection_split,
    streamed_norm, summarize_rows, train_probe_grid, world,
)
from salt.runinfo import write_run_info

RANDOM = "random:"
# "<spec>#blocks=K": the encoder's first K blocks, then its final norm (a readout of block K's tokens)
BLOCKS = "#blocks="
# Fields that decide the token grid: a checkpoint can only be probed on clips of its own geometry.
GEOMETRY = (("data", "frames"), ("data", "crop_size"), ("model", "patch_size"), ("model", "tubelet"))
SPLITS = ("train", "val")


def probe_data_config(cfg: Config) -> Config:
    """The config as the probe uses it, for the run folder's record: the probe section resolved
    (probe.protocol's values filled in), no random crop (a crop can cut the object out of view;
    the probe cuts `spatial_crops` instead, or with probe.augment its own random resized crop),
    no flip (a flip turns "right" into "left"). The frames still come from (seed, key, view)."""
    data = dataclasses.replace(cfg.data, hflip_prob=0.0, crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0))
    return dataclasses.replace(cfg, data=data, probe=cfg.probe.resolved())


def view_plans(cfg: Config) -> dict[str, ViewPlan]:
    """What each view of a train and a val clip is (pipeline/labelled.py: ViewPlan)."""
    cfg = probe_data_config(cfg)
    probe = cfg.probe
    train_data = (dataclasses.replace(cfg.data, crop_area=probe.crop_area, crop_aspect=probe.crop_aspect)
                  if probe.augment else cfg.data)
    return {
        "train": ViewPlan(data=train_data, windows=probe.train_views, segments=probe.segments, augment=probe.augment),
        "val": ViewPlan(data=cfg.data, windows=probe.eval_views, segments=probe.segments, crops=probe.eval_crops),
    }


def split_blocks(spec: str) -> tuple[str, int | None]:
    """"<spec>#blocks=K" -> (spec, K); a spec without the suffix -> (spec, None): every block."""
    base, sep, blocks = spec.partition(BLOCKS)
    if not sep:
        return spec, None
    if not blocks.isdigit() or int(blocks) < 1:
        raise ValueError(f"{spec}: '{BLOCKS}' takes a block count >= 1, e.g. {base}{BLOCKS}2")
    return base, int(blocks)


def check_spec(spec: str, cfg: Config) -> dict | None:
    """Fails before any decoding on a missing checkpoint, unknown size, foreign geometry or a block
    count past the encoder's depth; returns the checkpoint's metadata (None for random:<size>)."""
    spec, blocks = split_blocks(spec)
    if spec.startswith(RANDOM):
        size = spec.removeprefix(RANDOM)
        _check_depth(spec, size, blocks)
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
    _check_depth(spec, meta["encoder"]["size"], blocks)
    return meta


def _check_depth(spec: str, size: str, blocks: int | None) -> None:
    depth = vit_size(size).depth
    if blocks is not None and blocks > depth:
        raise ValueError(f"{spec}{BLOCKS}{blocks}: a {size} encoder has {depth} blocks")


def load_encoder(spec: str, cfg: Config, *, device: str = "cpu") -> tuple[VideoViT, str]:
    """A frozen encoder from a teacher/student run folder, or `random:<size>` (seeded by
    cfg.probe.seed): the floor a trained encoder has to beat. Returns (encoder, description)."""
    meta = check_spec(spec, cfg)
    description = describe(spec, cfg, meta)
    spec, blocks = split_blocks(spec)
    if meta is None:
        size = spec.removeprefix(RANDOM)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.probe.seed)
            encoder = build_encoder(cfg, size)
    else:
        ckpt_cfg = from_dict(Config, meta["config"])
        # the attention backend is a choice of this machine, not of the checkpoint
        ckpt_cfg = dataclasses.replace(ckpt_cfg, model=dataclasses.replace(ckpt_cfg.model, attention=cfg.model.attention))
        encoder = build_encoder(ckpt_cfg, meta["encoder"]["size"])
        encoder.load_state_dict(load_module_weights(spec, "encoder"))
    if blocks is not None:  # the later blocks are dropped; the final norm stays (the readouts standardise anyway)
        encoder.blocks = encoder.blocks[:blocks]
    return encoder.to(device).eval().requires_grad_(False), description


def describe(spec: str, cfg: Config, meta: dict | None) -> str:
    spec, blocks = split_blocks(spec)
    part = f", its first {blocks} block(s)" if blocks is not None else ""
    if meta is None:
        return f"random {spec.removeprefix(RANDOM)} (seed {cfg.probe.seed}{part})"
    return f"{meta['role']} {meta['encoder']['size']} from {spec} (step {meta.get('step')}{part})"


@dataclasses.dataclass(kw_only=True, eq=False)
class Probed:
    """One encoder of a probe call: where its results go, what identifies its features."""

    name: str
    spec: str
    out: Path
    tasks: list[str]
    meta: dict | None
    size: str
    identity: dict
    stores: dict[str, SplitStore] = dataclasses.field(default_factory=dict)
    encoded: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> rows this run encoded
    module: torch.nn.Module | None = None  # a random init, built once for its identity


def identify(name: str, spec: str, out: Path, tasks: list[str], cfg: Config, device: torch.device) -> Probed:
    """What the features of `spec` depend on: the checkpoint file's sha256 (a random init: its
    weights'), its size and width, and where and how it runs (attention backend, device type)."""
    meta = check_spec(spec, cfg)
    base, blocks = split_blocks(spec)
    common = {"attention": cfg.model.attention, "device": torch.device(device).type}
    if blocks is not None:  # only then: the features of a whole encoder keep the identity they had
        common["blocks"] = blocks
    if meta is None:
        size = base.removeprefix(RANDOM)
        module, _ = load_encoder(spec, cfg, device="cpu")
        identity = {"kind": "random", "size": size, "seed": cfg.probe.seed, "sha256": tensor_sha256(module),
                    "width": module.width, **common}
        return Probed(name=name, spec=spec, out=out, tasks=tasks, meta=None, size=size, identity=identity, module=module)
    size = meta["encoder"]["size"]
    weights = Path(base) / WEIGHTS
    identity = {"kind": "checkpoint", "checkpoint": str(weights.resolve()), "sha256": fs.sha256(str(weights)),
                "role": meta["role"], "size": size, "step": meta.get("step"), "width": meta["encoder"]["width"],
                "model": meta["config"]["model"], **common}
    return Probed(name=name, spec=spec, out=out, tasks=tasks, meta=meta, size=size, identity=identity)


def log(message: str) -> None:
    if world()[0] == 0:
        print(message, flush=True)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def run_probes(
    encoders: dict[str, tuple[str, Path]], cfg: Config, data: str, *, cache: str | Path,
    tasks: list[str] | dict[str, list[str]] | None = None, device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, dict[str, dict]]:
    """name -> task -> result (see `read_encoder`) for encoders {name: (spec, out folder)}; each
    writes its out folder (`write_probe`). Features come from the cache where they are, else are
    extracted (every encoder's in the same pass over the clips). `tasks`: for all encoders, or per
    name (None: every task of labels.json). device None: this rank's GPU where there is one."""
    cfg = probe_data_config(cfg)
    rank, size = world()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if size > 1 and torch.cuda.is_available() else default_device()
    names = read_class_names(data)
    task_of = {n: check_tasks(names, tasks.get(n) if isinstance(tasks, dict) else tasks, data) for n in encoders}
    probed = [identify(n, spec, Path(out), task_of[n], cfg, device) for n, (spec, out) in encoders.items()]
    plans = view_plans(cfg)
    t0 = time.perf_counter()
    # rank 0 lists the units (and makes the dataset index where there is none), the others take its list
    units = {split: list_units(data, split, cfg.probe.clips_per_shard) for split in SPLITS} if rank == 0 else None
    units = from_rank0(units)
    for split in SPLITS:
        fingerprints = from_rank0(source_fingerprints(units[split]) if rank == 0 else None)
        for p in probed:
            p.stores[split] = split_store(str(cache), encoder=p.identity, cfg=cfg, data=data, split=split,
                                          plan=plans[split], units=units[split], fingerprints=fingerprints)
    todo = {split: [p for p in probed if not p.stores[split].complete] for split in SPLITS}
    for split in SPLITS:
        for p in probed:
            p.encoded[split] = 0
            if p not in todo[split]:
                log(f"features: {p.name} {split}: cached in {p.stores[split].path} (the encoder is not run)")
    if any(todo.values()):
        extract(todo, units, plans, cfg, device=device, progress=progress)
    extract_s = time.perf_counter() - t0
    results = {}
    for p in probed:
        p.module = None
        results[p.name] = read_encoder(p, cfg, data, plans, device=device, progress=progress, extract_s=extract_s)
    return results


def from_rank0(value):
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# encoders held in memory at once while their features are extracted (one decode serves them all)
ENCODERS_PER_PASS = 8


def extract(todo: dict[str, list[Probed]], units: dict[str, list], plans: dict[str, ViewPlan], cfg: Config, *, device,
            progress: bool) -> None:
    """Fill the stores of `todo` (split -> encoders whose store of it is incomplete): rank 0 opens
    them, every rank extracts its units of each split, rank 0 finishes them. The encoders are loaded
    ENCODERS_PER_PASS at a time, once for both splits."""
    rank, size = world()
    ids = {(p.name, split): open_split(p.stores[split]) for split, ps in todo.items() for p in ps} if rank == 0 else None
    ids = from_rank0(ids)
    for split, ps in todo.items():
        for p in ps:
            log(f"features: {p.name} {split}: encoding {len(p.stores[split].missing())} of {len(units[split])} unit(s) "
                f"into {p.stores[split].path}")
        if size > 1 and ps:  # every rank says what it takes on
            mine = my_units(units[split], set().union(*(p.stores[split].missing() for p in ps)), rank, size)
            print(f"features: rank {rank}/{size} {split}: {len(mine)} unit(s) {[u.name for u in mine][:4]}", flush=True)
    encoders = list(dict.fromkeys(p for ps in todo.values() for p in ps))
    for start in range(0, len(encoders), ENCODERS_PER_PASS):
        group = encoders[start : start + ENCODERS_PER_PASS]
        jobs = {}
        for p in group:
            encoder = p.module.to(device) if p.module is not None else load_encoder(p.spec, cfg, device=str(device))[0]
            jobs[p] = Extraction(encoder=encoder, stores={s: (p.stores[s], ids[(p.name, s)]) for s in SPLITS if p in todo[s]})
        for split in SPLITS:
            before = {p: job.rows for p, job in jobs.items()}
            extract_units(list(jobs.values()), split, units[split], plans[split], batch_size=cfg.extract.batch_size,
                          num_workers=cfg.data.num_workers, device=device, rank=rank, world=size, progress=progress)
            counts = gather([jobs[p].rows - before[p] for p in group])  # rows each rank encoded, per encoder
            for i, p in enumerate(group):
                p.encoded[split] = sum(c[i] for c in counts)
        del jobs
    barrier()
    if rank == 0:
        for split, ps in todo.items():
            for p in ps:
                store = p.stores[split]
                if not store.complete:
                    raise RuntimeError(f"feature store {store.path}: units {sorted(store.missing())[:3]} were not extracted")
                finish_split(store)
    barrier()


def read_encoder(p: Probed, cfg: Config, data: str, plans: dict[str, ViewPlan], *, device, progress: bool,
                 extract_s: float) -> dict[str, dict]:
    """Every readout of one encoder from its feature stores; rank 0 writes p.out (`write_probe`)."""
    train_split, val_split = FeatureSplit(p.stores["train"].path), FeatureSplit(p.stores["val"].path)
    try:
        return read_splits(p, train_split, val_split, cfg, data, plans, device=device, progress=progress,
                           extract_s=extract_s)
    finally:
        train_split.close()
        val_split.close()


@dataclasses.dataclass(kw_only=True)
class EncoderFeatures:
    """One encoder's features as the readouts take them: the train samples (their view changes with
    the epoch) and their pooled vectors, the val samples, the video of each val sample, and the seeded
    fit / select split of the train clips."""

    train_rows: StoreRows
    val_rows: StoreRows
    val_clip: torch.Tensor  # [val samples] -> val video
    train_pooled: torch.Tensor  # [train clips, D]
    val_pooled: torch.Tensor  # [val samples, D]
    fit: torch.Tensor
    select: torch.Tensor
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None  # probe.norm, fitted on the fit clips when first needed


def read_splits(p: Probed, train_split: FeatureSplit, val_split: FeatureSplit, cfg: Config, data: str,
                plans: dict[str, ViewPlan], *, device, progress: bool, extract_s: float) -> dict[str, dict]:
    t0 = time.perf_counter()
    probe = cfg.probe
    if not train_split.keys or not val_split.keys:
        empty = train_split if not train_split.keys else val_split
        raise ValueError(f"no decodable videos in {data}/{'train' if empty is train_split else 'val'} "
                         f"({len(empty.errors)} failed)")
    train_rows, _ = sample_rows(train_split, plans["train"], epochs_cycle=True)
    val_rows, val_clip = sample_rows(val_split, plans["val"], epochs_cycle=False)
    batch = cfg.extract.batch_size
    train_summary = summarize_rows(train_rows, batch_size=batch, progress=progress, desc="pool train")
    fit, select = selection_split(len(train_rows), probe.select_fraction, seed=probe.seed)
    feats = EncoderFeatures(train_rows=train_rows, val_rows=val_rows, val_clip=val_clip, train_pooled=train_summary.pooled,
                            val_pooled=summarize_rows(val_rows, batch_size=batch, progress=progress, desc="pool val").pooled,
                            fit=fit, select=select)
    names = read_class_names(data)
    labels = {**read_labels(p.stores["train"].units, names, p.tasks, keys=set(train_split.keys)),
              **read_labels(p.stores["val"].units, names, p.tasks, keys=set(val_split.keys))}
    results = {}
    for task in p.tasks:
        y = torch.tensor([labels[k][task] for k in train_split.keys])
        val_y = torch.tensor([labels[k][task] for k in val_split.keys])
        results[task] = read_task(feats, y, val_y, len(names[task]), cfg, encoder_heads=vit_size(p.size).heads,
                                  device=device, progress=progress)
    features = {"width": train_split.width, "effective_rank": round(rank_of_gram(train_summary.gram), 2),
                "encoded_rows": sum(p.encoded.values()), "cached": {s: p.encoded[s] == 0 for s in SPLITS},
                "stores": {s: p.stores[s].path for s in SPLITS}}
    if world()[0] == 0:
        write_probe(p.out, cfg, results, checkpoint=p.spec, encoder=describe(p.spec, cfg, p.meta), data=data,
                    timing={"extract_s": round(extract_s, 2), "read_s": round(time.perf_counter() - t0, 2)},
                    decode_errors=train_split.errors + val_split.errors, features=features)
    return results


def read_task(
    feats: EncoderFeatures, y: torch.Tensor, val_video_y: torch.Tensor, num_classes: int, cfg: Config, *,
    encoder_heads: int, device, progress: bool = True,
) -> dict:
    """Every readout of one task (labels y [train clips], val_video_y [val videos]).

    The reported `top1` is the linear readout (docs/yardstick.md: deterministic, and it tells a
    trained encoder from a random one); k-NN beside it; the attentive grid, once per probe seed
    (probe.seeds, 0: none), under `attentive`, streaming the tokens from the feature store. A seeded
    share of the train videos chooses heads and l2; the rest trains; val only reports (its samples'
    softmax averaged per video)."""
    t0 = time.perf_counter()
    probe, fit, select = cfg.probe, feats.fit, feats.select
    val_y = val_video_y[feats.val_clip]
    pooled = feats.train_pooled
    result = read_pooled(pooled[fit], y[fit], pooled[select], y[select], feats.val_pooled, val_y,
                         num_classes=num_classes, val_groups=feats.val_clip, probe_cfg=probe)
    chance, top1 = majority_rate(val_video_y), result["linear_top1"]
    result |= {"top1": top1, "chance": chance, "num_classes": num_classes, "num_train": len(fit),
               "num_select": len(select), "num_val": len(val_video_y),
               "binomial_se": math.sqrt(top1 * (1 - top1) / len(val_video_y))}
    if probe.seeds:
        fit_rows = SubsetRows(feats.train_rows, fit)
        if feats.norm is None:  # fitted once per encoder on the fit clips' tokens: the same for every task
            feats.norm = streamed_norm(probe.norm, fit_rows, batch_size=cfg.extract.batch_size)
        splits = ReadoutSplits(fit_rows, y[fit], SubsetRows(feats.train_rows, select), y[select], feats.val_rows, val_y,
                               num_classes=num_classes, val_groups=feats.val_clip).map_features(feats.norm)
        runs = [
            train_probe_grid(splits, probe_cfg=probe, encoder_heads=encoder_heads, seed=probe.seed + i,
                             attention_backend=cfg.model.attention, progress=progress, device=device)
            for i in range(probe.seeds)
        ]
        result["attentive"] = over_seeds(runs)
    return result | {"train_s": round(time.perf_counter() - t0, 2)}


def write_probe(
    out_dir: str | Path, cfg: Config, results: dict[str, dict], *, checkpoint: str, encoder: str, data: str,
    timing: dict, decode_errors: list[dict], features: dict,
) -> None:
    """config.yaml + run_info.yaml, probe_results.json (with the train tokens' width and
    effective rank, and where the features are), metrics.jsonl (per task and epoch, the best
    head's mean train loss) and probe_loss.png."""
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
    """{width, effective_rank, ...} of the frozen train tokens, from a probe folder `write_probe` wrote."""
    return json.loads((Path(out_dir) / "probe_results.json").read_text())["features"]


def default_cache(cfg: Config, out_root: str | Path) -> str:
    return cfg.probe.cache or str(Path(out_root) / "features")


def probe_checkpoint(
    spec: str, cfg: Config, data: str, out_dir: str | Path, *, tasks: list[str] | None = None,
    device: str | None = None, progress: bool = True,
) -> dict[str, dict]:
    """task -> result (see `read_encoder`) for one encoder; features cached under out_dir/features
    unless probe.cache names a folder."""
    return run_probes({"encoder": (spec, Path(out_dir))}, cfg, data, cache=default_cache(cfg, out_dir), tasks=tasks,
                      device=device, progress=progress)["encoder"]


def probe_encoders(
    specs: dict[str, str], cfg: Config, data: str, out_root: str | Path, *,
    tasks: list[str] | dict[str, list[str]] | None = None, device: str | None = None, progress: bool = True,
) -> dict[str, dict[str, dict]]:
    """name -> task -> result, for several encoders (their features extracted in one pass over the
    clips); each writes out_root/<name>/, the features go to out_root/features (or probe.cache)."""
    for spec in specs.values():
        check_spec(spec, cfg)  # every encoder is checked before any data is read
    return run_probes({name: (spec, Path(out_root) / name) for name, spec in specs.items()}, cfg, data,
                      cache=default_cache(cfg, out_root), tasks=tasks, device=device, progress=progress)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeData:
    """A labelled dataset as `probe_encoder` reads it. Nothing is decoded ahead: each encoder's features
    stream into the feature cache (shared through out_dir's parent folder) on first use."""

    data: str
    tasks: list[str] | None = None


def load_probe_data(cfg: Config, data: str, *, tasks: list[str] | None = None, progress: bool = True) -> ProbeData:
    read_class_names(data)  # fails here, before any encoder, on data that is not labelled
    return ProbeData(data=data, tasks=tasks)


def probe_encoder(
    spec: str, cfg: Config, loaded: ProbeData, out_dir: str | Path, *, data: str, tasks: list[str] | None = None,
    device: str | None = None, progress: bool = True,
) -> dict[str, dict]:
    """One encoder (`probe_encoders` extracts several in one pass: prefer it); its features are cached
    in out_dir's parent's features/ folder (or probe.cache), shared with the encoders beside it."""
    return run_probes({"encoder": (spec, Path(out_dir))}, cfg, data, cache=default_cache(cfg, Path(out_dir).parent),
                      tasks=tasks or loaded.tasks, device=device, progress=progress)["encoder"]
