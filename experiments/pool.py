"""The studies' independent runs (`make replicate`, `make yardstick`, `make stage1-variants`): jobs in
spawned worker processes of one torch thread each, grouped into timed phases, and the job functions
the studies share."""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import torch

from experiments.runs import run_teacher
from pipeline.digits import write_moving_digits
from salt.config import Config, from_dict


def _in_worker(fn: Callable, *args, **kwargs):
    torch.set_num_threads(1)  # the workers share the cores
    return fn(*args, **kwargs)


def in_pool(jobs: dict[str, tuple], workers: int) -> dict:
    """name -> (fn, args...) run in `workers` spawned processes; name -> result."""
    if not jobs:
        return {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_in_worker, *job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


@dataclasses.dataclass
class Phases:
    """A study's phases, each a set of jobs run in the pool; `walls` holds each phase's seconds."""

    study: str
    workers: int
    progress: bool = True
    walls: dict[str, float] = dataclasses.field(default_factory=dict)

    def run(self, name: str, jobs: dict[str, tuple]) -> dict:
        t0 = time.perf_counter()
        if self.progress:
            print(f"[{self.study}] {name}: {len(jobs)} runs", flush=True)
        result = in_pool(jobs, self.workers)
        self.walls[name] = self.walls.get(name, 0.0) + time.perf_counter() - t0
        return result

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.walls.items()}


def write_data(out: str, seed: int, num_train: int, num_val: int) -> dict:
    return write_moving_digits(out, seed=seed, num_train=num_train, num_val=num_val, progress=False)


def vpixel_teacher(cfg_dict: dict, size: str, data: str, out: str) -> dict:
    cfg = from_dict(Config, cfg_dict)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, teacher=size))
    return run_teacher(cfg, data, out, progress=False)
