"""Training loaders for both stages: shards -> micro-batches of uint8 crop boxes, masks (and cached targets).

Order. Each epoch visits the shards in a seeded order and each shard's samples in a
seeded order, then passes them through a seeded shuffle buffer (`data.shuffle_buffer`)
so batches mix shards. Global step g of the epoch takes the next block of that list: one
global batch (`optim.batch_size`, salt/batching.py), the same block on any number of
ranks. Rank r takes the block's clips r, r + W, r + 2W, ... and cuts them into the step's
micro-batches (gradient accumulation); per epoch, fewer than one global batch of samples is
left out, and the order, so the left-out samples, changes every epoch. Micro-batch i of a
rank goes to loader worker i % num_workers (counted from where the stream starts), which is
the order in which torch's DataLoader collects them, so the batch sequence is the same for any
number of workers.

Position. The position is global: the next global step (`next_batch`), so global samples
consumed = next_batch x batch_size, whatever the world size. Every micro-batch carries
`loader_state`, the position after its step: checkpoints save it, `load_state_dict` resumes,
on this world size or another (each rank then takes its share of the same blocks), so a
resumed run replays exactly the samples an uninterrupted run would have trained on.

Views. With data.views_per_decode = k, each picked clip is decoded once and gives k
samples, its views j = 0..k-1, all in the same micro-batch (so batch_size is a multiple of k and
a global batch holds batch_size / k clips). Stage 1 uses view = epoch * k + j, fresh crops per pass.
Stage 2 cycles through the views the store holds for the clip, view = stored[(epoch * k + j)
% len(stored)], which is (epoch * k + j) % views_per_clip when every view was extracted; a clip
whose other views failed to decode (the store's errors table) reuses the views it has, with
one warning. With data.stage2_input=pixels, stage 2 reads each view's crop box from the
store's pixel cache instead of decoding the video: the very uint8 pixels the teacher saw.

Clips. A batch carries each sample's uint8 crop box (`crops`, a list: sizes differ) and flip
bit (`flips`), not model input: the training step resizes them on its device
(`salt/train/loop.py: prepare_batch`), as extraction's teacher actor does on its own, so a
student's clips are its teacher's on any device, and the resize costs no loader core. Stage-2
targets travel in the store's dtype (fp16 by default: half the bytes of fp32 through workers,
pinned buffers and the copy to the GPU); the training step casts them on its device.

Bad clips. Stage 1 skips a video that fails to decode (its reason in the batch's `skipped`).
Stage 2 expects every clip to decode to what its teacher saw: with data.max_bad_fraction = 0 the
first that does not stops the run (VideoDecodeError or ClipHashMismatch, naming it); above 0 it is
replaced by another clip of the epoch, drawn by a generator seeded with (seed, epoch, step, slot
in the global batch), so the batch keeps its size and the replacement is the same on any world
size, worker count or resume. The batch's `bad` lists each failed clip and its reason; the
training loop counts them and stops past the bound (salt/train/loop.py).
"""

from __future__ import annotations

import hashlib
import logging
import signal
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils import signal_handling

from pipeline.shards import index_shard, read_member, shard_name, video_member
from pipeline.store.read import TargetStore, check_row
from pipeline.video import VideoDecodeError, load_crops
from salt.config import Config
from salt.masking import collate_masks, sample_masks
from salt.seeds import sample_rng
from salt.models.factory import config_grid
from salt.batching import plan_batch, split_evenly

log = logging.getLogger(__name__)

class ClipHashMismatch(RuntimeError):
    pass


class LoaderStateMismatch(ValueError):
    pass


class ReplacementsFailed(ValueError):
    pass


# A clip that cannot be trained on as its teacher saw it; anything else (a corrupt store, a
# missing shard) is not one clip's fault and stops the run.
BAD_CLIP_ERRORS = (VideoDecodeError, ClipHashMismatch)
REPLACEMENT_TRIES = 8  # replacements drawn for one slot before the stream gives up


def buffer_shuffle(items: list, size: int, rng: np.random.Generator) -> list:
    """A streaming shuffle buffer: each item leaves at a random time within `size` of arriving.

    Computed on (shard, key) pairs, not on decoded clips, so it costs nothing and the
    order is a pure function of the rng, which is what makes resume exact.
    """
    if size <= 1:
        return list(items)
    buffer, out = [], []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            out.append(buffer.pop())
    out.extend(buffer[i] for i in rng.permutation(len(buffer)))
    return out


class ShardedSamples(IterableDataset):
    """Endless stream of one rank's micro-batches: the ordering, batching and resume logic both
    stages share. A subclass says which keys each shard has and how a sample is loaded.

    batch_size is the global batch; micro_batch_size (0: one micro-batch per step) and the world
    size say how this rank takes its share (salt/batching.py)."""

    def __init__(
        self,
        cfg: Config,
        shards: list[str],
        keys: list[list[str]],
        *,
        batch_size: int,
        micro_batch_size: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ):
        self.cfg = cfg
        self.shards = shards
        self.keys = keys  # per shard, sorted
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.start_batch = start_batch  # the next global step
        self.grid = config_grid(cfg)
        self.views_per_decode = cfg.data.views_per_decode
        self.plan = plan_batch(batch_size, world_size, micro_batch_size, self.views_per_decode)
        self.clips_per_step = self.plan.global_clips
        clips = sum(len(k) for k in keys)
        self.steps_per_epoch = clips // self.clips_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{clips} clips cannot fill one global batch of {batch_size} samples ({self.clips_per_step} clips x "
                f"{self.views_per_decode} views): lower the batch size"
            )
        self.batches_per_epoch = self.steps_per_epoch * self.plan.accumulation  # this rank's micro-batches
        # What a checkpointed position depends on (not the world size: the position is global).
        # Every batch carries it (it travels to the checkpoint), so it is built once here; the
        # shard list goes in as a digest, not 10^4 names.
        names = "\n".join(shard_name(s) for s in shards)
        self._identity = {
            "batch_size": batch_size,
            "views_per_decode": self.views_per_decode,
            "seed": cfg.data.seed,
            "shuffle_buffer": cfg.data.shuffle_buffer,
            "num_shards": len(shards),
            "shards_sha256": hashlib.sha256(names.encode()).hexdigest(),
            "samples": clips,
        }
        self._order: list[tuple[int, str]] = []
        self._order_epoch = -1

    def load_samples(self, shard: int, key: str, epoch: int) -> list[dict]:
        """The clip's views_per_decode samples of this epoch."""
        raise NotImplementedError

    def on_decode_error(self, key: str, error: Exception) -> str:
        """A clip that failed to load (BAD_CLIP_ERRORS) with bad-clip replacement off: return the
        reason to skip it with, or raise."""
        raise NotImplementedError

    replaces_bad_clips = False  # stage 2 with data.max_bad_fraction > 0

    def epoch_order(self, epoch: int) -> list[tuple[int, str]]:
        """Every clip of the epoch, (shard, key), in the epoch's order: the global batches are its blocks."""
        # every batch of an epoch needs this list: build it once per epoch, not once per batch
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self._epoch_order(epoch), epoch
        return self._order

    def _epoch_order(self, epoch: int) -> list[tuple[int, str]]:
        rng = sample_rng(self.cfg.data.seed, "", epoch, "epoch-order")
        order: list[tuple[int, str]] = []
        for s in rng.permutation(len(self.shards)):
            keys = self.keys[s]
            order.extend((int(s), keys[i]) for i in rng.permutation(len(keys)))
        return buffer_shuffle(order, self.cfg.data.shuffle_buffer, rng)

    def step_share(self, g: int) -> list[tuple[int, tuple[int, str]]]:
        """(slot in the global batch, (shard, key)) of the clips this rank takes in global step g."""
        s = g % self.steps_per_epoch
        block = self.epoch_order(g // self.steps_per_epoch)[s * self.clips_per_step : (s + 1) * self.clips_per_step]
        return [(slot, block[slot]) for slot in range(self.rank, len(block), self.world_size)]

    def epoch_samples(self, epoch: int) -> list[tuple[int, str]]:
        """This rank's clips of the epoch, in the order it trains on them."""
        first = epoch * self.steps_per_epoch
        return [clip for g in range(first, first + self.steps_per_epoch) for _, clip in self.step_share(g)]

    def state_dict(self, next_batch: int | None = None) -> dict:
        """The position (next global step), and what must match for that position to mean the same
        samples. world_size and rank say who wrote it; a resume does not need them to match."""
        g = self.start_batch if next_batch is None else next_batch
        return {"next_batch": g, "samples_seen": g * self.batch_size, "world_size": self.world_size,
                "rank": self.rank, **self._identity}

    def at(self, state: dict | None) -> "ShardedSamples":
        """This stream from a checkpointed position (None: from its start_batch)."""
        if state is not None:
            self.load_state_dict(state)
        return self

    def load_state_dict(self, state: dict) -> None:
        for field, mine in self._identity.items():
            if state.get(field) != mine:
                raise LoaderStateMismatch(
                    f"cannot resume the loader exactly: the checkpoint's loader had {field}={state.get(field)!r} "
                    f"but this run has {field}={mine!r} (start a new run folder to change it)"
                )
        self.start_batch = int(state["next_batch"])

    def sample(self, key: str, view: int, crop: torch.Tensor, flip: bool, mask_epoch: int) -> dict:
        masks = sample_masks(self.cfg.masking.generators, self.grid, seed=self.cfg.data.seed, key=key, view=view, epoch=mask_epoch)
        return {"key": key, "view": view, "crop": crop, "flip": flip, "masks": masks}

    def decoded_views(self, shard: int, key: str, views: list[int]) -> list[tuple[torch.Tensor, bool, str]]:
        """(uint8 crop box, flip, clip hash) per view, from one decode of the clip's video."""
        member = video_member(self.indexes[shard].get(key, {}))
        video = read_member(self.shards[shard], member) if member else b""
        return load_crops(video, self.cfg.data, key=key, views=views)

    def replacement(self, g: int, slot: int, failed: dict) -> tuple[list[dict], list[dict]]:
        """Samples for a global-batch slot whose clip failed: another clip of the epoch, drawn by
        (seed, epoch, step, slot, attempt) alone. Returns them and every clip that failed on the way."""
        epoch = g // self.steps_per_epoch
        order, bad = self.epoch_order(epoch), [failed]
        for attempt in range(REPLACEMENT_TRIES):
            rng = sample_rng(self.cfg.data.seed, "", epoch, f"replace-{g}-{slot}-{attempt}")
            shard, key = order[int(rng.integers(len(order)))]
            try:
                samples = self.load_samples(shard, key, epoch)
            except BAD_CLIP_ERRORS as e:
                bad.append({"key": key, "reason": str(e)})
                continue
            bad[0] = bad[0] | {"replaced_by": key}
            return samples, bad
        raise ReplacementsFailed(
            f"{REPLACEMENT_TRIES + 1} clips in a row failed for slot {slot} of global step {g}: "
            + "; ".join(f"{b['key']}: {b['reason']}" for b in bad)
        )

    def batch(self, i: int) -> dict:
        """This rank's micro-batch i: micro-batch i % accumulation of global step i // accumulation."""
        g, j = divmod(i, self.plan.accumulation)
        epoch = g // self.steps_per_epoch
        picks = split_evenly(self.step_share(g), self.plan.accumulation)[j]
        samples, skipped, bad = [], [], []
        for slot, (s, k) in picks:
            try:
                samples += self.load_samples(s, k, epoch)
            except BAD_CLIP_ERRORS as e:
                if not self.replaces_bad_clips:
                    skipped.append(f"{k}: {self.on_decode_error(k, e)}")
                    continue
                got, failed = self.replacement(g, slot, {"key": k, "reason": str(e)})
                samples += got
                bad += failed
                for b in failed:
                    log.warning("bad clip %s (%s)%s", b["key"], b["reason"],
                                f": replaced by {b['replaced_by']}" if "replaced_by" in b else "")
        if not samples:
            raise VideoDecodeError(f"every sample of batch {g} failed to decode: {skipped}")
        return collate(samples, epoch=epoch, index=g) | {
            "skipped": skipped,
            "bad": bad,
            "micro": j,
            "micro_batches": self.plan.accumulation,
            "planned": len(picks) * self.views_per_decode,  # samples before any skip: the micro-batch's weight
            "loader_state": self.state_dict(g + 1),
        }

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        first = i = self.start_batch * self.plan.accumulation
        while True:
            # counted from the first: the DataLoader takes worker 0's first item first, on a resume too
            if (i - first) % workers == worker:
                yield self.batch(i)
            i += 1


class ClipStream(ShardedSamples):
    """Stage 1: every video of the shards; views epoch * k + j (fresh crops per pass), masks of
    epoch 0's draw per view. A video that fails to decode is skipped with its reason in the batch."""

    def __init__(self, cfg: Config, shards: list[str], **position):
        self.indexes = [index_shard(s) for s in shards]
        super().__init__(cfg, shards, [sorted(k for k, m in idx.items() if video_member(m)) for idx in self.indexes], **position)

    def load_samples(self, shard: int, key: str, epoch: int) -> list[dict]:
        views = [epoch * self.views_per_decode + j for j in range(self.views_per_decode)]
        return [self.sample(key, v, box, flip, 0) for v, (box, flip, _) in zip(views, self.decoded_views(shard, key, views))]

    def on_decode_error(self, key: str, error: Exception) -> str:
        return str(error)  # stage 1 trains on what decodes; extraction records the rest


class TargetStream(ShardedSamples):
    """Stage 2: the samples a target store holds, each with its stored teacher tokens. From video,
    the clip must hash to what the teacher saw; from the pixel cache, the pixels are what the
    teacher saw (their checksum is checked). Fresh masks per epoch unless masking.fresh_per_epoch=false."""

    def __init__(self, cfg: Config, shards: list[str], *, store: str, **position):
        self.store_path = store
        target_store = self._store = TargetStore(store)
        self.from_pixels = cfg.data.stage2_input == "pixels"
        if self.from_pixels and not target_store.has_pixels:
            raise ValueError(
                f"data.stage2_input=pixels, but target store {store} has no pixel cache: "
                "extract it with extract.pixel_cache=true, or train with data.stage2_input=video"
            )
        # the pixel cache replaces the videos: their shards are not even opened
        self.indexes = [] if self.from_pixels else [index_shard(s) for s in shards]
        self.views_per_clip = int(target_store.meta["views_per_clip"])
        if cfg.data.views_per_decode > self.views_per_clip:
            raise ValueError(
                f"data.views_per_decode={cfg.data.views_per_decode}, but target store {store} holds "
                f"{self.views_per_clip} view(s) per clip (extract.views_per_clip): a decode can serve at most that many"
            )
        missing = [shard_name(s) for s in shards if shard_name(s) not in target_store.shards]
        if missing:
            raise FileNotFoundError(f"target store {store} has no committed shard for source shard(s) {missing}")
        for s in shards:
            target_store.check_identity(shard_name(s))
        self.manifests = [target_store.manifest(shard_name(s)) for s in shards]
        # only samples the teacher saw: the store's errors table holds the rest
        self.stored_views: list[dict[str, list[int]]] = []
        for m in self.manifests:
            views: dict[str, list[int]] = {}
            for k, v in sorted(m):
                views.setdefault(k, []).append(v)
            self.stored_views.append(views)
        partial = sum(len(v) < self.views_per_clip for views in self.stored_views for v in views.values())
        if partial:
            log.warning(
                "%d clip(s) of store %s have fewer than %d stored views (the others failed to decode at "
                "extraction, see its errors table); they cycle through the views they have",
                partial, store, self.views_per_clip,
            )
        super().__init__(cfg, shards, [sorted(v) for v in self.stored_views], **position)

    def views_for(self, shard: int, key: str, epoch: int) -> list[int]:
        stored = self.stored_views[shard][key]
        k = self.views_per_decode
        return [stored[(epoch * k + j) % len(stored)] for j in range(k)]

    def load_samples(self, shard: int, key: str, epoch: int) -> list[dict]:
        views = self.views_for(shard, key, epoch)
        rows = [self.manifests[shard][(key, v)] for v in views]
        boxes = [self.crop_from_pixel_cache(row) for row in rows] if self.from_pixels else self.crops_from_video(shard, key, rows)
        mask_epoch = epoch if self.cfg.masking.fresh_per_epoch else 0
        samples = []
        for row, box in zip(rows, boxes):
            stored = self._store.latents(row["shard"], row["row"])
            check_row(stored, row, self.store_path)
            targets = torch.from_numpy(np.ascontiguousarray(stored))  # the store's dtype: cast on the device
            samples.append(self.sample(key, row["view"], box, bool(row["flip"]), mask_epoch) | {"targets": targets})
        return samples

    def crop_from_pixel_cache(self, row: dict) -> torch.Tensor:
        """The stored crop box (checksum-checked): the uint8 pixels the teacher's actor received."""
        return torch.from_numpy(self._store.pixels(row["shard"], row))

    def crops_from_video(self, shard: int, key: str, rows: list[dict]) -> list[torch.Tensor]:
        """The rows' crop boxes decoded again from the source shard, each checked against the clip hash its teacher saw."""
        boxes = []
        for row, (box, _, digest) in zip(rows, self.decoded_views(shard, key, [r["view"] for r in rows])):
            if row["clip_hash"] != digest:
                raise ClipHashMismatch(
                    f"clip hash mismatch for key {key!r} view {row['view']} of shard {shard_name(self.shards[shard])}: "
                    f"the store's teacher saw {row['clip_hash'][:16]}..., this decode gives {digest[:16]}... "
                    f"(different decoder build, edited video, or the wrong shard)"
                )
            boxes.append(box)
        return boxes

    @property
    def replaces_bad_clips(self) -> bool:
        return self.cfg.data.max_bad_fraction > 0

    def on_decode_error(self, key: str, error: Exception) -> str:
        # the teacher decoded it: failing now means the bytes changed
        if isinstance(error, ClipHashMismatch):
            raise error  # its message names the clip
        raise VideoDecodeError(
            f"clip {key!r} no longer decodes ({error}), but its teacher decoded it: the video changed "
            "(data.max_bad_fraction > 0 trains past a few such clips)"
        ) from None


def collate(samples: list[dict], *, epoch: int, index: int) -> dict:
    out = {
        "keys": [s["key"] for s in samples],
        "views": [s["view"] for s in samples],
        "crops": [s["crop"] for s in samples],  # uint8 [T, h, w, 3] each, h and w per sample
        "flips": torch.tensor([s["flip"] for s in samples]),
        "masks": collate_masks([s["masks"] for s in samples]),
        "epoch": epoch,
        "index": index,
    }
    if "targets" in samples[0]:
        out["targets"] = torch.stack([s["targets"] for s in samples])  # [B, N, D], the store's dtype
    return out


class WorkerLoader(DataLoader):
    """A DataLoader whose persistent workers can be stopped now (`close`) rather than when it is
    collected. They ignore SIGTERM (below), and Python's exit sends daemon children SIGTERM, then waits
    for them: a loader still referenced at exit (by a reference cycle, say) would hang its process
    there for ever. `make demo` did, after printing its summary."""

    def close(self) -> None:
        iterator = self._iterator  # where DataLoader keeps its persistent workers between passes
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            if getattr(iterator, "_worker_pids_set", False):
                # The workers are being stopped: one that dies on its way out (a decoder's threads can abort
                # the process at exit) is no failure, but DataLoader's SIGCHLD watch would raise it here.
                signal_handling._remove_worker_pids(id(iterator))
                iterator._worker_pids_set = False
            iterator._shutdown_workers()
        self._iterator = None


def make_loader(dataset: ShardedSamples, num_workers: int, *, pin_memory: bool = False) -> WorkerLoader:
    """pin_memory: page-locked batches (crops, masks, targets), for training on CUDA: the step's
    copies to the GPU then run asynchronously (salt/devices.py: to_device). Workers ignore the
    preemption signals: a signal sent to the whole process group is the training process's to
    handle (salt/train/preemption.py), and a worker killed by it would fail the step it must finish."""
    return WorkerLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )


# salt/train/preemption.py's SIGNALS (this floor does not import the training code)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _worker_init(worker_id: int) -> None:
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
