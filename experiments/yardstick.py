"""The yardstick study (`make yardstick`): does a probe reading belong to the encoder, and do the
embedded tasks tell a trained encoder from an untrained one?

Per data seed (the embedded dataset generated anew with that seed; the seed also sets every
initialisation): a random-init encoder of the label encoders' size, one encoder of that size
trained with each task's labels (that task's only, and read on that task), and, on the first data
seed, a V-Pixel teacher (the method's stage 1) with a random-init encoder of its own size. Every
readout reads them (docs/yardstick.md); the attentive probe is repeated over probe seeds. The
report gives, per encoder and task, mean +- sd over probe seeds, and per task the label encoder's
margin over random init, mean +- sd over data seeds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from experiments.controls import train_label_teachers
from experiments.probing import probe_encoders
from experiments.pool import Phases, vpixel_teacher
from experiments.stats import percent_mean_sd
from salt.config import Config, from_dict, load_config, to_dict
from salt.runinfo import git_commit

READOUTS = {"linear": lambda r: r["top1"], "k-NN": lambda r: r["knn_top1"], "attentive": lambda r: r["attentive"]["top1"]}


@dataclasses.dataclass(kw_only=True)
class Yardstick:
    config: str = "jobs/configs/tiny.yaml"
    data_seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    probe_seeds: int = 5  # attentive probe seeds on the first data seed
    later_probe_seeds: int = 1  # and on the others (its spread is measured on the first)
    label_size: str = "vit_cpu_xs"
    # steps x batch of the label encoders, per task: the digit takes longer to learn than the direction
    label_steps: dict[str, int] = dataclasses.field(default_factory=lambda: {"appearance": 2000, "motion": 1000})
    label_batch: int = 32
    vpixel_size: str = "vit_cpu_s"
    num_train: int = 2000
    num_val: int = 1200
    workers: int = 2
    overrides: list[str] = dataclasses.field(default_factory=list)

    def seed_config(self, seed: int, *, probe_seeds: int) -> Config:
        return load_config(self.config, [
            *self.overrides, f"probe.seeds={probe_seeds}",
            f"teacher.seed={seed}", f"probe.seed={seed}", f"data.seed={seed}", f"model.teacher={self.vpixel_size}",
        ])


def _label_encoder(cfg_dict: dict, data: str, out: str, size: str, task: str, steps: int, batch: int, seed: int) -> str:
    folders = train_label_teachers(from_dict(Config, cfg_dict), data, out, size=size, steps=[steps], seed=seed,
                                   tasks=[task], batch_size=batch, progress=False)
    return folders[steps]


def _read_seed(label_size: str, cfg_dict: dict, data: str, out: str, label_encoders: dict[str, str],
               vpixel_size: str | None) -> dict[str, dict]:
    """Every readout of one data seed's encoders (in a pool worker): name -> task -> reading. A label
    encoder is read on its own task only; `vpixel_size`: this seed also reads the V-Pixel teacher and a
    random init of its size."""
    cfg, out = from_dict(Config, cfg_dict), Path(out)
    specs = {f"random-{label_size}": f"random:{label_size}"} | label_encoders
    if vpixel_size:
        specs |= {"vpixel": str(out / "vpixel"), f"random-{vpixel_size}": f"random:{vpixel_size}"}
    # one pass over the clips extracts every encoder's features (experiments/probing.py)
    tasks = {name: [name.removeprefix("labels-")] if name in label_encoders else None for name in specs}
    return probe_encoders(specs, cfg, data, out / "probe", tasks=tasks, progress=False)


def run_yardstick(study: Yardstick, *, out: str | Path, progress: bool = True) -> dict:
    out = Path(out)
    with Phases("yardstick", study.workers, progress) as phases:
        first = study.data_seeds[0]
        cfgs = {s: study.seed_config(s, probe_seeds=study.probe_seeds if s == first else study.later_probe_seeds)
                for s in study.data_seeds}
        data = {s: str(out / f"seed-{s}" / "data") for s in study.data_seeds}

        phases.write_data(data, study.num_train, study.num_val)
        jobs = {f"{s}/labels-{task}": (_label_encoder, to_dict(cfgs[s]), data[s], str(out / f"seed-{s}" / f"labels-{task}"),
                                       study.label_size, task, steps, study.label_batch, s)
                for s in study.data_seeds for task, steps in study.label_steps.items()}
        jobs[f"{first}/vpixel"] = (vpixel_teacher, to_dict(cfgs[first]), study.vpixel_size, data[first],
                                   str(out / f"seed-{first}" / "vpixel"))
        trained = phases.run("encoders", jobs)
        readings = phases.run("probes", {
            str(s): (_read_seed, study.label_size, to_dict(cfgs[s]), data[s], str(out / f"seed-{s}"),
                     {f"labels-{task}": trained[f"{s}/labels-{task}"] for task in study.label_steps},
                     study.vpixel_size if s == first else None)
            for s in study.data_seeds
        })
    result = {"study": dataclasses.asdict(study), "config": to_dict(dataclasses.replace(cfgs[first], probe=cfgs[first].probe.resolved())), "readings": readings,
              "walls": phases.rounded()}
    (out / "yardstick.json").write_text(json.dumps(result, indent=1))
    return result


def write_report(result: dict, path: str | Path, *, command: str) -> str:
    study, readings = result["study"], result["readings"]
    first, tasks = str(study["data_seeds"][0]), list(study["label_steps"])
    probe = result["config"]["probe"]
    lines = [
        "# The yardstick",
        "",
        f"Produced by `{command}` at commit `{git_commit()}`; wall time {sum(result['walls'].values()) / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in result['walls'].items())}).",
        f"Data: the embedded moving digits, {study['num_train']} train / {study['num_val']} val clips per data seed "
        f"(seeds {', '.join(map(str, study['data_seeds']))}). Label encoders: `{study['label_size']}` trained with one "
        f"task's labels ({', '.join(f'{t} {n} steps' for t, n in study['label_steps'].items())}, batch "
        f"{study['label_batch']}). V-Pixel teacher: `{study['vpixel_size']}`, the config's stage 1.",
        f"Attentive probe: depth {probe['depth']}, {probe['epochs']} epochs, batch {probe['batch_size']}, heads lr "
        f"{probe['lrs']} x wd {probe['wds']}, tokens `{probe['norm']}`, heads chosen on "
        f"{probe['select_fraction']:.0%} of the train clips, top-1 on val. k-NN: k={probe['knn_k']}, "
        f"T={probe['knn_temperature']}; linear: l2 from {probe['linear_l2s']} chosen on the same held-out clips.",
        "",
        f"## Spread over probe seeds (data seed {first}, {study['probe_seeds']} probe seeds), top-1 %",
        "",
        "| encoder | task | linear (reported) | k-NN | attentive, mean ± sd | attentive per probe seed |",
        "|---|---|---|---|---|---|",
    ]
    for name, tasks_read in readings[first].items():
        for task, r in tasks_read.items():
            a = r["attentive"]
            lines.append(f"| {name} | {task} | {100 * r['top1']:.1f} | {100 * r['knn_top1']:.1f} | {percent_mean_sd(a['per_seed'])} | "
                         f"{', '.join(f'{100 * x:.1f}' for x in a['per_seed'])} |")
    random_name = f"random-{study['label_size']}"
    lines += ["", "## Label-trained vs random init of the same size, over data seeds, top-1 %", "",
              f"Attentive: the mean over probe seeds ({study['probe_seeds']} on data seed {first}, "
              f"{study['later_probe_seeds']} on the others).", "",
              "| task | readout | label-trained | random init | margin (mean ± sd) | chance |", "|---|---|---|---|---|---|"]
    for task in tasks:
        for readout, value in READOUTS.items():
            label = [value(readings[s][f"labels-{task}"][task]) for s in readings]
            floor = [value(readings[s][random_name][task]) for s in readings]
            margin = [a - b for a, b in zip(label, floor)]
            chance = readings[first][random_name][task]["chance"]
            lines.append(f"| {task} | {readout} | {percent_mean_sd(label)} | {percent_mean_sd(floor)} | {percent_mean_sd(margin)} | "
                         f"{100 * chance:.1f} |")
    vpixel, random_same = readings[first]["vpixel"], readings[first][f"random-{study['vpixel_size']}"]
    lines += ["", f"## V-Pixel teacher vs random init of its size (`{study['vpixel_size']}`, data seed {first}), "
              "linear readout, top-1 %", "", "| task | V-Pixel | random init | difference | 2 SE of the difference |",
              "|---|---|---|---|---|"]
    for task in vpixel:
        a, b = vpixel[task], random_same[task]
        lines.append(f"| {task} | {100 * a['top1']:.1f} | {100 * b['top1']:.1f} | {100 * (a['top1'] - b['top1']):+.1f} | "
                     f"{200 * (a['binomial_se'] ** 2 + b['binomial_se'] ** 2) ** 0.5:.1f} |")
    se = max(r["binomial_se"] for enc in readings[first].values() for r in enc.values())
    lines += ["", f"One reading's binomial standard error on val is at most {100 * se:.2f} points."]
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    return text
