"""The stage-1 variants study (`make stage1-variants`): does any V-Pixel teacher here read better than
a random init of its size, and which recipe choices matter?

Per data seed (the embedded dataset generated anew with that seed; the seed also sets every
initialisation and sample): one V-Pixel teacher per variant (a list of config overrides on the tiny
config's stage 1), a learning curve (the baseline trained longer, read at its snapshots), and a
random-init encoder per token geometry (the floor). Every encoder is read by the linear readout and
k-NN on both tasks (docs/yardstick.md), the variants and floors also after each of their blocks. The
report gives, per variant and task, mean +- sd over seeds and the per-seed difference from the floor
with its standard error, and a go / no-go per variant: a teacher whose final loss stays near the
loss of one constant prediction for every masked tubelet learned nothing of the clips, and is
reported as not trained rather than read as a result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from experiments.pool import Phases, vpixel_teacher
from experiments.probing import BLOCKS, probe_encoders
from experiments.runs import first_teacher_batches
from experiments.selection import checkpoint_points
from experiments.stats import percent_mean_sd
from salt.config import Config, from_dict, load_config, to_dict
from salt.models.vit import vit_size
from salt.runinfo import git_commit, write_run_info
from salt.train.teacher import constant_prediction_loss

# name -> overrides of the config's stage 1. The reference points: the tiny config's recipe (raw pixels,
# L1, V-JEPA multi-block masks over half the clip's time, 8 px patches) and VideoMAE's (MSE on per-tubelet
# normalised pixels, random tubes over ~90% of the positions: 36 draws of one of the 4x4 positions cover
# 1 - (15/16)^36 = 90% of them). The variants of earlier runs (docs/method.md's whole-time masks, which
# were the baseline then, raw-pixel MSE, 4 px patches, one half-clip block) are in docs/STAGE1.md's
# earlier tables.
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "normalised pixels, L1": ["model.pixel_norm=true"],
    "VideoMAE's loss (MSE on normalised pixels)": ["model.pixel_norm=true", "model.pixel_loss=mse"],
    "VideoMAE (its loss, 90% tubes)": [
        "model.pixel_norm=true", "model.pixel_loss=mse", "masking.generators=[{num_blocks: 36, spatial_scale: 0.0625}]"],
}
GEOMETRY = ("model.patch_size", "model.tubelet")  # overrides that change the tokens, so the floor too
# go / no-go: a teacher trained when its final loss is below this share of the constant prediction's
TRAINED_BELOW = 0.9
CONSTANT_BATCHES = 8  # batches of the train split the constant prediction is fitted and scored on


@dataclasses.dataclass(kw_only=True)
class Stage1Study:
    config: str = "jobs/configs/tiny.yaml"
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    size: str = "vit_cpu_xs"
    variants: dict[str, list[str]] = dataclasses.field(default_factory=lambda: dict(VARIANTS))
    # the baseline trained for curve_steps[-1] steps and read at each of curve_steps (its lr schedule
    # spans the longest run, so its first point is not the baseline variant)
    # 1,200 steps of a vit_cpu_xs teacher: ~8-12 CPU-minutes here, within the 20 the question allows
    curve_steps: list[int] = dataclasses.field(default_factory=lambda: [400, 1200])
    num_train: int = 2000
    num_val: int = 1200
    workers: int = 2
    overrides: list[str] = dataclasses.field(default_factory=list)

    def seed_config(self, seed: int, extra: list[str] = ()) -> Config:
        return load_config(self.config, [
            *self.overrides, *extra, f"model.teacher={self.size}",
            f"teacher.seed={seed}", f"probe.seed={seed}", f"data.seed={seed}",
        ])

    def floor_key(self, extra: list[str]) -> str:
        return ",".join(o for o in extra if o.split("=")[0] in GEOMETRY) or "default"


def _runs(study: Stage1Study) -> dict[str, list[str]]:
    """Every teacher run of a seed: name -> overrides; the long curve first, so that the pool's workers
    do not end on it one at a time."""
    runs = {}
    if study.curve_steps:
        longest, every = max(study.curve_steps), min(study.curve_steps)
        runs["curve"] = [f"teacher.optim.steps={longest}", f"teacher.snapshot_every={every}"]
    return runs | {name: list(extra) for name, extra in study.variants.items()}


def _teacher(cfg_dict: dict, size: str, data: str, out: str) -> dict:
    """A V-Pixel teacher's run summary, with the loss of a constant prediction on its own batches."""
    summary = vpixel_teacher(cfg_dict, size, data, out)
    cfg = from_dict(Config, cfg_dict)
    return summary | {"constant_loss": constant_prediction_loss(cfg, first_teacher_batches(cfg, data, CONSTANT_BATCHES))}


def block_name(name: str, block: int) -> str:
    return f"{name} @ block {block}"


def _specs(study: Stage1Study, seed: int, out: Path) -> dict[str, dict[str, str]]:
    """A seed's encoders to read, grouped by token geometry (floor key): name -> spec. The variants and
    floors are also read after each block but the last (their whole encoder is the last)."""
    groups: dict[str, dict[str, str]] = {}
    depth = vit_size(study.size).depth
    for name, extra in _runs(study).items():
        group = groups.setdefault(study.floor_key(extra), {})
        if name == "curve":
            group |= {f"curve-{p['step']}": p["spec"] for p in checkpoint_points(out / "curve", "curve")
                      if p["step"] in study.curve_steps}
            continue
        for key, spec in ((name, str(out / _folder(name))), (f"floor:{study.floor_key(extra)}", f"random:{study.size}")):
            group[key] = spec
            group |= {block_name(key, b): f"{spec}{BLOCKS}{b}" for b in range(1, depth)}
    return groups


def _read(study_dict: dict, seed: int, geometry: str, specs: dict[str, str], data: str, out: str) -> dict[str, dict]:
    """Reads encoders of one seed and geometry (one pass over the clips for all): name -> task -> readings."""
    study = Stage1Study(**study_dict)
    cfg = study.seed_config(seed, [] if geometry == "default" else geometry.split(","))
    read = probe_encoders({_folder(n): spec for n, spec in specs.items()}, cfg, data, Path(out) / "probe", progress=False)
    return {n: read[_folder(n)] for n in specs}


def _folder(name: str) -> str:
    """A variant's folder name: its words joined by single dashes."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def run_stage1_study(study: Stage1Study, *, out: str | Path, progress: bool = True) -> dict:
    out = Path(out)
    with Phases("stage1-variants", study.workers, progress) as phases:
        phase = phases.run
        roots = {s: out / f"seed-{s}" for s in study.seeds}
        data = {s: str(root / "data") for s, root in roots.items()}

        phases.write_data(data, study.num_train, study.num_val)
        teachers = phase("teachers", {
            f"{s}/{name}": (_teacher, to_dict(study.seed_config(s, extra)), study.size, data[s], str(roots[s] / _folder(name)))
            for name, extra in _runs(study).items() for s in study.seeds
        })
        groups = {(s, geometry): specs for s in study.seeds for geometry, specs in _specs(study, s, roots[s]).items()}
        parts = 1 if len(groups) % study.workers == 0 else 2  # halves keep the workers busy over e.g. 3 seeds on 2
        jobs = {}
        for (s, geometry), specs in groups.items():  # one pass over a seed's clips serves every encoder of a job
            items = list(specs.items())
            for i in range(min(parts, len(items))):
                jobs[f"{s}/{geometry}/{i}"] = (_read, dataclasses.asdict(study), s, geometry, dict(items[i::parts]),
                                               data[s], str(roots[s]))
        read = phase("readouts", jobs)
        readings = {str(s): {} for s in study.seeds}
        for job, result in read.items():
            readings[job.split("/")[0]] |= result
    result = {"study": dataclasses.asdict(study), "commit": git_commit(), "teachers": teachers, "readings": readings,
              "walls": phases.rounded()}
    write_run_info(out, study.seed_config(study.seeds[0]), study=json.dumps(dataclasses.asdict(study)))
    (out / "stage1.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def _versus_floor(diffs: list[float], reading_ses: list[float]) -> str:
    """Mean of the per-seed differences ± its standard error, and whether it clears two of them. The
    standard error is the larger of the seeds' (sd / sqrt(n)) and the readings' own (each
    difference's binomial SE, combined over the seeds): with two or three seeds the first can be
    near 0 by chance, and no difference is known better than the val split can measure it."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    over_seeds = statistics.stdev(diffs) / n**0.5 if n > 1 else 0.0
    of_readings = sum(se**2 for se in reading_ses) ** 0.5 / n
    se = max(over_seeds, of_readings)
    verdict = "above" if mean > 2 * se else ("below" if mean < -2 * se else "within")
    return f"{100 * mean:+.1f} ± {100 * se:.1f} ({verdict})"


EARLIER = "## Earlier runs"  # a report keeps this section of the file it replaces: negative results stay


def _versus(readings: dict, seeds: list[str], key: str, floor: str, task: str) -> str:
    lin = [readings[s][key][task]["top1"] for s in seeds]
    return _versus_floor([x - readings[s][floor][task]["top1"] for x, s in zip(lin, seeds)],
                         [math.hypot(readings[s][key][task]["binomial_se"], readings[s][floor][task]["binomial_se"])
                          for s in seeds])


def _go(result: dict, seeds: list[str], run: str) -> tuple[str, str, int]:
    """(final / constant loss, 'trained' cell, seeds trained) of a teacher run over the seeds."""
    ratios = [result["teachers"][f"{s}/{run}"]["final_loss"] / result["teachers"][f"{s}/{run}"]["constant_loss"]
              for s in seeds]
    trained = sum(r < TRAINED_BELOW for r in ratios)
    cell = "yes" if trained == len(seeds) else ("**no: not trained**" if trained == 0 else f"{trained} of {len(seeds)} seeds")
    return f"{statistics.fmean(ratios):.2f}", cell, trained


def write_report(result: dict, path: str | Path, *, command: str) -> str:
    study = Stage1Study(**result["study"])
    readings = result["readings"]
    seeds = list(readings)
    tasks = sorted(next(iter(readings[seeds[0]].values())))
    depth = vit_size(study.size).depth
    # (label, readings key, overrides, teacher run)
    rows = [(name, name, extra, name) for name, extra in study.variants.items()]
    rows += [(f"learning curve, {n} steps", f"curve-{n}", _runs(study)["curve"], "curve") for n in sorted(study.curve_steps)]
    floors = sorted({study.floor_key(e) for e in study.variants.values()})
    lines = [
        "# Stage-1 variants: V-Pixel teachers against random init",
        "",
        f"Produced by `{command}` at commit `{result.get('commit', 'unknown')}`"
        + (f" (this report written at `{git_commit()}`)" if result.get("commit") != git_commit() else "")
        + f"; wall time {sum(result['walls'].values()) / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in result['walls'].items())}).",
        f"Data seeds {', '.join(seeds)}: the embedded moving digits, {study.num_train} train / {study.num_val} val clips "
        f"each. Teachers: `{study.size}`, `{study.config}`'s stage 1 with each variant's overrides; the learning "
        f"curve is the baseline trained for {max(study.curve_steps, default=0)} steps and read at its snapshots. "
        "Floor: a random-init encoder of the same size and token geometry, per seed.",
        "Readouts (docs/yardstick.md): linear (reported) and k-NN, top-1 % on val, mean ± sd over the seeds. "
        "'vs floor': the mean of the per-seed differences ± its standard error (the larger of the seeds' and "
        "the readings' binomial one); 'above' / 'below' when it is more than two standard errors from 0.",
        f"Go / no-go: 'final / constant' is the teacher's final loss (mean of its last 10 logged) over the loss of "
        f"one constant prediction for every masked tubelet (per output dim the median for L1, the mean for MSE, "
        f"fitted on {CONSTANT_BATCHES} of its train batches; with normalised pixels that is the predict-zero loss), "
        f"mean over seeds. A run is trained when it is below {TRAINED_BELOW}; a variant trained on no seed is not a "
        "result about V-Pixel, and its readings are not compared with the floor. The learning curve's rows take its "
        "run's end.",
        "",
        "| variant | overrides | final / constant | trained | "
        + " | ".join(f"{t} linear | {t} k-NN | {t} linear vs floor" for t in tasks) + " |",
        "|---|---|---|---|" + "---|" * (3 * len(tasks)),
    ]
    beats = []
    for label, key, extra, run in rows:
        floor = f"floor:{study.floor_key(extra)}"
        ratio, trained_cell, trained = _go(result, seeds, run)
        cells = []
        for t in tasks:
            versus = _versus(readings, seeds, key, floor, t) if trained else "(not trained)"
            cells += [percent_mean_sd([readings[s][key][t]["top1"] for s in seeds]),
                      percent_mean_sd([readings[s][key][t]["knn_top1"] for s in seeds]), versus]
            if trained and versus.endswith("(above)"):
                beats.append(f"{label}, {t}, last block: {versus}")
        lines.append(f"| {label} | {' '.join(f'`{o}`' for o in extra) or '(none)'} | {ratio} | {trained_cell} | "
                     + " | ".join(cells) + " |")
    for key in floors:
        cells = []
        for t in tasks:
            cells += [percent_mean_sd([readings[s][f"floor:{key}"][t]["top1"] for s in seeds]),
                      percent_mean_sd([readings[s][f"floor:{key}"][t]["knn_top1"] for s in seeds]), ""]
        lines.append(f"| random init ({key}) | | | | " + " | ".join(cells) + " |")
    lines += [
        "", "## Every block", "",
        f"Linear top-1 (%) of the tokens after each block (then the encoder's final norm), mean ± sd over the seeds, "
        f"and vs the floor's same block. Block {depth} is the whole encoder (the table above).", "",
        "| encoder | " + " | ".join(f"{t} block {b}" for t in tasks for b in range(1, depth + 1)) + " |",
        "|---|" + "---|" * (len(tasks) * depth),
    ]
    for label, key, extra, run in rows[:len(study.variants)] + [(f"random init ({f})", f"floor:{f}", None, None) for f in floors]:
        floor = f"floor:{study.floor_key(extra)}" if extra is not None else None
        trained = _go(result, seeds, run)[2] if run is not None else 0
        cells = []
        for t in tasks:
            for b in range(1, depth + 1):
                k, f = (key, floor) if b == depth else (block_name(key, b), floor and block_name(floor, b))
                cell = percent_mean_sd([readings[s][k][t]["top1"] for s in seeds])
                if floor is not None and trained:
                    versus = _versus(readings, seeds, k, f, t)
                    cell += f", {versus}"
                    if b < depth and versus.endswith("(above)"):
                        beats.append(f"{label}, {t}, block {b}: {versus}")
                cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    chance = {t: next(iter(readings[seeds[0]].values()))[t]["chance"] for t in tasks}
    untrained = [label for label, _, _, run in rows[:len(study.variants)] if _go(result, seeds, run)[2] == 0]
    lines += ["", "Chance: " + ", ".join(f"{t} {100 * c:.1f}" for t, c in chance.items()) + ".", "", "## What it says", ""]
    lines.append("- Not trained (final loss at the constant prediction's on every seed): "
                 + (", ".join(untrained) if untrained else "none") + ".")
    lines.append("- Above the floor by more than two standard errors: " + ("; ".join(beats) if beats else
                 "**no trained V-Pixel teacher, at any block, on either task**") + ".")
    text = "\n".join(lines) + "\n"
    old = Path(path).read_text() if Path(path).is_file() else ""
    if EARLIER in old:
        text += "\n" + old[old.index(EARLIER):]
    Path(path).write_text(text)
    return text
