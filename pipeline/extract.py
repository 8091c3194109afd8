"""The extraction job: frozen teacher over WebDataset shards -> target store, with Ray Data.

Start. The source shards' sizes and sha256 (store.json's record of them) come from the split
folder's dataset index (pipeline/dataset_index.py), made once where the folder has none: no
serial pass over the dataset before the first actor starts. Each decode task checks the bytes it
reads against the index and refuses a shard that changed since, naming it.

Graph: one row per source shard -> decode (CPU tasks, `flat_map`: one row per (key, view)) ->
teacher forward (actor pool, `map_batches` with `ActorPoolStrategy`), whose output rows carry
their latents (and, with extract.pixel_cache, the encoded crops) -> the driver, which takes Ray
Data's output blocks by reference (`iter_internal_ref_bundles`), reads only their small columns
(a Ray task next to each block: pipeline/store/parts.py: block_rows) and hands each complete
shard's rows, naming their blocks, to a Ray task that commits it. No latent or pixel byte passes
through the driver, and none is written to storage before its shard's commit writes it once.

Ray Data neither keeps one output per input file nor promises a task runs once, so every row
carries its shard, its position in the shard and the shard's row count: the driver de-duplicates
by (key, view) (first row wins, and its block is the one read), and starts a shard's commit as
soon as all of its rows (extracted or failed) are in, with at most `commits_in_flight` at once.
Committed shards are skipped on a rerun, so a killed job resumes where it stopped. What lands on
disk (store.json, commits, the store-level tables) is pipeline/store/'s.
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
from pipeline.dataset_index import ShardChangedError, ensure_index, split_folder
from pipeline.shards import list_shards, read_shard, shard_name
from pipeline.store import pixel_codec
from pipeline.store.layout import committed_shards, row_crc32, store_bytes
from pipeline.store.parts import block_rows, commit_from_blocks, commit_rows
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


def commits_in_flight(cfg: Config, resources: dict[str, float]) -> int:
    """Shard commits running at once: extract.commits_in_flight, or (0) sized from the cluster.

    Each commit holds one shard's latents (and pixels) in a worker's memory and spends its time
    writing, so more can run than there are cores to spare. Up to every actor may finish a shard
    at about the same moment: two per actor keep each finished shard from waiting on the one
    before, at least 4 (what one actor on a laptop needs), at most one per CPU a commit task takes."""
    if cfg.extract.commits_in_flight:
        return cfg.extract.commits_in_flight
    per_commit = max(cfg.extract.decode_num_cpus, 0.01)
    return max(4, min(2 * cfg.extract.num_actors, int(resources.get("CPU", 1) / per_commit)))


def decode_shard(row: dict, *, data_cfg: dict, views: int) -> Iterator[dict]:
    """One source shard -> one row per (key, view): the clip's crop box as uint8 [T, h, w, 3] (the
    teacher's actor resizes and normalises it on its device), or the reason it has none. A shard
    without samples gives one row with shard_total 0, so that it too is committed (empty)."""
    cfg = from_dict(DataConfig, data_cfg)
    # one read of the whole shard, checked against the index's record (the driver put it in the row)
    samples = read_shard(row["path"], {"bytes": row["bytes"], "sha256": row["sha256"]} if "sha256" in row else None)
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
    `teacher_forward` on each batch of decoded rows."""

    def __init__(self, teacher: str, cfg: dict, torch_threads: int):
        torch.set_num_threads(torch_threads)
        self.cfg = from_dict(Config, cfg)
        self.device = default_device()
        self.teacher = load_any_teacher(teacher, self.cfg, self.device)

    def __call__(self, batch: dict) -> dict:
        return teacher_forward(self.teacher, self.cfg, batch, self.device)


def teacher_forward(teacher: FrozenTeacher, cfg: Config, batch: dict, device: torch.device) -> dict:
    """The actor's work, callable in-process: decoded rows (uint8 crops) in, resized and normalised
    on `device` by the training step's own function (`salt/clips.py: model_clips`); the rows come
    out without their frames and with `latents` [tokens, width] in the storage dtype (zeros for a
    row that failed to decode), the writing process's pid, and with extract.pixel_cache `pixels`
    (the encoded crop box) and `pixels_crc32` (of the uncompressed crop box)."""
    ok = batch["error"] == ""
    latents = np.zeros((len(ok), teacher.num_tokens, teacher.width), cfg.extract.dtype)
    if ok.any():
        # Ray hands crops of different sizes over as an object array: a list of them, as the loaders ship
        crops = [torch.from_numpy(np.array(frames)) for frames in batch["frames"][ok]]
        clips = model_clips(crops, batch["flip"][ok], cfg.data, device)
        with torch.no_grad(), autocast(device, cfg.teacher.bf16):
            latents[ok] = teacher(clips).float().cpu().numpy().astype(cfg.extract.dtype)
    out = {k: v for k, v in batch.items() if k != "frames"}
    out["latents"] = latents
    if cfg.extract.pixel_cache:
        frames = [np.asarray(f) for f in batch["frames"]]
        out["pixels"] = np.array([pixel_codec.encode(f) if good else b"" for f, good in zip(frames, ok)], dtype=object)
        out["pixels_crc32"] = np.array([row_crc32(f) if good else 0 for f, good in zip(frames, ok)], np.int64)
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
    shards = list_shards(data, split, listing=True)  # a shard added to the folder gets indexed below
    frozen = load_any_teacher(teacher, cfg)  # a bad spec, folder or grid fails here, before any work
    # sizes and sha256 from the dataset index (made here, in parallel, where the folder has none)
    index = ensure_index(split_folder(shards[0]), shards, use_ray=not in_process)
    old = existing_meta(store_path)
    meta = provenance(cfg, data=data, split=split, teacher=frozen.identity(), shards=shards, index=index)
    store_id = open_store(store_path, meta, old)
    if frozen.projection is not None:
        write_projection(store_path, frozen.projection)
    del frozen
    for name, text in run_info_files(cfg, teacher=str(teacher), data=str(data)).items():
        fs.write_bytes(fs.join(store_path, name), text.encode())
    remove_partial_shards(store_path)
    done = set(committed_shards(store_path))
    todo = [s for s in shards if shard_name(s) not in done]
    committed = {"teacher_forward_samples": 0, "write_s": 0.0, "forward_workers": [], "shard_writers": [], "tables": {}}
    ray_address = None
    if todo and in_process:
        committed = extract_in_process(cfg, todo, teacher, store_path, store_id)
    elif todo:
        import ray
        from ray.data import ActorPoolStrategy, DataContext

        init_ray()
        ray_address = ray.get_runtime_context().gcs_address
        DataContext.get_current().enable_progress_bars = progress
        recorded = {s["name"]: s for s in meta["source"]["shards"]}
        items = [{"path": s, "shard": shard_name(s), "bytes": recorded[shard_name(s)]["bytes"],
                  "sha256": recorded[shard_name(s)]["sha256"]} for s in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(todo))
        ds = ds.flat_map(
            decode_shard,
            fn_kwargs={"data_cfg": to_dict(cfg.data), "views": cfg.extract.views_per_clip},
            num_cpus=cfg.extract.decode_num_cpus,
        )
        ds = ds.map_batches(
            TeacherForward,
            fn_constructor_kwargs={"teacher": str(teacher), "cfg": to_dict(cfg), "torch_threads": cfg.extract.actor_torch_threads},
            compute=ActorPoolStrategy(size=cfg.extract.num_actors),
            batch_size=cfg.extract.batch_size,
            batch_format="numpy",
            num_cpus=cfg.extract.actor_num_cpus,
            num_gpus=actor_gpus(),
        )
        committed = _commit_as_complete(ds, store_path, cfg.extract.storage, store_id,
                                        pixel_cache=cfg.extract.pixel_cache, num_cpus=cfg.extract.decode_num_cpus,
                                        in_flight=commits_in_flight(cfg, ray.cluster_resources()))
    manifest, errors = rebuild_tables(store_path, committed.pop("tables"))
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
    the actor's teacher_forward in batches of extract.batch_size on this process's device, then
    commit_rows. Same commits, same store (for make gpu-check on a node without Ray; no parallelism)."""
    device = default_device()
    frozen = load_any_teacher(teacher, cfg, device)
    summary = {"teacher_forward_samples": 0, "write_s": 0.0, "forward_workers": [os.getpid()], "shard_writers": [os.getpid()],
               "tables": {}}
    size = cfg.extract.batch_size
    for path in shards:
        rows = list(decode_shard({"path": path, "shard": shard_name(path)}, data_cfg=to_dict(cfg.data),
                                 views=cfg.extract.views_per_clip))
        written = []
        for start in range(0, len(rows), size):
            out = teacher_forward(frozen, cfg, numpy_batch(rows[start : start + size]), device)
            written += [{k: v[i] for k, v in out.items()} for i in range(len(out["key"]))]
        # an empty shard's one row stands for no sample: the shard commits with none (as the driver does)
        forwarded, _, seconds, tables = commit_rows(store, shard_name(path), [r for r in written if int(r["shard_total"])],
                                                    cfg.extract.storage, store_id, cfg.extract.pixel_cache)
        summary["teacher_forward_samples"] += forwarded
        summary["write_s"] += seconds
        summary["tables"][shard_name(path)] = tables
    return summary


def _cause(error: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrappers (RayTaskError, Ray Data's UserCodeException),
    so that a shard refused in a decode task ends the job in one line naming it."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and not any(current is s for s in seen) and len(seen) < 32:  # wrappers may point at each other
        if isinstance(current, ShardChangedError):
            return current
        seen.append(current)
        current = getattr(current, "cause", None) or current.__cause__
    return error


def _commit_as_complete(
    ds, store: str, fmt: StorageFormat, store_id: str, *, pixel_cache: bool = False, num_cpus: float = 1.0,
    in_flight: int = 4,
) -> dict:
    """Gather rows per shard (exactly once per (key, view)) and commit each shard when whole, in a
    Ray task (`num_cpus` each, at most `in_flight` at once) that reads the latents from the output
    blocks its rows name. The driver holds block references, never their bytes.

    Returns the rows extracted, the seconds the commit tasks took in all, the pids of the
    processes that ran the teacher and wrote shards, and each committed shard's tables (manifest,
    errors and store id: the store-level tables are built from them without reading the shards)."""
    import ray

    # not retried: a failed commit leaves no marker, so a rerun of the job redoes the shard
    commit = ray.remote(commit_from_blocks).options(num_cpus=num_cpus, max_retries=0)
    small = ray.remote(block_rows).options(num_cpus=0)  # reads a few columns; runs next to its block
    pending: dict[str, dict[tuple[str, int], dict]] = {}
    blocks: dict[str, dict] = {}  # shard -> block ref -> its index in the list the commit gets
    summaries: dict = {}  # block_rows task -> block ref
    commits: dict = {}  # commit task -> shard
    done: set[str] = set()
    summary = {"teacher_forward_samples": 0, "write_s": 0.0, "forward_workers": set(), "shard_writers": set(), "tables": {}}

    def finish(ref) -> None:
        shard = commits.pop(ref)
        try:
            forwarded, pid, seconds, tables = ray.get(ref)
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
        summary["tables"][shard] = tables

    def start_commit(shard: str) -> None:
        while len(commits) >= in_flight:
            finish(ray.wait(list(commits), num_returns=1)[0][0])
        refs = blocks.pop(shard)
        commits[commit.remote(store, shard, list(pending.pop(shard).values()), list(refs), fmt, store_id, pixel_cache)] = shard
        done.add(shard)

    def take(rows: list[dict], block) -> None:
        for row in rows:
            shard = str(row["shard"])
            summary["forward_workers"].add(int(row["writer_pid"]))
            if shard in done:  # a re-run task's copy of a row already committed
                continue
            got = pending.setdefault(shard, {})
            refs = blocks.setdefault(shard, {})
            total = int(row["shard_total"])
            sample = (str(row["key"]), int(row["view"]))
            if total and sample not in got:  # an empty shard's one row stands for no sample: it commits with none
                got[sample] = row | {"block": refs.setdefault(block, len(refs))}
            if len(got) == total:
                start_commit(shard)

    def drain(wait_all: bool) -> None:
        while summaries:
            ready, _ = ray.wait(list(summaries), num_returns=len(summaries) if wait_all else 1, timeout=None if wait_all else 0)
            if not ready:
                return
            for ref in ready:
                take(ray.get(ref), summaries.pop(ref))

    bundles = ds.iter_internal_ref_bundles()
    try:
        for bundle in bundles:
            for entry, part in zip(bundle.blocks, bundle.slices):
                start, end = (part.start_offset, part.end_offset) if part is not None else (0, None)
                summaries[small.remote(entry.ref, start, end)] = entry.ref
            drain(wait_all=False)
        drain(wait_all=True)
        while commits:
            finish(ray.wait(list(commits), num_returns=1)[0][0])
    except Exception as e:
        cause = _cause(e)
        if cause is e:
            raise
        raise cause from None  # one line: the shard and why (the job's entry prints it)
    finally:
        if hasattr(bundles, "close"):
            bundles.close()  # stops Ray Data's executor now
        if commits:  # failing: let the other commits end (each is whole or nothing)
            ray.wait(list(commits), num_returns=len(commits))
    if pending:
        raise RuntimeError(f"Ray Data finished with incomplete shards {sorted(pending)}: rows were lost")
    return summary | {key: sorted(summary[key]) for key in ("forward_workers", "shard_writers")}
