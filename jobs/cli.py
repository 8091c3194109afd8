"""Shared argument handling for the thin job entry points."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from salt.config import Config, ConfigError, TrainConfig, load_config
from salt.devices import set_torch_threads


# The defaults every job shares (the Makefile's CONFIG, DATA and RUN say the same).
DEFAULT_CONFIG = "jobs/configs/tiny.yaml"
DEFAULT_DATA = "data/moving-digits"
DEFAULT_RUN = "runs/demo"
COMMON_FLAGS = ("config", "data", "run")


def parser(
    description: str,
    *,
    flags: tuple[str, ...] = COMMON_FLAGS,
    config: str | None = DEFAULT_CONFIG,
    run: str | None = DEFAULT_RUN,
    help: dict[str, str] | None = None,
    overrides: bool = True,
) -> argparse.ArgumentParser:
    """The one parser of every job: the common flags it uses (same names, defaults and override
    syntax everywhere), --no-progress and positional dotted `key=value` overrides. A job leaves
    out of `flags` what it has no use for, so passing it is an error rather than ignored."""
    helps = {
        "config": "YAML config",
        "data": "folder of WebDataset shards (or with train/ val/)",
        "run": "run folder; each stage writes a subfolder",
        "overrides": "dotted key=value overrides of the config, e.g. student.optim.steps=100",
    } | (help or {})
    defaults = {"config": config, "data": DEFAULT_DATA, "run": run}
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in flags:
        p.add_argument(f"--{flag}", default=defaults[flag], help=helps[flag])
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if overrides:
        p.add_argument("overrides", nargs="*", help=helps["overrides"])
    return p


def study_parser(description: str, *, config: str, run: str, report: str, overrides_help: str) -> argparse.ArgumentParser:
    """The parser of a study over seeds: --config, --run, --report. No --data: each seed generates its
    own dataset under --run."""
    p = parser(description, flags=("config", "run"), config=config, run=run, help={"overrides": overrides_help})
    p.add_argument("--report", default=report, help="the report it writes")
    return p


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers, e.g. --seeds 0,1,2 (empty: none)."""
    return [int(x) for x in text.split(",") if x]


def make_command(target: str, argv: list[str] | None) -> str:
    """The command a study's report says produced it: `make <target>` and the job's arguments."""
    return f"make {target}" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))


def config_from(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


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
    """The job's summary line; with the storage retries this process made, if it made any and
    the summary does not count them itself (pipeline/fs.py: retry_counts; each was also a
    WARNING line in the log)."""
    from pipeline.fs import retry_counts

    retries = retry_counts()
    extra = {"storage_retries": retries} if retries and "storage_retries" not in summary else {}
    print(f"{name}: " + json.dumps(summary | extra, default=str))


# Bad input a user can fix (a missing folder, a config typo, a store of another teacher, a
# corrupt or foreign file): the message names it, so a stack trace adds nothing but noise.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def entry(main: Callable[[], object]) -> None:
    """Run a job's main; expected errors end in one line on stderr and exit status 2
    (SALT_TRACEBACK=1 shows the stack as well)."""
    from pipeline.loaders import ClipHashMismatch
    from pipeline.store.layout import CorruptStoreError

    try:
        main()
    except (*EXPECTED_ERRORS, ClipHashMismatch, CorruptStoreError) as e:
        if os.environ.get("SALT_TRACEBACK"):
            raise
        notes = "".join(f" ({note})" for note in getattr(e, "__notes__", []))  # e.g. the shard a worker failed on
        print(f"error: {e}{notes}", file=sys.stderr)
        sys.exit(2)
