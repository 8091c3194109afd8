"""SLURM launcher: each job becomes one batch script in its run folder, then `sbatch` submits it.

The script is the record and the interface: `<run>/slurm/<name>.sbatch` holds every resource and
command (read it, edit it, `sbatch` it again), and the job's output appends to
`<run>/slurm/<name>-<job id>.out` across requeues (same job id, `--open-mode=append`).

Three shapes of job (`SlurmConfig` gives their resources):
- **teacher / student** (`training_script`): one task per node (srun), each a torchrun for that node's
  ranks (`run_node`, behind `python -m jobs.launch node`). Static rendezvous from SLURM's environment:
  MASTER_ADDR is the first host of SLURM_JOB_NODELIST, MASTER_PORT a port of this job's own
  (`PORT`: jobs sharing a node do not collide), the node rank SLURM_NODEID, the node
  count SLURM_JOB_NUM_NODES. NCCL on GPUs; gloo ranks on a CPU job (gpus_per_node=0).
- **extract-targets** (`ray_script`): a Ray head on the first node (the batch node), a Ray worker on
  every other node (one srun), then the extraction driver with RAY_ADDRESS; `pipeline/cluster.py:
  init_ray` waits until SALT_RAY_NODES nodes have joined.
- **a sweep** (experiments/sweep.py, executor slurm): every variant its own student job with its own
  resources, and a last job, after they all succeed, that writes the results table.

Preemption and requeue (the training side is salt/train/preemption.py):
- SLURM preempting the job (PreemptMode=REQUEUE) or `scontrol requeue` sends SIGTERM to every
  process: the ranks finish their step, rank 0 checkpoints, they exit with status 75, and SLURM puts
  the job back in the queue itself; it starts again with the same command and resumes.
- Before the time limit SLURM sends SIGUSR1 to the batch script alone (`--signal=B:USR1@<grace_s>`):
  the script passes it to the ranks (srun forwards it to every process of the step; torchrun is told
  to forward it too), they stop the same way, and the script requeues the job (`scontrol requeue`).
- A run that fails (status other than 0 and 75) is not requeued: it would fail again.
- Extraction has nothing to checkpoint (a committed shard is final): on SIGUSR1 the script requeues
  at once and the rerun skips the committed shards.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from salt.config import ConfigError
from salt.train.preemption import PREEMPTED_EXIT

# a module per job the launcher runs under torchrun or on Ray
TRAINING_JOBS = {"teacher": "jobs.teacher", "student": "jobs.student"}
EXTRACT_JOB = "jobs.extract_targets"
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # torchrun's defaults and SIGUSR1


@dataclass(kw_only=True)
class SlurmConfig:
    """The resources of one SLURM job; every empty value is left to the cluster's defaults."""

    nodes: int = 1
    gpus_per_node: int = 1  # 0: a CPU job (gloo ranks, Ray without GPUs)
    procs_per_node: int = 0  # training ranks per node; 0: one per GPU (one on a CPU job)
    cpus_per_node: int = 0  # CPUs of each node's one task (--cpus-per-task); 0: the cluster's default
    mem: str = ""  # --mem per node, e.g. 400G; "0" asks for all of it
    time: str = ""  # --time, e.g. 2-00:00:00
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclusive: bool = False  # whole nodes
    # SIGUSR1 this many seconds before the time limit (0: none): a step and a checkpoint must fit.
    # Also torchrun's --shutdown-timeout: how long it waits for its ranks after a signal.
    grace_s: int = 90
    requeue: bool = True  # preemption and the time limit put the job back in the queue
    sbatch: list[str] = field(default_factory=list)  # more sbatch options, e.g. ["--reservation=big"]
    setup: list[str] = field(default_factory=list)  # shell lines first, e.g. "module load cuda/12.4"
    python: str = ""  # the interpreter on the nodes; "": the one that submits (a shared venv)

    def __post_init__(self):
        for name in ("nodes", "gpus_per_node", "procs_per_node", "cpus_per_node", "grace_s"):
            if getattr(self, name) < (1 if name == "nodes" else 0):
                raise ConfigError(f"slurm.{name}={getattr(self, name)}: want {'at least 1' if name == 'nodes' else '0 or more'}")

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1


# The port of a job's rendezvous (and Ray head): a function of the job id, so two jobs on one node
# differ and a requeued job (same id) finds its own again; below Linux's ephemeral range (32768-).
PORT = "$((20000 + SLURM_JOB_ID % 10000))"
# Every srun step's one task per node takes all the CPUs the job has there: since SLURM 22.05 srun
# does not inherit the job's --cpus-per-task, and a step of 1 CPU would pin a node's ranks to one core.
SRUN = "srun --cpus-per-task=${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}"


def _sbatch_options(name: str, slurm: SlurmConfig, log_dir: Path, *, dependency: str = "") -> list[str]:
    opts = [f"--job-name=salt-{name}", f"--nodes={slurm.nodes}", "--ntasks-per-node=1"]
    opts += [f"--gpus-per-node={slurm.gpus_per_node}"] if slurm.gpus_per_node else []
    opts += [f"--cpus-per-task={slurm.cpus_per_node}"] if slurm.cpus_per_node else []
    for key in ("mem", "time", "partition", "account", "qos", "constraint"):
        opts += [f"--{key}={getattr(slurm, key)}"] if getattr(slurm, key) else []
    opts += ["--exclusive"] if slurm.exclusive else []
    opts += [f"--signal=B:USR1@{slurm.grace_s}"] if slurm.grace_s else []
    opts += ["--requeue" if slurm.requeue else "--no-requeue", "--open-mode=append"]
    opts += [f"--output={log_dir / name}-%j.out"]
    opts += [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"] if dependency else []
    return opts + list(slurm.sbatch)


def _head(name: str, slurm: SlurmConfig, log_dir: Path, what: str, *, dependency: str = "") -> list[str]:
    lines = ["#!/bin/bash", f"# {what}", "# written by experiments/slurm.py (python -m jobs.launch); sbatch this file to submit it again"]
    lines += [f"#SBATCH {o}" for o in _sbatch_options(name, slurm, log_dir, dependency=dependency)]
    lines += ["set -uo pipefail", f"cd {shlex.quote(os.getcwd())}", *slurm.setup]
    lines += ['echo "salt: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, $(date \'+%F %T\')"']
    return lines


def _python(slurm: SlurmConfig) -> str:
    return shlex.quote(slurm.python or sys.executable)


def _quote(args: list[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


# The batch script's last lines for a training job: run the step in the background (a trapped
# signal ends `wait`, not the step), pass SIGUSR1 on, requeue after a checkpoint on the time limit.
_WAIT_AND_REQUEUE = """\
# Preemption (docs/cluster.md). SLURM preempting or requeueing the job sends SIGTERM to every process:
# the ranks finish their step, rank 0 checkpoints, all exit 75 and SLURM requeues the job. Before the
# time limit only this script gets SIGUSR1: it passes it to the ranks, which stop the same way, and
# requeues the job itself. The requeued job runs this script again and resumes from the checkpoint.
term=0 step=""
trap 'term=1; echo "salt: SIGTERM: the ranks finish their step and checkpoint"' TERM
trap 'echo "salt: SIGUSR1 (time limit near): the ranks finish their step and checkpoint"; [ -z "$step" ] || kill -USR1 $step' USR1
{command} &
step=$!
while kill -0 $step 2>/dev/null; do wait $step; done
wait $step; status=$?
{requeue}echo "salt: job $SLURM_JOB_ID exits with status $status, $(date '+%F %T')"
exit $status
"""
_REQUEUE = """\
if [ $status = {preempted} ] && [ $term = 0 ]; then
    echo "salt: preempted (exit {preempted}): requeueing job $SLURM_JOB_ID, it resumes from the checkpoint"
    scontrol requeue $SLURM_JOB_ID
fi
"""


def training_script(job: str, args: list[str], slurm: SlurmConfig, *, name: str, log_dir: Path) -> str:
    """The batch script of a teacher or student run on slurm.nodes nodes: srun, one task per node,
    each `python -m jobs.launch node` (a torchrun of ranks_per_node ranks); `args`: the job's own."""
    if job not in TRAINING_JOBS:
        raise ValueError(f"{job!r} is not a training job ({', '.join(TRAINING_JOBS)})")
    where = f"{slurm.gpus_per_node} GPUs" if slurm.gpus_per_node else "CPUs, gloo"
    lines = _head(name, slurm, log_dir, f"{job}: {slurm.nodes} node(s) x {slurm.ranks_per_node} ranks ({where})")
    lines += [
        "# rendezvous: the first node hosts it, on a port of this job's own (experiments/slurm.py: PORT)",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT={PORT}",
    ]
    node = [f"--procs-per-node={slurm.ranks_per_node}", f"--shutdown-timeout={slurm.grace_s or 30}"]
    command = (f"{SRUN} --kill-on-bad-exit=1 {_python(slurm)} -m jobs.launch node {_quote(node)} -- "
               f"-m {TRAINING_JOBS[job]} -- {_quote(args)}")
    requeue = _REQUEUE.format(preempted=PREEMPTED_EXIT) if slurm.requeue else ""
    return "\n".join(lines) + "\n" + _WAIT_AND_REQUEUE.format(command=command, requeue=requeue)


def ray_script(args: list[str], slurm: SlurmConfig, *, name: str, log_dir: Path) -> str:
    """The batch script of extract-targets: a Ray cluster on the allocation, then the driver."""
    py = _python(slurm)
    lines = _head(name, slurm, log_dir, f"extract-targets: Ray on {slurm.nodes} node(s) x {slurm.gpus_per_node} GPUs")
    lines += [
        "# Preemption: SIGTERM ends everything and SLURM requeues the job; before the time limit (SIGUSR1)",
        "# the script requeues it. Either way the rerun skips the shards already committed.",
        "trap 'echo \"salt: SIGTERM: stopping; committed shards stay\"' TERM",
        "trap 'echo \"salt: SIGUSR1 (time limit near): requeueing job $SLURM_JOB_ID\"; scontrol requeue $SLURM_JOB_ID' USR1",
        "# Ray: the head on this (the first) node, a worker on every other node, each its node's CPUs and GPUs;",
        "# a temp dir of the job's own, so a later ray.init() on these nodes does not find this cluster",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "head_ip=$(hostname --ip-address | awk '{print $1}')",
        f"port={PORT}",
        "export RAY_ADDRESS=$head_ip:$port SALT_RAY_NODES=$SLURM_JOB_NUM_NODES",
        "# token authentication with a token of this job's own, in the environment srun passes on (never logged)",
        "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \\n')",
        f"ray=({py} -m ray.scripts.scripts start --block --disable-usage-stats --num-cpus=${{SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}} "
        f"--num-gpus={slurm.gpus_per_node} --dashboard-agent-listen-port=$((port + 2)) --temp-dir=/tmp/ray-$SLURM_JOB_ID)",
        f'{SRUN} --nodes=1 --ntasks=1 -w "$head" "${{ray[@]}}" --head --node-ip-address=$head_ip --port=$port '
        "--ray-client-server-port=$((port + 1)) --include-dashboard=false &",
        "ray_steps=$!",
        "for _ in $(seq 120); do  # until the head answers (or its step has ended)",
        "    (exec 3<>/dev/tcp/$head_ip/$port) 2>/dev/null && break",
        "    kill -0 $ray_steps 2>/dev/null || break",
        "    sleep 1",
        "done",
        'kill -0 $ray_steps 2>/dev/null || { echo "salt: the Ray head did not start (its lines above)"; exit 1; }',
        "if [ $SLURM_JOB_NUM_NODES -gt 1 ]; then",
        f'    {SRUN} --nodes=$((SLURM_JOB_NUM_NODES - 1)) --ntasks=$((SLURM_JOB_NUM_NODES - 1)) --exclude="$head" '
        '"${ray[@]}" --address=$RAY_ADDRESS &',
        '    ray_steps="$ray_steps $!"',
        "fi",
        f"{py} -m {EXTRACT_JOB} {_quote(args)} &",
        "step=$!",
        "while kill -0 $step 2>/dev/null; do wait $step; done",
        "wait $step; status=$?",
        'echo "salt: extraction ended ($status); stopping Ray"',
        "kill $ray_steps 2>/dev/null; wait",
        'echo "salt: job $SLURM_JOB_ID exits with status $status, $(date \'+%F %T\')"',
        "exit $status",
    ]
    return "\n".join(lines) + "\n"


def command_script(command: list[str], slurm: SlurmConfig, *, name: str, log_dir: Path, what: str, dependency: str = "") -> str:
    """A batch script that runs one command on the batch node (a sweep's results, after its variants)."""
    lines = _head(name, slurm, log_dir, what, dependency=dependency)
    return "\n".join([*lines, f"{_python(slurm)} {_quote(command)}"]) + "\n"


def write_script(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def submit(script: Path) -> int:
    """sbatch the script; its job id. A refusal (no such partition, too many GPUs) is one line."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise OSError("sbatch is not on PATH: submit from a SLURM login node (or use --dry-run to write the script)") from None
    if proc.returncode != 0:
        said = "; ".join((proc.stderr.strip() or proc.stdout.strip()).splitlines())
        raise OSError(f"sbatch refused {script}: {said}")
    return int(proc.stdout.strip().split(";")[0])


def torchrun_args(procs_per_node: int, shutdown_timeout: int, program: list[str], env: dict[str, str]) -> list[str]:
    """torchrun's arguments on this node of a SLURM job: static rendezvous at MASTER_ADDR:MASTER_PORT,
    node rank SLURM_NODEID of SLURM_JOB_NUM_NODES; SIGUSR1 forwarded to the ranks like SIGTERM."""
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NUM_NODES", "SLURM_NODEID") if k not in env]
    if missing:
        raise OSError(f"jobs.launch node runs inside a SLURM job script (experiments/slurm.py); {', '.join(missing)} not set")
    return [
        f"--nnodes={env['SLURM_JOB_NUM_NODES']}", f"--node-rank={env['SLURM_NODEID']}",
        f"--nproc-per-node={procs_per_node}", f"--master-addr={env['MASTER_ADDR']}", f"--master-port={env['MASTER_PORT']}",
        f"--signals-to-handle={FORWARDED_SIGNALS}", f"--shutdown-timeout={shutdown_timeout}", *program,
    ]


def run_node(procs_per_node: int, shutdown_timeout: int, program: list[str]) -> int:
    """This node's torchrun; its exit status. A preemption signal (torchrun forwards it to the ranks,
    which checkpoint) ends in 75 and one line, not torchrun's traceback; a failed rank in its report."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args = torchrun_args(procs_per_node, shutdown_timeout, program, dict(os.environ))
    node = os.environ["SLURM_NODEID"]
    print(f"salt: node {node}: torchrun {' '.join(args)}", flush=True)
    try:
        torchrun(args)
    except SignalException as e:
        print(f"salt: node {node}: {e.sigval.name}: the ranks checkpoint and stop (exit {PREEMPTED_EXIT})", flush=True)
        return PREEMPTED_EXIT
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if codes == {PREEMPTED_EXIT}:  # the ranks were signalled, torchrun was not: they checkpointed
            print(f"salt: node {node}: the ranks stopped after a preemption checkpoint (exit {PREEMPTED_EXIT})", flush=True)
            return PREEMPTED_EXIT
        print(f"salt: node {node}: {e.format_msg()}", file=sys.stderr, flush=True)
        return next(iter(sorted(c for c in codes if c > 0)), 1)
    return 0
