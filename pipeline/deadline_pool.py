"""Run a function over many inputs in worker processes, each call bounded in time.

decord can loop forever inside `get_batch` on a file whose container over-reports its
frame count. A thread cannot be stopped, so probing runs in processes: a call past its
deadline has its worker killed and replaced, and comes back as a `TimeoutError`.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable, Iterator


def _serve(fn: Callable[[Any], Any], conn: Connection) -> None:
    while True:
        item = conn.recv()
        if item is None:
            return
        try:
            conn.send((True, fn(item)))
        except Exception as e:  # reported per item; the worker stays up
            conn.send((False, f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx: Any, fn: Callable[[Any], Any]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(fn, child), daemon=True)
        self.process.start()
        child.close()
        self.task: tuple[int, float] | None = None  # (input position, start time)

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.kill()


def bounded_map(
    fn: Callable[[Any], Any], items: Iterable[Any], *, timeout_s: float, workers: int = 2
) -> Iterator[tuple[int, bool, Any]]:
    """Yields (position, ok, result or error text) per item, in completion order.

    `fn` must be a module-level function (it runs in forked workers).
    """
    ctx = mp.get_context("fork")
    pending = list(enumerate(items))[::-1]
    pool = [_Worker(ctx, fn) for _ in range(max(1, min(workers, len(pending))))]
    try:
        while pending or any(w.task for w in pool):
            for w in pool:
                if w.task is None and pending:
                    position, item = pending.pop()
                    w.conn.send(item)
                    w.task = (position, time.monotonic())
            busy = [w for w in pool if w.task]
            ready = wait([w.conn for w in busy], timeout=0.2)
            for i, w in enumerate(pool):
                if w.task is None:
                    continue
                position, started = w.task
                if w.conn in ready:
                    try:
                        ok, result = w.conn.recv()
                    except EOFError:  # the worker died (e.g. a segfault in the decoder)
                        ok, result = False, "the decoder crashed the worker process"
                        w.kill()
                        pool[i] = w = _Worker(ctx, fn)
                    w.task = None
                    yield position, ok, result
                elif time.monotonic() - started > timeout_s:
                    w.kill()
                    pool[i] = _Worker(ctx, fn)
                    yield position, False, f"TimeoutError: no result after {timeout_s:.0f} s (decoder hang?)"
    finally:
        for w in pool:
            w.stop()
