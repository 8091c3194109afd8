"""Jobs from the command line: expected bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(
    "argv, says",
    [
        (["jobs.teacher", "--data", "/nonexistent"], "/nonexistent"),
        (["jobs.extract_targets", "--teacher", "hf-videomae:some-org/some-model"], "looks like a hub name"),
        (["jobs.student", "--store", "/nonexistent/store"], "/nonexistent/store is not a target store"),
    ],
)
def test_bad_input_ends_in_one_line(argv, says, digits, tmp_path):
    data = [] if "--data" in argv else ["--data", digits]
    done = subprocess.run([sys.executable, "-m", *argv, *data, "--run", str(tmp_path / "run")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr[-2000:]


JOBS = ["bench", "data", "demo", "export", "extract_targets", "gpu_check", "inspect_store", "plan", "probe", "replicate",
        "select", "stage1_variants", "student", "sweep", "teacher", "yardstick"]
STUDIES = ("replicate", "stage1_variants", "yardstick")  # their own --run, and no --data (jobs/cli.py: study_parser)


@pytest.mark.parametrize("job", JOBS)
def test_every_job_reads_the_common_flags_through_one_parser(job, monkeypatch):
    """Same names and defaults everywhere (jobs/cli.py); a flag a job has no use for is refused."""
    import importlib

    from jobs import cli

    seen = {}
    real = cli.parser

    def spy(*args, **kwargs):
        seen["parser"] = p = real(*args, **kwargs)
        monkeypatch.setattr(p, "parse_args", lambda argv=None: (_ for _ in ()).throw(SystemExit("parsed")))
        return p

    module = importlib.import_module(f"jobs.{job}")
    monkeypatch.setattr(cli, "parser", spy)  # what study_parser builds on
    if hasattr(module, "parser"):
        monkeypatch.setattr(module, "parser", spy)
    with pytest.raises(SystemExit, match="parsed"):
        module.main(["--help"])
    flags = {a.dest: a.default for a in seen["parser"]._actions}
    if "data" in flags:
        assert flags["data"] == cli.DEFAULT_DATA
    if "run" in flags and job not in ("bench", *STUDIES):
        assert flags["run"] == cli.DEFAULT_RUN
    if job in STUDIES:
        assert "data" not in flags and flags["report"].endswith(".md")
    assert "no_progress" in flags
    assert ("overrides" in flags) == (job not in ("data", "inspect_store", "export"))


def test_a_sweep_file_takes_overrides_like_a_config():
    from experiments.sweep import load_sweep
    from salt.config import ConfigError

    sweep = load_sweep("jobs/configs/sweep-demo.yaml", ["executor=ray", "probe=true"])
    assert (sweep.executor, sweep.probe) == ("ray", True)
    with pytest.raises(ConfigError, match="sweep.executor='kubernetes': expected one of local, ray, slurm"):
        load_sweep("jobs/configs/sweep-demo.yaml", ["executor=kubernetes"])
    with pytest.raises(ConfigError, match="unknown key sweep.executr"):
        load_sweep("jobs/configs/sweep-demo.yaml", ["executr=ray"])


def test_plan_of_a_training_config_has_its_grid_and_format():
    from jobs import plan as plan_job
    from salt.config import load_config
    from salt.flops import costs, inputs_from_config
    from salt.models.factory import config_grid

    cfg = load_config("jobs/configs/tiny.yaml", ["extract.dtype=float32"])
    planned = costs(inputs_from_config(cfg))
    grid = config_grid(cfg)
    assert planned.tokens_per_view == grid[0] * grid[1] * grid[2]
    assert planned.inputs.storage == cfg.extract.storage and planned.inputs.student_steps == cfg.student.optim.steps
    printed = plan_job.main(["--config", "jobs/configs/tiny.yaml", "num_clips=512", "storage.dtype=float32"])
    assert "512 clips" in printed and "float32" in printed
    with pytest.raises(SystemExit):
        plan_job.main(["--run", "runs/demo"])  # plan has no use for a run folder: refused, not ignored


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only answer of make gpu-check")
def test_gpu_check_on_a_cpu_only_machine_says_so_in_one_line_and_succeeds(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "skipped: no CUDA device\n", done.stdout + done.stderr[-2000:]
    assert not list(tmp_path.iterdir())  # no report of a check that did not run


def test_gpu_check_runs_every_part_and_reports_each_failure(tmp_path):
    """One short GPU lease must show every broken part: a part that raises does not stop the next,
    its traceback goes into GPU_CHECK.md, and a failing gpu-test run counts as failed too."""
    from jobs.gpu_check import run_parts, write_report

    ran = []

    def broken(work):
        ran.append("chain")
        raise RuntimeError("CUDA error: device-side assert triggered")

    def bench(work):
        ran.append("bench")
        return [{"name": "student_step_s", "value": 0.5, "unit": "s", "bound": None, "ratio": None, "note": "x"}]

    report = {"device": "cpu", "torch": "x", "part_s": {}, "notes": []}
    failed = run_parts({"tests": lambda work: {"returncode": 1, "summary": "1 failed, 6 passed", "output_tail": "F"},
                        "chain": broken, "bench": bench}, report)
    assert ran == ["chain", "bench"] and failed == ["chain", "tests"]
    assert "device-side assert" in report["chain"]["error"] and report["bench"][0]["value"] == 0.5
    report["failed"], report["wall_s"] = failed, 1.0
    write_report(report, tmp_path)
    text = (tmp_path / "GPU_CHECK.md").read_text()
    assert "**Failed: chain, tests.**" in text and "1 failed, 6 passed" in text
    assert "RuntimeError: CUDA error: device-side assert triggered\n```" in text  # the traceback as printed
    assert "`student_step_s` | 0.5" in text


def test_gpu_bundle_lists_what_is_missing_and_refuses_an_oversized_folder(tmp_path, capsys):
    from jobs import gpu_bundle

    assert gpu_bundle.main(["missing"]) == 0
    absent = capsys.readouterr().out.split()
    assert set(absent) <= set(gpu_bundle.BUNDLE) and not {"zarr", "decord", "pytest"} & set(absent)
    assert gpu_bundle.main(["node"]) == 0  # torch, numpy, pyarrow and matplotlib are here
    (tmp_path / "wheel.whl").write_bytes(b"\0" * 1000)
    assert gpu_bundle.main(["size", str(tmp_path)]) == 0
    (tmp_path / "big.whl").write_bytes(b"\0" * gpu_bundle.LIMIT_BYTES)
    assert gpu_bundle.main(["size", str(tmp_path)]) == 1
    assert "40.0 MB (limit 40 MB)" in capsys.readouterr().out
