"""The studies' independent runs (`make replicate`, `make yardstick`, `make stage1-variants`): jobs in
spawned worker processes of one torch thread each, grouped into timed phases, and the job functions
the studies share."""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import torch

from experiments.runs import run_teacher
from pipeline.digits import write_moving_digits
from salt.config import Config, from_dict


def _in_worker(fn: Callable, *args, **kwargs):
    torch.set_num_threads(1)  # the workers share the cores
    return fn(*args, **kwargs)


@dataclasses.dataclass
class Phases:
    """A study's phases, each a set of jobs run in one pool of spawned processes kept for the whole
    study (`with Phases(...) as phases`): each new process pays the imports again (~2.5 s of CPU
    here), once per phase and worker before; `walls` holds each phase's seconds."""

    study: str
    workers: int
    progress: bool = True
    walls: dict[str, float] = dataclasses.field(default_factory=dict)
    _pool: ProcessPoolExecutor | None = dataclasses.field(default=None, repr=False)

    def __enter__(self) -> "Phases":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def run(self, name: str, jobs: dict[str, tuple]) -> dict:
        t0 = time.perf_counter()
        if self.progress:
            print(f"[{self.study}] {name}: {len(jobs)} runs", flush=True)
        if jobs and self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
        futures = {job: self._pool.submit(_in_worker, *args) for job, args in jobs.items()}
        result = {job: f.result() for job, f in futures.items()}
        self.walls[name] = self.walls.get(name, 0.0) + time.perf_counter() - t0
        return result

    def write_data(self, data: dict[int, str], num_train: int, num_val: int) -> None:
        """The "data" phase: each seed's dataset ({seed: folder}) not yet written, one after another over
        all the workers' cores (a pool job writes with one core, and the last seed of an odd count wrote alone)."""
        todo = {s: out for s, out in data.items() if not Path(out, "labels.json").is_file()}
        t0 = time.perf_counter()
        if self.progress and todo:
            print(f"[{self.study}] data: {len(todo)} datasets", flush=True)
        for seed, out in todo.items():
            write_moving_digits(out, seed=seed, num_train=num_train, num_val=num_val, progress=False, workers=self.workers)
        self.walls["data"] = self.walls.get("data", 0.0) + time.perf_counter() - t0

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.walls.items()}


def vpixel_teacher(cfg_dict: dict, size: str, data: str, out: str) -> dict:
    cfg = from_dict(Config, cfg_dict)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, teacher=size))
    return run_teacher(cfg, data, out, progress=False)
