"""Labelled splits for the probe: class names and labels, which frames and crops each view of a clip
gets (`ViewPlan`), and the clips themselves, streamed in batches by loader workers (`SplitBatches`).

A split is cut into units: up to `clips_per_unit` consecutive clips (tar order) of one source shard,
named `<source shard>-<n:04d>`; a unit is what one feature-store shard holds (pipeline/features.py)
and what one loader worker decodes at a time. Batches never span units, so whichever worker or rank
decodes a unit, its rows and their order are the same.

Views. View v of a clip is (window w, segment s, crop c) with v = (w * segments + s) * crops + c:
- segments = 1: window w is the frames every stage would see for (seed, key, w)
  (`pipeline.video.decode_views`), the probe's clips since the start;
- segments = S > 1: S windows evenly spaced over the video (V-JEPA 2's `num_segments`: where a
  1/S partition of the video holds a window, the window starts at the partition's start; else the
  starts spread evenly from the first frame to the last window that fits), the same for every w;
- crops: evaluation crops (`spatial_crops`: centre, or start/centre/end of the long side), never
  flipped; with `augment`, one random resized crop box per view instead, drawn from
  (seed, key, v) with the plan's crop_area / crop_aspect, never flipped.

`load_labelled` (a whole split in memory) remains for the label-trained encoders of
experiments/controls.py, which train on a few thousand small clips; the probe streams.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline import fs
from pipeline.dataset_index import ensure_index, split_folder
from pipeline.shards import index_shard, iter_shard, list_shards, read_member, shard_name, video_member
from pipeline.video import (
    SampleSpec, VideoDecodeError, augment, clip_hash, crop_box, decode_views, frame_step, spatial_crops,
)
from salt.config import DataConfig
from salt.seeds import sample_rng


@dataclasses.dataclass(frozen=True, kw_only=True)
class LabelledClips:
    keys: list[str]  # per video
    clips: torch.Tensor  # [videos * views, 3, T, S, S], the views of a video adjacent
    video: torch.Tensor  # [videos * views] index of each row's video (the softmax-averaging groups)
    labels: dict[str, torch.Tensor]  # task -> [videos]
    class_names: dict[str, list[str]]  # task -> names, in label-index order
    views: int  # rows per video: temporal windows x spatial crops
    errors: list[dict]  # {key, reason} of videos skipped because they do not decode

    def row_labels(self, task: str) -> torch.Tensor:
        """[videos * views] labels, one per clip row."""
        return self.labels[task][self.video]


def read_class_names(data: str) -> dict[str, list[str]]:
    """labels.json: task -> class names ({"appearance": [...], "motion": [...]} or {"label": [...]})."""
    path = fs.join(str(data).rstrip("/"), "labels.json")
    if not fs.exists(path):
        raise FileNotFoundError(f"DATA={data!r} has no labels.json: the probe needs labelled data")
    return json.loads(fs.read_bytes(path))


def check_tasks(names: dict[str, list[str]], tasks: list[str] | None, data: str) -> list[str]:
    """The tasks asked for (None or empty: every task of labels.json), each known to labels.json."""
    tasks = list(tasks or names)
    unknown = [t for t in tasks if t not in names]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; labels.json of {data} has {', '.join(names)}")
    return tasks


def label_of(meta: dict, task: str, *, key: str) -> int:
    """The moving-digits json holds the index under the task's name; ingested videos hold
    the class name there and the index under `<task>_index` (`label`, `label_index`)."""
    value = meta.get(task)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    index = meta.get(f"{task}_index")
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    raise ValueError(f"sample {key!r} has no integer label for task {task!r} (json keys: {sorted(meta)})")


def checked_label(meta: dict, task: str, names: dict[str, list[str]], *, key: str) -> int:
    label = label_of(meta, task, key=key)
    if not 0 <= label < len(names[task]):
        raise ValueError(f"sample {key!r}: {task} label {label} outside 0..{len(names[task]) - 1}")
    return label


def split_shards(data: str, split: str) -> list[str]:
    if not fs.isdir(fs.join(str(data).rstrip("/"), split)):
        # list_shards would fall back to the whole folder: train and val would be the same clips
        raise FileNotFoundError(f"DATA={data!r} has no {split}/ folder: the probe needs separate train/ and val/ shards")
    return list_shards(data, split)


def load_labelled(
    data: str, split: str, cfg: DataConfig, *, views: int = 1, crops: int = 1, tasks: list[str] | None = None,
    progress: bool = True,
) -> LabelledClips:
    """Decodes every video of `data/<split>` once per temporal window (`views`: the frames of
    (seed, key, view)) and cuts `crops` spatial crops from each (`spatial_crops`, in place of
    the config's random crop and flip); skips (and lists) videos that fail. The whole split in
    memory: for small sets only (the probe streams: `SplitBatches`)."""
    shards = split_shards(data, split)
    names = read_class_names(data)
    tasks = check_tasks(names, tasks, data)
    plan = ViewPlan(data=cfg, windows=views, crops=crops)
    keys: list[str] = []
    clips: list[torch.Tensor] = []
    labels: dict[str, list[int]] = {t: [] for t in tasks}
    errors: list[dict] = []
    total = sum(len(index_shard(s)) for s in shards) if progress else None  # tar headers only: cheap
    bar = tqdm(total=total, desc=f"decode {split}", unit="video", disable=not progress, leave=False)
    for shard in shards:
        for sample in iter_shard(shard):
            bar.update()
            try:
                views_of_clip = decode_plan(sample.video, plan, key=sample.key)
            except VideoDecodeError as e:
                errors.append({"key": sample.key, "reason": str(e)})
                continue
            for task in tasks:
                labels[task].append(checked_label(sample.meta, task, names, key=sample.key))
            keys.append(sample.key)
            clips += [clip for clip, _, _ in views_of_clip]
    bar.close()
    if not keys:
        raise ValueError(f"no decodable videos in {data}/{split} ({len(errors)} failed)")
    return LabelledClips(
        keys=keys,
        clips=torch.stack(clips),
        video=torch.arange(len(keys)).repeat_interleave(plan.views),
        labels={t: torch.tensor(v) for t, v in labels.items()},
        class_names={t: names[t] for t in tasks},
        views=plan.views,
        errors=errors,
    )


@dataclass(frozen=True, kw_only=True)
class ViewPlan:
    """The views of each clip of one split (module docstring): `data` is the probe's data config
    (frames, step, crop size, normalisation; never flipped), with the random resized crop's ranges
    where `augment`."""

    data: DataConfig
    windows: int = 1
    segments: int = 1
    crops: int = 1
    augment: bool = False

    def __post_init__(self):
        if self.augment and self.crops != 1:
            raise ValueError(f"an augmented view is one random crop box, not {self.crops} fixed crops")
        if self.segments > 1 and self.windows > 1 and not self.augment:
            raise ValueError(f"{self.windows} windows of the same {self.segments} evenly spaced segments would be "
                             "the same clips: more windows need augment, or segments=1")

    @property
    def views(self) -> int:
        return self.windows * self.segments * self.crops

    def view(self, window: int, segment: int, crop: int) -> int:
        return (window * self.segments + segment) * self.crops + crop

    def sample_views(self, window: int, crop: int) -> list[int]:
        """The views whose tokens, concatenated in segment order, make one sample."""
        return [self.view(window, s, crop) for s in range(self.segments)]

    def describe(self) -> dict:
        """For store.json: what each view is."""
        return {"views": self.views, "windows": self.windows, "segments": self.segments, "crops": self.crops,
                "augment": self.augment, "order": "view = (window * segments + segment) * crops + crop",
                "windows_are": "seeded (seed, key, window)" if self.segments == 1 else "evenly spaced segments",
                **({"crop_area": list(self.data.crop_area), "crop_aspect": list(self.data.crop_aspect)} if self.augment else {})}


def segment_starts(num_frames: int, span: int, segments: int) -> list[int]:
    """First frame of each of `segments` windows of `span` frames, evenly spaced (module docstring)."""
    partition = num_frames // segments
    if partition >= span:
        return [s * partition for s in range(segments)]
    slack = max(num_frames - span, 0)
    return [s * slack // (segments - 1) for s in range(segments)]


def decode_segments(video: bytes, plan: ViewPlan, *, key: str) -> list[tuple[np.ndarray, SampleSpec]]:
    """One decode -> (uint8 [T, H, W, 3] window, spec) per view of a plan with segments > 1."""
    import decord

    cfg = plan.data
    try:
        reader = decord.VideoReader(io.BytesIO(video), ctx=decord.cpu(0), num_threads=cfg.decode_threads)
        num_frames = len(reader)
        if num_frames == 0:
            raise VideoDecodeError("video has no frames")
        height, width = reader[0].shape[:2]
        step = frame_step(cfg, reader.get_avg_fps())
        windows = [tuple(min(start + i * step, num_frames - 1) for i in range(cfg.frames))
                   for start in segment_starts(num_frames, (cfg.frames - 1) * step + 1, plan.segments)]
        unique = sorted({i for w in windows for i in w})
        decoded = reader.get_batch(unique).asnumpy()
    except VideoDecodeError:
        raise
    except Exception as e:  # decord raises bare DECORDError/RuntimeError for every kind of bad file
        raise VideoDecodeError(f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}") from None
    if decoded.shape[1:] != (height, width, 3):
        raise VideoDecodeError(f"decoder returned frames of shape {decoded.shape[1:]} for a {width}x{height} video")
    position = {frame: i for i, frame in enumerate(unique)}
    frames = [decoded[[position[i] for i in w]] for w in windows]
    boxes = spatial_crops(height, width, plan.crops)
    out = []
    for w in range(plan.windows):
        for s in range(plan.segments):
            for c in range(plan.crops):
                v = plan.view(w, s, c)
                box = crop_box(height, width, cfg, sample_rng(cfg.seed, key, v, "clip")) if plan.augment else boxes[c]
                out.append((frames[s], SampleSpec(frame_indices=windows[s], crop=box, flip=False)))
    return out


def decode_plan(video: bytes, plan: ViewPlan, *, key: str) -> list[tuple[torch.Tensor, SampleSpec, str]]:
    """Every view of a clip, in view order: (model input float32 [3, T, S, S], its spec, the clip hash
    of its uncropped frames). Raises VideoDecodeError."""
    if plan.segments > 1:
        decoded = decode_segments(video, plan, key=key)
    else:
        decoded = []
        for frames, spec in decode_views(video, plan.data, key=key, views=range(plan.windows)):
            boxes = [spec.crop] if plan.augment else spatial_crops(frames.shape[1], frames.shape[2], plan.crops)
            decoded += [(frames, dataclasses.replace(spec, crop=box, flip=False)) for box in boxes]
    hashes: dict[int, str] = {}
    return [(augment(frames, spec, plan.data), spec, hashes.setdefault(id(frames), clip_hash(frames)))
            for frames, spec in decoded]


@dataclass(frozen=True)
class Unit:
    """Up to clips_per_unit consecutive clips of one source shard (module docstring)."""

    name: str
    source: str
    clips: tuple[tuple[str, object, object], ...]  # (key, video member or None, json member or None), tar order


def list_units(data: str, split: str, clips_per_unit: int) -> list[Unit]:
    """The units of a split, in order: source shards sorted, clips in tar order."""
    shards = split_shards(data, split)
    ensure_index(split_folder(shards[0]), shards)  # the dataset index (pipeline/dataset_index.py): no tar walk after
    units = []
    for source in shards:
        members = index_shard(source)
        clips = [(key, video_member(m), m.get("json")) for key, m in members.items()]
        for n, start in enumerate(range(0, len(clips), clips_per_unit)):
            units.append(Unit(f"{shard_name(source)}-{n:04d}", source, tuple(clips[start : start + clips_per_unit])))
    return units


def read_labels(
    units: list[Unit], names: dict[str, list[str]], tasks: list[str], *, keys: set[str] | None = None
) -> dict[str, dict[str, int]]:
    """key -> task -> label of the clips (those in `keys` if given), from each clip's json (read by
    its byte range, not the video)."""
    labels = {}
    for unit in units:
        for key, _, meta_member in unit.clips:
            if keys is not None and key not in keys:
                continue
            meta = json.loads(read_member(unit.source, meta_member)) if meta_member is not None else {}
            labels[key] = {t: checked_label(meta, t, names, key=key) for t in tasks}
    return labels


class SplitBatches(IterableDataset):
    """The clips of some units, decoded by loader workers: worker w of W decodes units w, w + W, ...
    Each item is one batch of at most `batch_size` rows (views) of one unit: unit, keys, views,
    clips [B, 3, T, S, S] (None when every clip of the batch failed), specs, hashes, errors
    [(key, view, reason)] of clips that did not decode (every view of such a clip), and last (the
    unit's final batch). A unit with no clips still gives one (empty, last) batch."""

    def __init__(self, units: list[Unit], plan: ViewPlan, batch_size: int):
        self.units, self.plan, self.batch_size = units, plan, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for unit in self.units[worker::workers]:
            yield from self.unit_batches(unit)

    def unit_batches(self, unit: Unit) -> Iterator[dict]:
        batch = self.empty(unit)
        for key, video_m, _ in unit.clips:
            try:
                if video_m is None:
                    raise VideoDecodeError("sample has no video member")
                views = decode_plan(read_member(unit.source, video_m), self.plan, key=key)
            except VideoDecodeError as e:
                batch["errors"] += [(key, v, str(e)) for v in range(self.plan.views)]
                continue
            for v, (clip, spec, digest) in enumerate(views):
                batch["keys"].append(key)
                batch["views"].append(v)
                batch["clips"].append(clip)
                batch["specs"].append(spec)
                batch["hashes"].append(digest)
                if len(batch["clips"]) == self.batch_size:
                    yield self.collate(batch)
                    batch = self.empty(unit)
        yield self.collate(batch) | {"last": True}

    @staticmethod
    def empty(unit: Unit) -> dict:
        return {"unit": unit.name, "keys": [], "views": [], "clips": [], "specs": [], "hashes": [], "errors": [],
                "last": False}

    @staticmethod
    def collate(batch: dict) -> dict:
        return batch | {"clips": torch.stack(batch["clips"]) if batch["clips"] else None}
