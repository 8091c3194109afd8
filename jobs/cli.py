"""Shared argument handling for the thin job entry points."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

import torch

from salt.config import Config, ConfigError, TrainConfig, load_config


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="jobs/configs/tiny.yaml", help="YAML config")
    p.add_argument("--data", default="data/moving-digits", help="folder of WebDataset shards (or with train/ val/)")
    p.add_argument("--run", default="runs/demo", help="run folder; each stage writes a subfolder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. student.optim.steps=100")
    return p


def config_from(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def set_torch_threads(train: TrainConfig) -> None:
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)


def run_training_job(name: str, train: TrainConfig, run: Callable[[], dict]) -> dict:
    """A training stage as a job: threads, the process group under torchrun, the summary from rank 0."""
    from salt.train.distributed import finish, init_distributed

    set_torch_threads(train)
    rank = init_distributed()
    summary = run()
    finish()
    if rank.is_main:
        print_summary(name, summary)
    return summary


def print_summary(name: str, summary: dict) -> None:
    print(f"{name}: " + json.dumps(summary, default=str))


# Bad input a user can fix (a missing folder, a config typo, a store of another teacher, a
# corrupt or foreign file): the message names it, so a stack trace adds nothing but noise.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def entry(main: Callable[[], object]) -> None:
    """Run a job's main; expected errors end in one line on stderr and exit status 2
    (SALT_TRACEBACK=1 shows the stack as well)."""
    from pipeline.stream import ClipHashMismatch
    from pipeline.targets import CorruptStoreError

    try:
        main()
    except (*EXPECTED_ERRORS, ClipHashMismatch, CorruptStoreError) as e:
        if os.environ.get("SALT_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
