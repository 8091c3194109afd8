"""Shared argument handling for the thin job entry points."""

from __future__ import annotations

import argparse
import json
import os
import sys

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


def set_torch_threads(train: TrainConfig, num_workers: int) -> int:
    """Leave the loader workers their cores: OpenMP threads that share a core with a
    decoding worker stall at every barrier (steps several times slower on 2 cores)."""
    threads = train.torch_threads or max(1, (os.cpu_count() or 1) - num_workers)
    torch.set_num_threads(threads)
    return threads


def print_summary(name: str, summary: dict) -> None:
    print(f"{name}: " + json.dumps(summary, default=str))
