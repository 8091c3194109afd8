"""The embedded default dataset, "moving digits".

Real handwritten digits (scikit-learn's bundled 8x8 ``load_digits``) cross textured
backgrounds in a straight line. The appearance label is the digit; the motion label is the
direction of travel, which no single frame reveals, so a model must use time.
Clips are H.264 mp4s in WebDataset tar shards (``KEY.mp4`` + ``KEY.json``).
"""

from __future__ import annotations

import colorsys
import io
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import av
import numpy as np
from sklearn.datasets import load_digits
from tqdm import tqdm

from pipeline.dataset_index import entry_from_file, write_index
from pipeline.shards import write_shard

MOTIONS = ("right", "left", "down", "up")
# (row, col) step per frame of each motion class, in MOTIONS order.
_DIRECTIONS = np.array([(0, 1), (0, -1), (1, 0), (-1, 0)], dtype=np.float64)
_SPLITS = ("train", "val")
# The embedded dataset's size: make data, make demo, make replicate and every table in docs/ use it
# (2,000 / 1,200 clips: one val reading's binomial SE is at most 1.44 points).
DIGITS_TRAIN, DIGITS_VAL, DIGITS_PER_SHARD = 2000, 1200, 400
_TRAIN_FRACTION = 0.7
_X264_OPTIONS = {"crf": "20", "threads": "1", "mbtree": "0"}
# The digit's side as a share of the frame, and its speed in pixels per source frame at 64 px.
# Measured (docs/yardstick.md): at 3/8 of the frame, wrapping around the edges, an encoder trained
# with the digit labels read them at chance; at 0.45, kept whole in view, it learns them.
_SPRITE_FRACTION = 0.45
_SPEED = (0.3, 0.55)


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear-interpolation matrix, so A @ img @ A.T is a bilinear resize."""
    x_out = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    return np.stack([np.interp(x_out, np.arange(n_in), e) for e in np.eye(n_in)], axis=1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Static float [size, size, 3] texture in 0..1: a few random low-frequency plane waves per channel."""
    yy, xx = np.mgrid[:size, :size] / size
    base = rng.uniform(0.15, 0.45, size=3)
    freqs = rng.uniform(-1.0, 1.0, size=(3, 4, 2))  # cycles per frame width; finer texture competes with the digit at the mask-block scale
    phases = rng.uniform(0, 2 * np.pi, size=(3, 4))
    waves = np.sin(2 * np.pi * (freqs[..., 0, None, None] * yy + freqs[..., 1, None, None] * xx)
                   + phases[..., None, None])
    return np.clip(base + 0.08 * waves.sum(axis=1).transpose(1, 2, 0), 0.0, 1.0)


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
    """Saturated colour at full value, so the digit stands out from the darker background."""
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.5, 1.0), 1.0))


def _shift(img: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Bilinear sub-pixel roll; conserves mass, so every frame shows the same digit (the paths
    render_clip draws never reach the edge, so nothing wraps)."""
    out = img
    for axis, d in enumerate(offset):
        lo = int(np.floor(d))
        frac = d - lo
        out = (1 - frac) * np.roll(out, lo, axis=axis) + frac * np.roll(out, lo + 1, axis=axis)
    return out


def render_clip(digit_image: np.ndarray, *, motion: int, rng: np.random.Generator,
                size: int = 64, num_frames: int = 64) -> np.ndarray:
    """uint8 [num_frames, size, size, 3] frames of one clip: the digit crosses the frame in a
    straight line and stays whole in view (docs/yardstick.md: why these sizes and speeds)."""
    # Every random draw happens regardless of motion and digit, so the same rng state gives
    # the same background, colour, speed and (relative) start for every class.
    background = _background(rng, size)
    colour = _bright_colour(rng)
    where = rng.uniform(0, 1, size=2)
    speed = rng.uniform(*_SPEED)

    sprite_px = round(_SPRITE_FRACTION * size)
    up = _upsample_matrix(8, sprite_px)
    sprite = np.clip(up @ (np.asarray(digit_image, np.float64) / 16.0) @ up.T, 0.0, 1.0)
    alpha = np.zeros((size, size))
    alpha[:sprite_px, :sprite_px] = sprite

    step = _DIRECTIONS[motion] * speed
    travel = step * (num_frames - 1)
    # top-left corners that keep the whole path in frame, so no frame cuts or wraps the digit
    lo, hi = np.maximum(0, -travel), (size - sprite_px) - np.maximum(0, travel)
    start = lo + where * (hi - lo)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        a = _shift(alpha, start + t * step)[..., None]
        frames[t] = np.rint(255 * ((1 - a) * background + a * colour))
    return frames


def encode_mp4(frames: np.ndarray, *, fps: int = 30) -> bytes:
    """H.264 (libx264, yuv420p) mp4 bytes of uint8 [T, H, W, 3] frames, encoded in memory with PyAV."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        # Both options are for byte-identical output. threads=1: x264's frame threading makes the
        # bitstream depend on scheduling. mbtree=0: on these tiny frames x264's macroblock-tree pass
        # depends on uninitialised heap memory, and some clips changed run to run. The files grow.
        stream = container.add_stream("libx264", rate=fps, options=_X264_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the frames x264 holds back for lookahead
    return buf.getvalue()


def _split_pools(seed: int) -> dict[str, list[np.ndarray]]:
    """Per split, per digit class, a shuffled array of load_digits indices; the splits share no image."""
    target = load_digits().target
    rng = np.random.default_rng([seed, 0])
    pools: dict[str, list[np.ndarray]] = {split: [] for split in _SPLITS}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(target == digit))
        cut = int(len(idx) * _TRAIN_FRACTION)
        pools["train"].append(idx[:cut])
        pools["val"].append(idx[cut:])
    return pools


def _clip_spec(i: int, pool: list[np.ndarray]) -> tuple[int, int, int]:
    """(digit, motion, digit_index) of clip i: every 40 clips hold each (digit, motion) pair once."""
    motion, digit = i % 4, (i // 4) % 10
    images = pool[digit]
    # The k-th clip of this digit takes the k-th image, so images repeat only once the pool runs out.
    k = 4 * (i // 40) + motion
    return digit, motion, int(images[k % len(images)])


def _write_digits_shard(root: str, seed: int, split_id: int, first: int, last: int, shard_index: int, size: int,
                        num_frames: int, fps: int) -> int:
    """Clips first..last-1 of split `split_id` into its shard number `shard_index`; returns the bytes written."""
    images = load_digits().images
    split = _SPLITS[split_id]
    pool = _split_pools(seed)[split]
    shard = []
    for i in range(first, last):
        digit, motion, digit_index = _clip_spec(i, pool)
        # Seeded by (seed, split, index) so a clip is the same however many are generated, and by whom.
        rng = np.random.default_rng([seed, split_id + 1, i])
        frames = render_clip(images[digit_index], motion=motion, rng=rng, size=size, num_frames=num_frames)
        meta = {"appearance": digit, "motion": motion, "split": split, "source": "moving_digits",
                "digit_index": digit_index, "fps": fps, "num_frames": num_frames,
                "width": size, "height": size}
        shard.append({"__key__": f"{split}-{i:06d}", "mp4": encode_mp4(frames, fps=fps),
                      "json": json.dumps(meta, sort_keys=True).encode()})
    return write_shard(Path(root) / split / f"shard-{shard_index:06d}.tar", shard)


def write_moving_digits(out_dir: str, *, seed: int = 0, num_train: int = DIGITS_TRAIN, num_val: int = DIGITS_VAL,
                        samples_per_shard: int = DIGITS_PER_SHARD, size: int = 64, num_frames: int = 64,
                        fps: int = 30, progress: bool = True, workers: int = 1) -> dict:
    """Writes out_dir/{train,val}/shard-NNNNNN.tar, their index.parquet and out_dir/labels.json; returns a summary.
    `workers` > 1 writes shards in that many processes: the same bytes, since every clip has its own seed."""
    root = Path(out_dir)
    summary: dict = {"clips": {}, "shards": {}, "bytes": 0}
    tasks = []
    for split_id, (split, count) in enumerate(zip(_SPLITS, (num_train, num_val))):
        (root / split).mkdir(parents=True, exist_ok=True)
        starts = range(0, count, samples_per_shard)
        tasks += [dict(root=str(root), seed=seed, split_id=split_id, first=first, last=min(first + samples_per_shard, count),
                       shard_index=n, size=size, num_frames=num_frames, fps=fps) for n, first in enumerate(starts)]
        summary["clips"][split], summary["shards"][split] = count, len(starts)
    bar = tqdm(total=num_train + num_val, desc="moving digits", unit="clip", disable=not progress)
    if workers <= 1 or len(tasks) == 1:
        for task in tasks:
            summary["bytes"] += _write_digits_shard(**task)
            bar.update(task["last"] - task["first"])
    else:
        context = multiprocessing.get_context("spawn")  # the caller may hold threads (torch, Ray): never fork it
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context) as pool:
            futures = {pool.submit(_write_digits_shard, **task): task for task in tasks}
            for future in as_completed(futures):
                summary["bytes"] += future.result()
                bar.update(futures[future]["last"] - futures[future]["first"])
    bar.close()
    for split in _SPLITS:  # the dataset index, as ingest writes one: no reader walks these tars
        write_index(str(root / split), [entry_from_file(str(p)) for p in sorted((root / split).glob("shard-*.tar"))])
    labels = {"appearance": [str(d) for d in range(10)], "motion": list(MOTIONS)}
    (root / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    return summary
