"""Shared argument handling for the thin job entry points."""

from __future__ import annotations

import argparse
import json
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


def set_torch_threads(train: TrainConfig) -> None:
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)


def print_summary(name: str, summary: dict) -> None:
    print(f"{name}: " + json.dumps(summary, default=str))
