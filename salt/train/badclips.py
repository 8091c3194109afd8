"""Stage-2 clips a run could not train on, counted over all ranks against `data.max_bad_fraction`.

The loader replaces a bad clip and names it in its batch (`bad`, pipeline/loaders.py); the run log
adds each rank's to this set, and at each of its reads (log steps, checkpoints) the ranks pool the
new ones (a CPU collective, only when some rank has any). The bound is on distinct clips: more than
max_bad_fraction x the dataset's clips stops the run, on every rank at the same step, naming them.
The set travels in checkpoints, so a resumed run counts on from where it was.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class TooManyBadClips(ValueError):
    pass


class BadClips:
    def __init__(self, max_fraction: float, known: dict[str, str] | None = None):
        self.max_fraction = max_fraction
        self.known: dict[str, str] = dict(known or {})  # key -> reason, over all ranks
        self.pending: list[dict] = []  # this rank's, not yet pooled

    def add(self, records: list[dict], step: int) -> None:
        for r in records:
            if r["key"] not in self.known:
                self.pending.append(r | {"step": step})

    def pool(self, world_size: int, group=None) -> list[dict]:
        """Every rank's new bad clips, merged into `known` (same on every rank); returns the new ones."""
        mine = self.pending
        self.pending = []
        if world_size > 1:
            count = torch.tensor([len(mine)], dtype=torch.int64)
            dist.all_reduce(count, group=group)
            if not count.item():
                return []
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, mine, group=group)
            mine = [r for part in gathered for r in part]
        new = []
        for r in sorted(mine, key=lambda r: (r["step"], r["key"])):
            if r["key"] not in self.known:
                self.known[r["key"]] = r["reason"]
                new.append(r)
        return new

    def check(self, clips: int, step: int) -> None:
        allowed = math.floor(self.max_fraction * clips)
        if len(self.known) > allowed:
            named = "; ".join(f"{k}: {why}" for k, why in sorted(self.known.items()))
            raise TooManyBadClips(
                f"{len(self.known)} of {clips} clips failed to decode or to match their teacher's clip hash by step "
                f"{step}, more than data.max_bad_fraction={self.max_fraction:g} allows ({allowed}): {named}"
            )
