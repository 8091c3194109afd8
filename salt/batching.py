"""One meaning of batch: `optim.batch_size` is the global batch, the samples of one optimizer step
over all ranks, on any number of ranks.

A step's global batch is a fixed block of the epoch's sample order (pipeline/loaders.py), the same
block whatever the world size. Rank r takes the block's clips r, r + W, r + 2W, ... (W ranks), so
ranks differ by at most one clip when W does not divide the batch, and cuts its share into
`accumulation` micro-batches of at most `micro_batch` samples, as even as possible. Every rank runs
the same number of micro-batches (DDP reduces gradients on the last one).

Each micro-batch's loss (a mean over its samples) is scaled by `weight(n)` = n * W / batch before
its backward: DDP's mean over ranks then makes every sample of the step weigh 1 / batch, exactly as
one step on the whole batch does, whatever the split. On one rank with one micro-batch the weight
is 1 and a step is what it always was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from salt.config import ConfigError, OptimConfig


@dataclass(frozen=True, kw_only=True)
class BatchPlan:
    global_batch: int  # samples per optimizer step, all ranks together
    world_size: int
    micro_batch: int  # at most this many samples per forward on a rank
    accumulation: int  # micro-batches per step on every rank
    views_per_decode: int = 1  # a clip gives this many samples, always in one micro-batch

    @property
    def global_clips(self) -> int:
        return self.global_batch // self.views_per_decode

    def rank_clips(self, rank: int) -> int:
        """How many of the step's clips rank `rank` takes (they differ by one at most)."""
        return len(range(rank, self.global_clips, self.world_size))

    def weight(self, samples: int) -> float:
        """The loss scale of a micro-batch of `samples` (its planned size)."""
        return samples * self.world_size / self.global_batch

    def describe(self) -> str:
        per_rank = {self.rank_clips(r) * self.views_per_decode for r in (0, self.world_size - 1)}
        share = "-".join(str(n) for n in sorted(per_rank))
        return (f"global batch {self.global_batch} = {self.world_size} rank(s) x {share} samples, "
                f"in {self.accumulation} micro-batch(es) of at most {self.micro_batch} (accumulation steps {self.accumulation})")

    def as_dict(self) -> dict:
        return {"global_batch": self.global_batch, "world_size": self.world_size, "micro_batch": self.micro_batch,
                "accumulation_steps": self.accumulation}


def plan_batch(global_batch: int, world_size: int, micro_batch_size: int = 0, views_per_decode: int = 1) -> BatchPlan:
    """The split of a global batch over `world_size` ranks and their micro-batches; a batch that
    cannot be split is a ConfigError naming the numbers."""
    where = f"optim.batch_size={global_batch} (the global batch)"
    if global_batch < 1 or micro_batch_size < 0:
        raise ConfigError(f"{where}, optim.micro_batch_size={micro_batch_size}: want a positive batch and a micro-batch >= 0")
    if global_batch % views_per_decode:
        raise ConfigError(
            f"batch size {global_batch} is not a multiple of data.views_per_decode={views_per_decode}: "
            "each decoded clip gives that many samples of one batch"
        )
    clips = global_batch // views_per_decode
    if world_size > clips:
        raise ConfigError(f"{where} gives {clips} clip(s) per step, fewer than the {world_size} ranks: raise it")
    most = math.ceil(clips / world_size)  # clips of the ranks with the larger share
    if micro_batch_size == 0:
        return BatchPlan(global_batch=global_batch, world_size=world_size, micro_batch=most * views_per_decode,
                         accumulation=1, views_per_decode=views_per_decode)
    if micro_batch_size % views_per_decode:
        raise ConfigError(
            f"optim.micro_batch_size={micro_batch_size} is not a multiple of data.views_per_decode={views_per_decode}"
        )
    accumulation = math.ceil(most / (micro_batch_size // views_per_decode))
    if clips // world_size < accumulation:
        raise ConfigError(
            f"{where} on {world_size} ranks in {accumulation} micro-batches of at most {micro_batch_size} would leave "
            "a rank an empty micro-batch: raise optim.micro_batch_size"
        )
    micro = math.ceil(most / accumulation) * views_per_decode  # the split is as even as possible
    return BatchPlan(global_batch=global_batch, world_size=world_size, micro_batch=micro, accumulation=accumulation,
                     views_per_decode=views_per_decode)


def plan_for(optim: OptimConfig, world_size: int, views_per_decode: int = 1) -> BatchPlan:
    return plan_batch(optim.batch_size, world_size, optim.micro_batch_size, views_per_decode)


def split_evenly(items: list, parts: int) -> list[list]:
    """`items` cut into `parts` consecutive runs whose lengths differ by one at most, longer first."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out
