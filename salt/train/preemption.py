"""Preemption: SIGTERM or SIGUSR1 stops a training run after a whole step, with a checkpoint, and
an exit status that asks for a requeue.

The contract a launcher (SLURM's `--signal`, `scancel --signal`, torchrun, a plain `kill`) relies on:

1. While `run_training` runs, every training process handles SIGTERM and SIGUSR1 (installed from
   the main thread; a run on another thread keeps the process's own handlers). The handler only
   notes the signal: the step that is running finishes.
2. After each step the ranks agree (the largest signal number over ranks, a CPU collective on a
   gloo group, so no wait on the device): every rank stops after the same step, the first one to
   end after any rank was signalled.
3. Rank 0 writes the checkpoint (weights, optimizer, the loader's global position, the bad clips)
   and then `preempted.json` in the run folder: {"step", "signal", "world_size", "exit_status"};
   every rank waits for both before it leaves.
4. Every process exits with status PREEMPTED_EXIT = 75 (EX_TEMPFAIL in sysexits.h: a temporary
   failure, to be retried). It is raised as `Preempted`, a SystemExit, so a caller that trains
   several runs in one process (a sweep) stops as well instead of starting the next run.
5. The same command again, on the same run folder, resumes from that checkpoint on any world size
   that can split the global batch (salt/batching.py); its log says it resumes after a
   preemption and preempted.json is removed. A resumed run equals an uninterrupted one.

DataLoader workers ignore both signals (pipeline/loaders.py: make_loader), so a signal sent to the
whole process group (as SLURM can send it to a job step) reaches the workers harmlessly.

Under torchrun: torchrun forwards SIGTERM to its workers (SIGUSR1 too when started with
`--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`; without it SIGUSR1 ends torchrun
itself) and kills them `--shutdown-timeout` seconds later (30 by default: leave room for a step and
a checkpoint). It then exits with status 1 whatever its workers returned, so a launcher that runs
torchrun tests for preempted.json rather than for status 75.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from salt.train.distributed import finish

PREEMPTED_EXIT = 75  # EX_TEMPFAIL
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
MARKER = "preempted.json"


class Preempted(SystemExit):
    """Raised on every rank once the preemption checkpoint is written; exits with PREEMPTED_EXIT."""

    def __init__(self, step: int, signal_name: str, run_dir: str | Path):
        super().__init__(PREEMPTED_EXIT)
        self.step, self.signal_name, self.run_dir = step, signal_name, str(run_dir)

    def __str__(self) -> str:
        return (f"preempted by {self.signal_name} after step {self.step}: checkpoint in {self.run_dir}; "
                f"the same command resumes it (exit status {PREEMPTED_EXIT})")


class PreemptionWatch:
    """Notes SIGTERM / SIGUSR1 while open (a context manager); `agreed` is the ranks' common answer."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._note) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    def agreed(self, world_size: int, group=None) -> str | None:
        """The signal's name if any rank got one (the same answer on every rank), else None."""
        signum = self.signum
        if world_size > 1:
            t = torch.tensor([signum], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            signum = int(t.item())
        return signal.Signals(signum).name if signum else None


def write_marker(run_dir: str | Path, step: int, signal_name: str, world_size: int) -> None:
    record = {"step": step, "signal": signal_name, "world_size": world_size, "exit_status": PREEMPTED_EXIT,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (Path(run_dir) / MARKER).write_text(json.dumps(record) + "\n")


def take_marker(run_dir: str | Path) -> dict | None:
    """The preemption record a resumed run starts from (removed: the run is no longer preempted)."""
    path = Path(run_dir) / MARKER
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    path.unlink()
    return record


def leave_when_preempted(run: Callable[[], dict]) -> Callable[[], dict]:
    """`run`, for a job's entry point: a preempted run closes its process group before the
    process exits with PREEMPTED_EXIT (every rank stops at the same step, so none is left waiting)."""

    def wrapped() -> dict:
        try:
            return run()
        except Preempted:
            finish()
            raise

    return wrapped
