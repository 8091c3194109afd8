"""python -m jobs.launch [SLURM options] JOB -- [the job's arguments]: run a job on SLURM (docs/cluster.md).

JOB: teacher or student (multi-node torchrun), extract-targets (Ray on the allocation), sweep (a SLURM
job per variant, then one that tabulates). The job's arguments are what `python -m jobs.<job>` takes;
its config and overrides are checked here, before anything waits in a queue. The batch script goes to
<run>/slurm/<job>.sbatch (a sweep: <sweep folder>/slurm/), its output to <job>-<job id>.out beside it;
--dry-run writes and prints the script without submitting it.

Inside a training job's script every node runs `python -m jobs.launch node ... -- <torchrun program>`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from jobs.cli import config_from, entry, parser
from experiments.slurm import SlurmConfig, ray_script, run_node, submit, training_script, write_script
from salt.config import ConfigError

JOBS = {"teacher": (), "student": ("store", "out"), "extract-targets": ("teacher", "store", "split")}  # -> extra flags
HELP = {  # experiments/slurm.py: SlurmConfig says more
    "nodes": "nodes (default 1)", "gpus_per_node": "GPUs per node (default 1; 0: a CPU job, gloo)",
    "procs_per_node": "training ranks per node (default: one per GPU)", "cpus_per_node": "CPUs per node (--cpus-per-task)",
    "mem": "--mem per node, e.g. 400G", "time": "--time, e.g. 2-00:00:00", "grace_s": "SIGUSR1 this many s before the time limit (default 90)",
    "sbatch": "another sbatch option, e.g. --sbatch=--dependency=afterok:42", "setup": "a shell line run first, e.g. 'module load cuda'",
    "python": "the interpreter on the nodes (default: this one)",
}


def slurm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", choices=[*JOBS, "sweep"])
    for f in fields(SlurmConfig):  # every SlurmConfig field is a flag; left out: the config's default
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP.get(f.name))
        elif f.type.startswith("list"):
            p.add_argument(flag, action="append", default=None, help=HELP[f.name] + " (repeatable)")
        else:
            p.add_argument(flag, type=int if f.type == "int" else str, default=None, help=HELP.get(f.name, f"--{f.name}"))
    p.add_argument("--dry-run", action="store_true", help="write and print the batch script, do not submit it")
    return p


def main(argv: list[str] | None = None) -> int | None:
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    if ours[:1] == ["node"]:  # one node of a training job, inside its batch script
        p = argparse.ArgumentParser(prog="python -m jobs.launch node")
        p.add_argument("--procs-per-node", type=int, required=True)
        p.add_argument("--shutdown-timeout", type=int, default=30)
        a = p.parse_args(ours[1:])
        sys.exit(run_node(a.procs_per_node, a.shutdown_timeout, theirs))
    a = slurm_parser().parse_args(ours)
    given = {f.name: getattr(a, f.name) for f in fields(SlurmConfig) if getattr(a, f.name) is not None}
    if a.job == "sweep":  # the sweep file's `slurm` section, these flags over it, each variant's over both
        from jobs.sweep import main as sweep

        overrides = [f"slurm.{k}={json.dumps(v)}" for k, v in given.items()]
        return sweep([*theirs, *(["--dry-run"] if a.dry_run else []), "executor=slurm", *overrides])
    try:
        slurm = SlurmConfig(**given)
    except ConfigError as e:
        sys.exit(f"slurm error: {e}")
    p = parser(f"jobs.launch {a.job}: the arguments of python -m jobs.{a.job.replace('-', '_')}")
    for flag in JOBS[a.job]:
        p.add_argument(f"--{flag}")
    theirs = theirs if "--no-progress" in theirs else ["--no-progress", *theirs]  # bars in a log file are noise
    job_args = p.parse_args(theirs)
    config_from(job_args)  # a typo fails now, not after hours in the queue
    name = a.job if a.job != "student" or not job_args.out else f"student-{Path(job_args.out).name}"
    log_dir = Path(job_args.run).resolve() / "slurm"
    render = ray_script if a.job == "extract-targets" else lambda *x, **k: training_script(a.job, *x, **k)
    script = write_script(render(theirs, slurm, name=name, log_dir=log_dir), log_dir / f"{name}.sbatch")
    if a.dry_run:
        print(script.read_text(), end="")
        print(f"wrote {script} (not submitted: sbatch {script})")
        return None
    job_id = submit(script)
    print(f"submitted {a.job} as SLURM job {job_id}: {script}; output: {log_dir / name}-{job_id}.out")
    return job_id


if __name__ == "__main__":
    entry(main)
