"""The SLURM launcher (experiments/slurm.py, jobs/launch.py): its batch scripts, and a 2-rank gloo
student on a real SLURM (`.ci/slurm-setup.sh` starts a one-host cluster; where sbatch is missing or
no node is up, that test is skipped and counted) requeued mid-run and resuming to the same losses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from experiments.slurm import SlurmConfig, ray_script, torchrun_args, training_script
from experiments.sweep import load_sweep, run_sweep
from jobs.launch import main as launch
from salt.config import ConfigError
from tests.conftest import FAST, ROOT, TINY


def bash_syntax_ok(script: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_training_script_asks_for_its_nodes_and_rendezvous_from_slurms_environment(tmp_path) -> None:
    slurm = SlurmConfig(nodes=8, gpus_per_node=8, cpus_per_node=96, time="2-00:00:00", partition="gpu", sbatch=["--reservation=big"],
                        setup=["module load cuda/12.4"])
    script = training_script("student", ["--run", "runs/vitl", "student.optim.lr=1e-3"], slurm, name="student", log_dir=tmp_path)
    bash_syntax_ok(script)
    options = [l.removeprefix("#SBATCH ") for l in script.splitlines() if l.startswith("#SBATCH")]
    assert options == ["--job-name=salt-student", "--nodes=8", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=96",
                       "--time=2-00:00:00", "--partition=gpu", "--signal=B:USR1@90", "--requeue", "--open-mode=append",
                       f"--output={tmp_path}/student-%j.out", "--reservation=big"]
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "module load cuda/12.4" in script
    assert "jobs.launch node --procs-per-node=8 --shutdown-timeout=90 -- -m jobs.student -- --run runs/vitl student.optim.lr=1e-3" in script
    env = {"MASTER_ADDR": "gpu001", "MASTER_PORT": "20042", "SLURM_JOB_NUM_NODES": "8", "SLURM_NODEID": "3"}
    assert torchrun_args(8, 90, ["-m", "jobs.student"], env) == [
        "--nnodes=8", "--node-rank=3", "--nproc-per-node=8", "--master-addr=gpu001", "--master-port=20042",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=90", "-m", "jobs.student"]
    with pytest.raises(OSError, match="inside a SLURM job script.*SLURM_NODEID not set"):
        torchrun_args(8, 90, [], {k: v for k, v in env.items() if k != "SLURM_NODEID"})
    ray = ray_script(["--run", "r"], slurm, name="extract-targets", log_dir=tmp_path)
    bash_syntax_ok(ray)
    assert "--head --node-ip-address=$head_ip --port=$port" in ray and '--exclude="$head"' in ray and "jobs.extract_targets --run r" in ray


def test_the_launcher_checks_the_config_before_it_submits(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit, match=r"config error: unknown key config.student.optim.lrr"):
        launch(["--dry-run", "student", "--", "--run", str(tmp_path), "student.optim.lrr=1"])
    with pytest.raises(SystemExit, match=r"slurm error: slurm.nodes=0: want at least 1"):
        launch(["--nodes", "0", "--dry-run", "student", "--", "--run", str(tmp_path)])
    assert not (tmp_path / "slurm").exists()
    launch(["--gpus-per-node", "0", "--procs-per-node", "2", "--dry-run", "teacher", "--", "--run", str(tmp_path)])
    script = (tmp_path / "slurm" / "teacher.sbatch").read_text()
    assert "--gpus-per-node" not in script and "--procs-per-node=2" in script and "-m jobs.teacher -- --no-progress --run" in script


def test_a_slurm_sweep_gives_each_variant_its_own_resources(tmp_path, capsys) -> None:
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "base": str(Path(ROOT) / TINY), "executor": "slurm", "slurm": {"gpus_per_node": 8, "time": "4:00:00"},
        "variants": [{"name": "small"}, {"name": "big", "overrides": ["student.optim.lr=3e-3"], "slurm": {"nodes": 4}}]}))
    # the launcher's flags go over the sweep file's section, a variant's own keys over both
    launch(["--partition", "gpu", "--nodes", "2", "--dry-run", "sweep", "--", "--config", str(sweep_file),
            "--store", "s", "--out", str(tmp_path / "out")])
    slurm_dir = tmp_path / "out" / "slurm"
    small, big, results = ((slurm_dir / f"{n}.sbatch").read_text() for n in ("small", "big", "results"))
    for script in (small, big, results):
        bash_syntax_ok(script)
        assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=4:00:00" in script
    assert "#SBATCH --nodes=2" in small and "#SBATCH --nodes=4" in big and "#SBATCH --gpus-per-node=8" in big
    assert f"--config {slurm_dir}/big.yaml" in big and f"--out {tmp_path}/out/big" in big
    assert yaml.safe_load((slurm_dir / "big.yaml").read_text())["student"]["optim"]["lr"] == 3e-3  # resolved, then queued
    assert "#SBATCH --nodes=1" in results and "#SBATCH --gpus-per-node=1" in results and "executor=local" in results
    with pytest.raises(ConfigError, match=r"unknown key sweep.variants\[1\].slurm.gpus \(known: "):
        sweep_file.write_text(sweep_file.read_text().replace("nodes: 4", "gpus: 4"))
        load_sweep(sweep_file)


def test_a_driver_on_a_slurm_allocation_waits_for_its_ray_nodes_and_a_local_ray_takes_its_cpus(ray_local, monkeypatch) -> None:
    from pipeline.cluster import local_cpus, wait_for_nodes

    wait_for_nodes(1)  # the session's local Ray: one node, there already
    with pytest.raises(OSError, match=r"only 1 of SALT_RAY_NODES=2 Ray nodes joined within 1 s"):
        wait_for_nodes(2, timeout_s=1)
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "3")  # inside a SLURM job: its allocation, not the machine
    assert local_cpus() == 3


def slurm_up() -> str:
    """'' where a SLURM node is up to run jobs here, else why not."""
    if not (shutil.which("sbatch") and shutil.which("squeue")):
        return "no sbatch/squeue on PATH (.ci/slurm-setup.sh installs a one-host SLURM as root)"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T %c"], capture_output=True, text=True)
    nodes = [line.split() for line in proc.stdout.splitlines()]
    if proc.returncode or not any(s in ("idle", "mixed", "allocated", "completing") and int(c) >= 2 for s, c in nodes):
        return f"no SLURM node with 2 CPUs up (sinfo: {(proc.stdout + proc.stderr).strip() or 'nothing'})"
    return ""


def job_info(job: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_for(what: str, ok, timeout: float, job: int, log: Path) -> None:
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout} s; job {job_info(job).get('JobState')}; log:\n"
                                 + (log.read_text()[-3000:] if log.is_file() else "none"))
        time.sleep(0.5)


def logged_steps(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(l) for l in text.split("\n")[:-1]]  # whole lines: the run may be writing the last


@pytest.mark.skipif(bool(slurm_up()), reason=slurm_up() or "SLURM is up")
def test_a_slurm_student_requeued_twice_resumes_to_the_losses_of_an_uninterrupted_run(store_fp32, digits, tmp_path) -> None:
    """2 gloo ranks through jobs.launch. `scontrol requeue` (SIGTERM to every process, as a preemption)
    and, after the restart, SIGUSR1 to the batch script (what --signal=B:USR1@90 sends before the time
    limit): each time the ranks finish their step, checkpoint and exit 75, and the job comes back. No
    periodic checkpoint, so each resume starts from the signal's. A sweep then reads the run, trained at
    world size 2, from one process."""
    steps = 16
    args = ["--data", digits, "--store", store_fp32, *FAST, f"student.optim.steps={steps}", "student.checkpoint_every=1000"]
    out = tmp_path / "sweep" / "base"
    job = launch(["--gpus-per-node", "0", "--procs-per-node", "2", "--cpus-per-node", "2", "--grace-s", "20",
                  "student", "--", "--run", str(tmp_path), "--out", str(out), *args])
    log = tmp_path / "slurm" / f"student-base-{job}.out"
    reference = subprocess.Popen(  # the same run, uninterrupted, beside it
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "jobs.student", "--",
         "--no-progress", "--run", str(tmp_path / "ref"), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for("step 4", lambda: len(logged_steps(out)) >= 4, 120, job, log)
        subprocess.run(["scontrol", "requeue", str(job)], check=True)
        wait_for("the restart's step 9", lambda: job_info(job).get("Restarts") == "1" and len(logged_steps(out)) >= 9, 120, job, log)
        subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True)
        wait_for("the end", lambda: job_info(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 150, job, log)
        ref_out, _ = reference.communicate(timeout=120)
    finally:
        subprocess.run(["scancel", str(job)], capture_output=True)
        reference.kill()
    text = log.read_text()
    info = job_info(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), text[-3000:]
    assert reference.returncode == 0, ref_out[-3000:]
    assert text.count("(exit 75)") >= 2 and "salt: preempted (exit 75): requeueing job" in text  # the USR1 path requeued itself
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == steps and summary["steps_run"] < steps - 8  # resumed from the second signal's checkpoint
    resumed, whole = logged_steps(out), logged_steps(tmp_path / "ref" / "student")
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole]
    # a sweep over it, in one process: the run is read, not resumed on another world size
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"base": str(Path(ROOT) / TINY), "overrides": [*FAST, f"student.optim.steps={steps}"],
                                          "tensorboard": False, "variants": [{"name": "base"}]}))
    rows = run_sweep(load_sweep(sweep_file), data=digits, store=store_fp32, out=tmp_path / "sweep", progress=False)
    assert rows[0]["steps"] == steps and rows[0]["final_loss"] == round(summary["final_loss"], 4)
