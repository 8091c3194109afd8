"""make bench rows for the streaming evaluation (docs/evaluation.md): the peak resident memory of
`make probe` (jobs.probe, one process) on one encoder over N and 4N clips of the embedded
generator, and their ratio, bounded by 1.3 (memory bounded by the batch, not the data set).

Each figure is one `python -m jobs.probe` process started fresh, its peak RSS read from the
kernel when it ends (getrusage's ru_maxrss in a wrapper that ran only it: the largest resident set
of the process and of the loader workers it waited for, not their sum). The first run extracts the features; a second run
on the same output folder reads them back (the encoder is not run) and is measured too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from experiments.bench import row

ROOT = str(Path(__file__).resolve().parents[1])
# the measured probe: the default protocol on a random-init vit_cpu_s (the same weights every run),
# one attentive probe seed of two epochs, so the token-streaming path is measured as well
ENCODER = "random:vit_cpu_s"
OVERRIDES = ("probe.seeds=1", "probe.epochs=2", "data.num_workers=1")


# run in a fresh interpreter: its RUSAGE_CHILDREN then covers the one command it ran (and the loader
# workers that command waited for): their largest resident set (not their sum), and their CPU time
_MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "u = resource.getrusage(resource.RUSAGE_CHILDREN); print(u.ru_maxrss, u.ru_utime + u.ru_stime)")


def measured(cmd: list[str], *, cwd: str, timeout: float = 3600) -> dict:
    """{rss_mib: peak RSS, wall_s, cpu_s: user + system} of a command run to completion; a failure
    raises with its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rss_kib, cpu = proc.stdout.split()[-2:]  # Linux reports KiB
    return {"rss_mib": int(rss_kib) / 1024, "wall_s": time.perf_counter() - t0, "cpu_s": float(cpu)}


def peak_rss_mib(cmd: list[str], *, cwd: str, timeout: float = 3600) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of a command run to completion."""
    m = measured(cmd, cwd=cwd, timeout=timeout)
    return m["rss_mib"], m["wall_s"]


def probe_rss(data: str, out: Path, *, code_root: str = ROOT, overrides: tuple[str, ...] = OVERRIDES) -> tuple[float, float]:
    """(peak RSS MiB, wall s) of one `python -m jobs.probe` of ENCODER on `data` into `out`, run from
    `code_root` (another checkout of the project: its own code, this interpreter)."""
    return peak_rss_mib([sys.executable, "-m", "jobs.probe", "--ckpt", ENCODER, "--data", data, "--out", str(out),
                         "--no-progress", *overrides], cwd=code_root)


def write_sizes(work: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, str]:
    """name -> data folder of the embedded generator with (train, val) clips (kept across calls)."""
    from pipeline.digits import write_moving_digits

    folders = {}
    for name, (train, val) in sizes.items():
        folder = work / f"digits-{name}"
        if not (folder / "labels.json").is_file():
            write_moving_digits(str(folder), seed=0, num_train=train, num_val=val, progress=False, workers=os.cpu_count() or 1)
        folders[name] = str(folder)
    return folders


def probe_memory_rows(work: Path, *, train: int = 200, val: int = 100, code_root: str = ROOT,
                      label: str = "") -> list[dict]:
    """Peak RSS of `make probe` over N = (train, val) clips and 4N, a first (extracting) and a second
    (cached) run each, and the 4N / N ratio of the first runs (bound 1.3)."""
    work.mkdir(parents=True, exist_ok=True)
    data = write_sizes(work, {"N": (train, val), "4N": (4 * train, 4 * val)})
    rss, rows = {}, []
    for name, folder in data.items():
        out = work / f"probe{label}-{name}"
        if out.exists():
            shutil.rmtree(out)
        first, first_s = probe_rss(folder, out, code_root=code_root)
        second, second_s = probe_rss(folder, out, code_root=code_root)
        rss[name] = first
        clips = (train + val) * (4 if name == "4N" else 1)
        rows += [
            row(f"probe_peak_rss_{name}{label}", round(first, 1), "MiB", None,
                f"{clips} clips, features extracted ({first_s:.0f} s)"),
            row(f"probe_peak_rss_{name}_cached{label}", round(second, 1), "MiB", None,
                f"{clips} clips, features read back, encoder not run ({second_s:.0f} s)"),
        ]
    rows.append(row(f"probe_peak_rss_ratio_4N_over_N{label}", round(rss["4N"] / rss["N"], 3), "x", 1.3,
                    f"N = {train} + {val} clips; one process, peak RSS (getrusage)"))
    return rows
