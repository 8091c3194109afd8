"""A labelled split in memory: clips (V views per video) and an integer label per task.

For the probe, which reads a split many times (once per encoder and per task) but
can afford to decode it only once. Window v of a video is the frames every stage would
see for (seed, key, v) (`pipeline.video.decode`); the crops are evaluation crops, never flipped.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from tqdm import tqdm

from pipeline import fs
from pipeline.shards import index_shard, iter_shard, list_shards
from pipeline.video import VideoDecodeError, augment, decode_views, spatial_crops
from salt.config import DataConfig


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


def load_labelled(
    data: str, split: str, cfg: DataConfig, *, views: int = 1, crops: int = 1, tasks: list[str] | None = None,
    progress: bool = True,
) -> LabelledClips:
    """Decodes every video of `data/<split>` once per temporal window (`views`: the frames of
    (seed, key, view)) and cuts `crops` spatial crops from each (`spatial_crops`, in place of
    the config's random crop and flip); skips (and lists) videos that fail."""
    if not fs.isdir(fs.join(str(data).rstrip("/"), split)):
        # list_shards would fall back to the whole folder: train and val would be the same clips
        raise FileNotFoundError(f"DATA={data!r} has no {split}/ folder: the probe needs separate train/ and val/ shards")
    names = read_class_names(data)
    tasks = tasks or list(names)  # None or empty: every task of labels.json
    unknown = [t for t in tasks if t not in names]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; labels.json of {data} has {', '.join(names)}")
    keys: list[str] = []
    clips: list[torch.Tensor] = []
    labels: dict[str, list[int]] = {t: [] for t in tasks}
    errors: list[dict] = []
    shards = list_shards(data, split)
    total = sum(len(index_shard(s)) for s in shards) if progress else None  # tar headers only: cheap
    bar = tqdm(total=total, desc=f"decode {split}", unit="video", disable=not progress, leave=False)
    for shard in shards:
        for sample in iter_shard(shard):
            bar.update()
            try:
                windows = decode_views(sample.video, cfg, key=sample.key, views=range(views))
            except VideoDecodeError as e:
                errors.append({"key": sample.key, "reason": str(e)})
                continue
            for task in tasks:
                label = label_of(sample.meta, task, key=sample.key)
                if not 0 <= label < len(names[task]):
                    raise ValueError(f"sample {sample.key!r}: {task} label {label} outside 0..{len(names[task]) - 1}")
                labels[task].append(label)
            keys.append(sample.key)
            for frames, spec in windows:
                for box in spatial_crops(frames.shape[1], frames.shape[2], crops):
                    clips.append(augment(frames, dataclasses.replace(spec, crop=box, flip=False), cfg))
    bar.close()
    if not keys:
        raise ValueError(f"no decodable videos in {data}/{split} ({len(errors)} failed)")
    return LabelledClips(
        keys=keys,
        clips=torch.stack(clips),
        video=torch.arange(len(keys)).repeat_interleave(views * crops),
        labels={t: torch.tensor(v) for t, v in labels.items()},
        class_names={t: names[t] for t in tasks},
        views=views * crops,
        errors=errors,
    )
