"""A stage run from files: shards (and a target store) -> loader -> training loop -> run folder.

The jobs, the sweep and the benchmark all start runs through these two functions, so a
student trained by `make sweep` is built exactly as one trained by `make student`.
Under torchrun each process passes its rank and the world size to the loader, which takes the
rank's share of each global batch (`optim.batch_size`, salt/batching.py); the loop does the
rest. The run folder's run_info.yaml records the split: global batch, world size, micro-batch and
accumulation steps.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from pipeline.shards import list_shards
from pipeline.loaders import ClipStream, TargetStream, make_loader
from pipeline.store.read import TargetStore
from pipeline.store.provenance import check_compatible
from salt.config import Config, OptimConfig
from salt.runinfo import write_run_info
from salt.batching import plan_for
from salt.train.distributed import current
from salt.train.loop import prepare_batch
from salt.train.student import train_student
from salt.train.teacher import train_teacher

# Students that read the crops their teacher saw from the store's pixel cache instead of decoding the videos
# again: the same pixels (the loss is equal to the last bit), and loader workers that no longer take a core
# from the training beside them (docs/usage.md, "Stage-2 inputs"). The demo and make replicate run so.
READ_PIXEL_CACHE = ("extract.pixel_cache=true", "data.stage2_input=pixels")


def _loader(cfg: Config, shards: list[str], optim: OptimConfig, store: str | None = None):
    """Stage 1 streams clips (store None); stage 2 streams a store's samples with their targets."""
    rank = current()
    position = {"batch_size": optim.batch_size, "micro_batch_size": optim.micro_batch_size, "rank": rank.rank,
                "world_size": rank.world_size}

    def make_batches(state: dict | None):
        dataset = ClipStream(cfg, shards, **position) if store is None else TargetStream(cfg, shards, store=store, **position)
        # pinned batches on CUDA: the training step's copies of crops, masks and targets run asynchronously
        return make_loader(dataset.at(state), cfg.data.num_workers, pin_memory=rank.device.type == "cuda")

    return make_batches


def _batch(optim: OptimConfig, cfg: Config) -> dict:
    return plan_for(optim, current().world_size, cfg.data.views_per_decode).as_dict()


def teacher_batches(cfg: Config, data: str):
    """make_batches(loader_state) of stage 1 on data's train split: the batches a teacher trains on."""
    return _loader(cfg, list_shards(data, "train"), cfg.teacher.optim)


def first_teacher_batches(cfg: Config, data: str, count: int) -> list[dict]:
    """The first `count` batches a stage-1 run takes, as its training step sees them (on the CPU)."""
    loader = teacher_batches(cfg, data)(None)
    try:
        return [prepare_batch(b, "cpu", cfg.data) for b in islice(loader, count)]
    finally:
        loader.close()


def run_teacher(cfg: Config, data: str, out: str | Path, *, stop_after: int | None = None, progress: bool = True) -> dict:
    if current().is_main:
        write_run_info(out, cfg, data=data, batch=_batch(cfg.teacher.optim, cfg))
    return train_teacher(cfg, out, teacher_batches(cfg, data), stop_after=stop_after, progress=progress)


def run_student(
    cfg: Config, data: str, store: str, out: str | Path, *, stop_after: int | None = None, progress: bool = True
) -> dict:
    """Train (or resume) a student on a target store. The store is only read."""
    target_store = TargetStore(store)
    check_compatible(target_store.meta, cfg, store)
    if cfg.data.stage2_input == "pixels":  # the store holds the clips: its own shard list, no video folder needed
        shards = [s["path"] for s in target_store.meta["source"]["shards"]]
    else:
        shards = list_shards(data, target_store.meta["source"]["split"])
    if current().is_main:
        write_run_info(out, cfg, data=data, store=store, batch=_batch(cfg.student.optim, cfg))
    make_batches = _loader(cfg, shards, cfg.student.optim, store)
    return train_student(
        cfg,
        out,
        make_batches,
        teacher_width=target_store.teacher_width,
        store_meta=target_store.meta,
        stop_after=stop_after,
        progress=progress,
    )
