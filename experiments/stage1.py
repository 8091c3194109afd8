"""The stage-1 variants study (`make stage1-variants`): does any V-Pixel teacher here read better than
a random init of its size, and which recipe choices matter?

Per data seed (the embedded dataset generated anew with that seed; the seed also sets every
initialisation and sample): one V-Pixel teacher per variant (a list of config overrides on the tiny
config's stage 1), a learning curve (the baseline trained longer, read at its snapshots), and a
random-init encoder per token geometry (the floor). Every encoder is read by the linear readout and
k-NN on both tasks (docs/yardstick.md). The report gives, per variant and task, mean +- sd over seeds
and the per-seed difference from the floor with its standard error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from experiments.pool import Phases, vpixel_teacher, write_data
from experiments.probing import load_probe_data, probe_encoder
from experiments.selection import checkpoint_points
from experiments.stats import percent_mean_sd
from salt.config import Config, from_dict, load_config, to_dict
from salt.runinfo import git_commit, write_run_info

# name -> overrides of the config's stage 1. The reference points: the tiny config's recipe (raw pixels,
# L1, V-JEPA multi-block masks, 8 px patches) and VideoMAE's (per-tubelet normalised pixels, random tubes
# over ~90% of the positions: 36 draws of one of the 4x4 positions cover 1 - (15/16)^36 = 90% of them)
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "normalised pixels": ["model.pixel_norm=true"],
    "MSE": ["model.pixel_loss=mse"],
    "temporal masks (half the clip, 3-4 of 4 rows and columns)": [
        "masking.generators=[{num_blocks: 1, spatial_scale: 1.0, temporal_scale: 0.5}]"],
    "VideoMAE (normalised pixels, 90% tubes)": [
        "model.pixel_norm=true", "masking.generators=[{num_blocks: 36, spatial_scale: 0.0625}]"],
    "4 px patches": ["model.patch_size=4"],
}
GEOMETRY = ("model.patch_size", "model.tubelet")  # overrides that change the tokens, so the floor too


@dataclasses.dataclass(kw_only=True)
class Stage1Study:
    config: str = "jobs/configs/tiny.yaml"
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    size: str = "vit_cpu_xs"
    variants: dict[str, list[str]] = dataclasses.field(default_factory=lambda: dict(VARIANTS))
    # the baseline trained for curve_steps[-1] steps and read at each of curve_steps (its lr schedule
    # spans the longest run, so its first point is not the baseline variant)
    curve_steps: list[int] = dataclasses.field(default_factory=lambda: [400, 800, 1600])
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
    """Every teacher run of a seed: name -> overrides."""
    runs = {name: list(extra) for name, extra in study.variants.items()}
    if study.curve_steps:
        longest, every = max(study.curve_steps), min(study.curve_steps)
        runs["curve"] = [f"teacher.optim.steps={longest}", f"teacher.snapshot_every={every}"]
    return runs


def _read_seed(study_dict: dict, seed: int, data: str, out: str) -> dict[str, dict]:
    """Reads every teacher of one seed and its floors: name -> task -> readings."""
    study = Stage1Study(**study_dict)
    out = Path(out)
    loaded = load_probe_data(study.seed_config(seed), data, progress=False)
    specs: dict[str, tuple[str, Config]] = {}
    for name, extra in _runs(study).items():
        cfg = study.seed_config(seed, extra)
        if name == "curve":
            for p in checkpoint_points(out / "curve", "curve"):
                if p["step"] in study.curve_steps:
                    specs[f"curve-{p['step']}"] = (p["spec"], cfg)
        else:
            specs[name] = (str(out / _folder(name)), cfg)
        specs.setdefault(f"floor:{study.floor_key(extra)}", (f"random:{study.size}", cfg))
    return {name: probe_encoder(spec, cfg, loaded, out / "probe" / _folder(name), data=data, progress=False)
            for name, (spec, cfg) in specs.items()}


def _folder(name: str) -> str:
    """A variant's folder name: its words joined by single dashes."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def run_stage1_study(study: Stage1Study, *, out: str | Path, progress: bool = True) -> dict:
    out = Path(out)
    with Phases("stage1-variants", study.workers, progress) as phases:
        phase = phases.run
        roots = {s: out / f"seed-{s}" for s in study.seeds}
        data = {s: str(root / "data") for s, root in roots.items()}

        phase("data", {str(s): (write_data, data[s], s, study.num_train, study.num_val)
                       for s in study.seeds if not Path(data[s], "labels.json").is_file()})
        teachers = phase("teachers", {
            f"{s}/{name}": (vpixel_teacher, to_dict(study.seed_config(s, extra)), study.size, data[s], str(roots[s] / _folder(name)))
            for name, extra in _runs(study).items() for s in study.seeds
        })
        readings = phase("readouts", {str(s): (_read_seed, dataclasses.asdict(study), s, data[s], str(roots[s]))
                                      for s in study.seeds})
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


def write_report(result: dict, path: str | Path, *, command: str) -> str:
    study = Stage1Study(**result["study"])
    readings = result["readings"]
    seeds = list(readings)
    tasks = sorted(next(iter(readings[seeds[0]].values())))
    rows = [(name, name, extra) for name, extra in study.variants.items()]
    rows += [(f"learning curve, {n} steps", f"curve-{n}", _runs(study)["curve"]) for n in sorted(study.curve_steps)]
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
        "",
        "| variant | overrides | " + " | ".join(f"{t} linear | {t} k-NN | {t} linear vs floor" for t in tasks)
        + " | final pixel loss |",
        "|---|---|" + "---|" * (3 * len(tasks) + 1),
    ]
    for label, key, extra in rows:
        floor = f"floor:{study.floor_key(extra)}"
        cells = []
        for t in tasks:
            lin = [readings[s][key][t]["top1"] for s in seeds]
            cells += [percent_mean_sd(lin), percent_mean_sd([readings[s][key][t]["knn_top1"] for s in seeds]),
                      _versus_floor([x - readings[s][floor][t]["top1"] for x, s in zip(lin, seeds)],
                                    [math.hypot(readings[s][key][t]["binomial_se"], readings[s][floor][t]["binomial_se"])
                                     for s in seeds])]
        losses = [result["teachers"][f"{s}/{key}"]["final_loss"] for s in seeds] if key in study.variants else []
        loss = f"{statistics.fmean(losses):.4f}" if losses else ""
        lines.append(f"| {label} | {' '.join(f'`{o}`' for o in extra) or '(none)'} | " + " | ".join(cells) + f" | {loss} |")
    for key in sorted({f"floor:{study.floor_key(e)}" for e in study.variants.values()}):
        cells = []
        for t in tasks:
            cells += [percent_mean_sd([readings[s][key][t]["top1"] for s in seeds]),
                      percent_mean_sd([readings[s][key][t]["knn_top1"] for s in seeds]), ""]
        lines.append(f"| random init ({key.removeprefix('floor:')}) | | " + " | ".join(cells) + " | |")
    chance = {t: next(iter(readings[seeds[0]].values()))[t]["chance"] for t in tasks}
    lines += ["", "Chance: " + ", ".join(f"{t} {100 * c:.1f}" for t, c in chance.items()) + "."]
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    return text
