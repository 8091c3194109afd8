"""The extraction job: frozen teacher over WebDataset shards -> target store, with Ray Data.

Graph: one row per source shard -> decode (CPU tasks, `flat_map`: one row per
(key, view)) -> teacher forward (actor pool, `map_batches` with `ActorPoolStrategy`),
which writes its latents (and, with extract.pixel_cache, the encoded crops) to part
files under the store -> the driver, which sees only small rows naming those parts and
hands each complete shard to a Ray task that writes it. No latent or pixel byte passes
through the driver, so its memory and bandwidth do not bound the job.

Ray Data neither keeps one output per input file nor promises a task runs once, so
every row carries its shard, its position in the shard and the shard's row count:
the driver de-duplicates by (key, view) (first row wins, and its part is the one read),
and starts a shard's commit as soon as all of its rows (extracted or failed) are in.
Committed shards are skipped on a rerun, so a killed job resumes where it stopped.
What lands on disk (store.json, part files, commits) is pipeline/store/'s.
"""

from __future__ import annotations

import json
import os
import time
from typing import Iterator

import numpy as np
import torch

from pipeline import fs
from pipeline.cluster import actor_gpus, init_ray
from pipeline.shards import iter_shard, list_shards, shard_name
from pipeline.store.layout import committed_shards, parts_dir, store_bytes
from pipeline.store.parts import commit_from_parts, write_parts
from pipeline.store.provenance import existing_meta, open_store, provenance
from pipeline.store.write import rebuild_tables, remove_partial_shards, write_projection
from pipeline.teacher_cache import load_any_teacher
from pipeline.video import VideoDecodeError, clip_hash, crop, decode
from salt.clips import model_clips
from salt.config import Config, DataConfig, from_dict, to_dict
from salt.runinfo import run_info_files
from salt.models.teachers import FrozenTeacher
from salt.storage import StorageFormat
from salt.devices import autocast, default_device


# shard commits running at once: each holds a whole shard's latents (and pixels) in a worker's
# memory; a few are enough to keep writing off the forward pass's critical path
COMMITS_IN_FLIGHT = 4


def decode_shard(row: dict, *, data_cfg: dict, views: int) -> Iterator[dict]:
    """One source shard -> one row per (key, view): the clip's crop box as uint8 [T, h, w, 3] (the
    teacher's actor resizes and normalises it on its device), or the reason it has none. A shard
    without samples gives one row with shard_total 0, so that it too is committed (empty)."""
    cfg = from_dict(DataConfig, data_cfg)
    samples = list(iter_shard(row["path"]))
    total = len(samples) * views
    empty = np.zeros((cfg.frames, 1, 1, 3), np.uint8)

    def blank(order: int, key: str, view: int) -> dict:
        return {
            "shard": row["shard"],
            "shard_total": total,
            "order": order,
            "key": key,
            "view": view,
            "error": "",
            "clip_hash": "",
            "frame_indices": np.zeros(cfg.frames, np.int32),
            "crop": np.zeros(4, np.int32),
            "flip": False,
        }

    if not samples:  # a shard of no samples still needs a row to reach the driver, which commits it empty
        yield blank(0, "", 0) | {"frames": empty, "error": "source shard has no samples"}
    for position, sample in enumerate(samples):
        for view in range(views):
            out = blank(position * views + view, sample.key, view)
            try:
                if not sample.video:
                    raise VideoDecodeError("sample has no video member")
                frames, spec = decode(sample.video, cfg, key=sample.key, view=view)
                out |= {
                    "frames": np.ascontiguousarray(crop(frames, spec)),
                    "clip_hash": clip_hash(frames),
                    "frame_indices": np.asarray(spec.frame_indices, np.int32),
                    "crop": np.asarray(spec.crop, np.int32),
                    "flip": spec.flip,
                }
            except VideoDecodeError as e:
                out |= {"frames": empty, "error": str(e)}
            yield out


class TeacherForward:
    """Actor: holds the frozen teacher (any adapter, projected if the config says so) and runs
    `forward_and_write` on each batch of decoded rows."""

    def __init__(self, teacher: str, cfg: dict, torch_threads: int, store: str):
        torch.set_num_threads(torch_threads)
        self.cfg = from_dict(Config, cfg)
        self.device = default_device()
        self.teacher = load_any_teacher(teacher, self.cfg, self.device)
        self.store = store

    def __call__(self, batch: dict) -> dict:
        return forward_and_write(self.teacher, self.cfg, self.store, batch, self.device)


def forward_and_write(teacher: FrozenTeacher, cfg: Config, store: str, batch: dict, device: torch.device) -> dict:
    """The actor's work, callable in-process: decoded rows (uint8 crops) in, resized and normalised
    on `device` by the training step's own function (`salt/clips.py: model_clips`); latents (in the
    storage dtype) and, with extract.pixel_cache, the encoded crops go to part files under the store
    (one per shard in the batch); the rows, naming their parts, come out."""
    ok = batch["error"] == ""
    latents = np.zeros((len(ok), teacher.num_tokens, teacher.width), cfg.extract.dtype)
    if ok.any():
        # Ray hands crops of different sizes over as an object array: a list of them, as the loaders ship
        crops = [torch.from_numpy(np.array(frames)) for frames in batch["frames"][ok]]
        clips = model_clips(crops, batch["flip"][ok], cfg.data, device)
        with torch.no_grad(), autocast(device, cfg.teacher.bf16):
            latents[ok] = teacher(clips).float().cpu().numpy().astype(cfg.extract.dtype)
    crops = [np.asarray(f) for f in batch["frames"]] if cfg.extract.pixel_cache else None
    out = {k: v for k, v in batch.items() if k != "frames"}
    out["part"], out["part_row"] = write_parts(store, batch["shard"], batch["order"], latents, crops)
    out["writer_pid"] = np.full(len(ok), os.getpid())
    return out


def numpy_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows of decode_shard -> the batch Ray Data hands an actor (batch_format="numpy"): one array
    per column, the crops (sizes differ) as an object array. For the actor's work in one process."""
    out = {}
    for name in rows[0]:
        if name == "frames":
            out[name] = np.empty(len(rows), dtype=object)
            for i, r in enumerate(rows):  # one by one: equal-sized crops would otherwise stack into one array
                out[name][i] = r[name]
        else:
            out[name] = np.array([r[name] for r in rows])
    return out


def extract_targets(
    cfg: Config, *, data: str, teacher: str, store: str, split: str = "train", progress: bool = True,
    in_process: bool = False,
) -> dict:
    """Run (or resume) extraction with the teacher a spec names (a run folder, hf-videomae:<folder>,
    hf-vjepa2:<folder>); returns a summary of what this call did. `in_process`: the same work
    without Ray, in this process (`extract_in_process`), for a machine without Ray."""

    t0 = time.perf_counter()
    store_path = str(store).rstrip("/")
    shards = list_shards(data, split)
    frozen = load_any_teacher(teacher, cfg)  # a bad spec, folder or grid fails here, before any work
    old = existing_meta(store_path)
    meta = provenance(cfg, data=data, split=split, teacher=frozen.identity(), shards=shards,
                      recorded=old["source"]["shards"] if old else [])
    store_id = open_store(store_path, meta, old)
    if frozen.projection is not None:
        write_projection(store_path, frozen.projection)
    del frozen
    for name, text in run_info_files(cfg, teacher=str(teacher), data=str(data)).items():
        fs.write_bytes(fs.join(store_path, name), text.encode())
    remove_partial_shards(store_path)
    done = set(committed_shards(store_path))
    todo = [s for s in shards if shard_name(s) not in done]
    committed = {"teacher_forward_samples": 0, "write_s": 0.0, "part_writers": [], "shard_writers": []}
    ray_address = None
    if todo and in_process:
        committed = extract_in_process(cfg, todo, teacher, store_path, store_id)
    elif todo:
        import ray
        from ray.data import ActorPoolStrategy, DataContext

        init_ray()
        ray_address = ray.get_runtime_context().gcs_address
        DataContext.get_current().enable_progress_bars = progress
        ds = ray.data.from_items([{"path": s, "shard": shard_name(s)} for s in todo], override_num_blocks=len(todo))
        ds = ds.flat_map(
            decode_shard,
            fn_kwargs={"data_cfg": to_dict(cfg.data), "views": cfg.extract.views_per_clip},
            num_cpus=cfg.extract.decode_num_cpus,
        )
        ds = ds.map_batches(
            TeacherForward,
            fn_constructor_kwargs={"teacher": str(teacher), "cfg": to_dict(cfg), "torch_threads": cfg.extract.actor_torch_threads,
                                   "store": store_path},
            compute=ActorPoolStrategy(size=cfg.extract.num_actors),
            batch_size=cfg.extract.batch_size,
            batch_format="numpy",
            num_cpus=cfg.extract.actor_num_cpus,
            num_gpus=actor_gpus(),
        )
        committed = _commit_as_complete(ds, store_path, cfg.extract.storage, store_id,
                                        pixel_cache=cfg.extract.pixel_cache, num_cpus=cfg.extract.decode_num_cpus)
    manifest, errors = rebuild_tables(store_path)
    missing = sorted({shard_name(s) for s in shards} - set(committed_shards(store_path)))
    if missing:
        raise RuntimeError(f"extraction ended with uncommitted shards {missing}; rerun to resume")
    summary = {
        "samples": manifest.num_rows,
        "errors": errors.num_rows,
        "shards": len(shards),
        "shards_extracted_now": len(todo),
        "bytes": store_bytes(store_path),
        "wall_s": time.perf_counter() - t0,
        **committed,
        "ray_address": ray_address,
    }
    metrics = fs.join(store_path, "metrics.jsonl")  # appended by rewriting: object stores cannot append
    old = fs.read_bytes(metrics) if fs.exists(metrics) else b""
    fs.write_bytes(metrics, old + (json.dumps(summary) + "\n").encode())
    return summary


def extract_in_process(cfg: Config, shards: list[str], teacher: str, store: str, store_id: str) -> dict:
    """The Ray graph's work in this process, shard by shard and in the same code: decode_shard,
    the actor's forward_and_write in batches of extract.batch_size on this process's device,
    then commit_from_parts. Same part files, same commits, same store (for make gpu-check on a
    node without Ray; no parallelism)."""
    device = default_device()
    frozen = load_any_teacher(teacher, cfg, device)
    summary = {"teacher_forward_samples": 0, "write_s": 0.0, "part_writers": [os.getpid()], "shard_writers": [os.getpid()]}
    size = cfg.extract.batch_size
    for path in shards:
        rows = list(decode_shard({"path": path, "shard": shard_name(path)}, data_cfg=to_dict(cfg.data),
                                 views=cfg.extract.views_per_clip))
        written = []
        for start in range(0, len(rows), size):
            out = forward_and_write(frozen, cfg, store, numpy_batch(rows[start : start + size]), device)
            written += [{k: v[i] for k, v in out.items()} for i in range(len(out["key"]))]
        # an empty shard's one row stands for no sample: the shard commits with none (as the driver does)
        forwarded, _, seconds = commit_from_parts(store, shard_name(path), [r for r in written if int(r["shard_total"])],
                                                  cfg.extract.storage, store_id, cfg.extract.pixel_cache)
        summary["teacher_forward_samples"] += forwarded
        summary["write_s"] += seconds
    return summary


def _commit_as_complete(
    ds, store: str, fmt: StorageFormat, store_id: str, *, pixel_cache: bool = False, num_cpus: float = 1.0
) -> dict:
    """Gather rows per shard (exactly once per (key, view)) and commit each shard when whole, in a
    Ray task (`num_cpus` each, at most COMMITS_IN_FLIGHT at once) that reads the parts its rows
    name. Part files are gone when this returns, whether it succeeded or not.

    Returns the rows extracted, the seconds the commit tasks took in all, and the pids of the
    processes that wrote parts and shards."""
    import ray

    # not retried: a commit killed mid-move can leave a folder that only a fresh job's
    # remove_partial_shards clears; the job fails instead and its rerun redoes the shard
    commit = ray.remote(commit_from_parts).options(num_cpus=num_cpus, max_retries=0)
    pending: dict[str, dict[tuple[str, int], dict]] = {}
    in_flight: dict = {}  # commit task -> shard
    done: set[str] = set()
    summary = {"teacher_forward_samples": 0, "write_s": 0.0, "part_writers": set(), "shard_writers": set()}

    def finish(ref) -> None:
        shard = in_flight.pop(ref)
        try:
            forwarded, pid, seconds = ray.get(ref)
        except Exception as e:
            # the worker's own exception (a full disk stays an OSError, in one line), not Ray's
            # wrapper, whose text is the remote traceback; that stays attached as its cause
            error = e.cause if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, Exception) else e
            error.add_note(f"while committing shard {shard} of target store {store}")
            if error is e:
                raise
            raise error from e
        summary["teacher_forward_samples"] += forwarded
        summary["write_s"] += seconds
        summary["shard_writers"].add(pid)

    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        for batch in batches:
            summary["part_writers"] |= {int(pid) for pid in batch["writer_pid"]}
            for i in range(len(batch["key"])):
                shard = str(batch["shard"][i])
                if shard in done:  # a re-run task's copy of a row already committed
                    continue
                rows = pending.setdefault(shard, {})
                total = int(batch["shard_total"][i])
                if total:  # an empty shard's one row stands for no sample: the shard commits with none
                    rows.setdefault((str(batch["key"][i]), int(batch["view"][i])), {k: batch[k][i] for k in batch})
                if len(rows) == total:
                    while len(in_flight) >= COMMITS_IN_FLIGHT:
                        finish(ray.wait(list(in_flight), num_returns=1)[0][0])
                    in_flight[commit.remote(store, shard, list(pending.pop(shard).values()), fmt, store_id, pixel_cache)] = shard
                    done.add(shard)
        while in_flight:
            finish(ray.wait(list(in_flight), num_returns=1)[0][0])
    finally:
        batches.close()  # stops Ray Data's executor now, so no actor writes parts after the removal below
        if in_flight:  # failing: let the other commits end (each is whole or nothing) before their parts go
            ray.wait(list(in_flight), num_returns=len(in_flight))
        fs.remove(parts_dir(store))  # also the parts of re-run tasks whose rows were duplicates
    if pending:
        raise RuntimeError(f"Ray Data finished with incomplete shards {sorted(pending)}: rows were lost")
    return summary | {key: sorted(summary[key]) for key in ("part_writers", "shard_writers")}
