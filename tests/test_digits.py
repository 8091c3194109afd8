import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import decord
import numpy as np
import pytest
from sklearn.datasets import load_digits

from pipeline.digits import encode_mp4, render_clip, write_moving_digits

# (row, col) direction of motion classes right, left, down, up.
EXPECTED = {0: (0, 1), 1: (0, -1), 2: (1, 0), 3: (-1, 0)}
SIZE = 64
FIELDS = {"appearance", "motion", "split", "source", "digit_index", "fps", "num_frames", "width", "height"}


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    return load_digits().images[0]


def _circular_centre(weight: np.ndarray) -> np.ndarray:
    """(row, col) centre of mass on the torus, as the argument of the weighted mean phase."""
    angles = 2 * np.pi * np.arange(weight.shape[0]) / weight.shape[0]
    rows = np.angle((weight.sum(axis=1) * np.exp(1j * angles)).sum())
    cols = np.angle((weight.sum(axis=0) * np.exp(1j * angles)).sum())
    return np.array([rows, cols]) * weight.shape[0] / (2 * np.pi)


def _displacement(digit: np.ndarray, motion: int, seed: int, t: int) -> np.ndarray:
    clip = render_clip(digit, motion=motion, rng=np.random.default_rng(seed), size=SIZE, num_frames=t + 1)
    # A blank digit draws the same random numbers, so it renders the bare background.
    background = render_clip(np.zeros((8, 8)), motion=motion, rng=np.random.default_rng(seed),
                             size=SIZE, num_frames=1)[0]
    weight = np.abs(clip.astype(float) - background).sum(axis=-1)
    delta = _circular_centre(weight[t]) - _circular_centre(weight[0])
    return (delta + SIZE / 2) % SIZE - SIZE / 2


def test_render_clip_shape_and_dtype(digit: np.ndarray) -> None:
    clip = render_clip(digit, motion=2, rng=np.random.default_rng(0), size=32, num_frames=10)
    assert clip.shape == (10, 32, 32, 3)
    assert clip.dtype == np.uint8


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("motion", [0, 1, 2, 3])
def test_digit_moves_in_its_direction(digit: np.ndarray, motion: int, seed: int) -> None:
    along = np.array(EXPECTED[motion])
    delta = _displacement(digit, motion, seed, t=8)
    # 8 frames at 0.3..0.55 px/frame; the slack is because the contrast-weighted centre
    # wobbles as the digit crosses the texture.
    assert 8 * 0.3 - 1.0 < delta @ along < 8 * 0.55 + 1.0
    assert abs(delta @ along[::-1]) < 2.0


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_classes_share_every_draw_and_the_digit_stays_whole(digit: np.ndarray, seed: int) -> None:
    blank = np.zeros((8, 8))
    backgrounds = [render_clip(blank, motion=m, rng=np.random.default_rng(seed), size=SIZE, num_frames=64) for m in range(4)]
    for bare in backgrounds[1:]:
        np.testing.assert_array_equal(bare, backgrounds[0])  # background, colour, speed: the same draws
    clips = [render_clip(digit, motion=m, rng=np.random.default_rng(seed), size=SIZE, num_frames=64) for m in range(4)]
    for clip, bare in zip(clips, backgrounds):
        # the path keeps the whole digit in view: nothing of it reaches the frame's border, so nothing wraps
        diff = np.abs(clip.astype(float) - bare).sum(axis=-1)  # [T, H, W]
        border = diff[:, [0, -1], :].sum() + diff[:, :, [0, -1]].sum()
        assert border < 0.01 * diff.sum(), (border, diff.sum())
    assert len({clip[-1].tobytes() for clip in clips}) == 4


def test_background_is_textured_and_differs_per_clip() -> None:
    blank = np.zeros((8, 8))
    a, b = (render_clip(blank, motion=0, rng=np.random.default_rng(s), num_frames=1)[0] for s in (0, 1))
    assert a.astype(float).std(axis=(0, 1)).mean() > 5
    assert np.abs(a.astype(float) - b).mean() > 5


def test_mp4_round_trip(digit: np.ndarray) -> None:
    frames = render_clip(digit, motion=1, rng=np.random.default_rng(3), size=SIZE, num_frames=40)
    data = encode_mp4(frames, fps=30)
    assert data[4:8] == b"ftyp"
    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0))
    assert len(reader) == 40
    decoded = reader.get_batch(list(range(len(reader)))).asnumpy()
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(float) - frames).mean() < 8
    assert encode_mp4(frames, fps=30) == data


_ENCODE_SCRIPT = """
import hashlib, numpy as np
from sklearn.datasets import load_digits
from pipeline.digits import encode_mp4, render_clip
images = load_digits().images
for i in (4, 8, 9, 13):
    frames = render_clip(images[i], motion=i % 4, rng=np.random.default_rng([0, 1, i]))
    print(hashlib.sha256(encode_mp4(frames)).hexdigest())
"""


def test_mp4_bytes_do_not_depend_on_heap_contents() -> None:
    # glibc fills fresh heap memory with MALLOC_PERTURB_, so an encoder read of uninitialised
    # memory shows up as bytes that differ from this process's. With x264's mbtree on, they did.
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MALLOC_PERTURB_": "77", "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-c", _ENCODE_SCRIPT], env=env, cwd=root,
                         capture_output=True, text=True, check=True)
    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        exec(_ENCODE_SCRIPT, {})
    assert run.stdout == here.getvalue()


def _tar_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.tar"))}


def test_write_moving_digits(tmp_path: Path) -> None:
    kwargs = dict(num_train=8, num_val=4, samples_per_shard=4, size=32, num_frames=20, progress=False)
    summary = write_moving_digits(str(tmp_path / "a"), seed=5, **kwargs)
    parallel = write_moving_digits(str(tmp_path / "b"), seed=5, workers=2, **kwargs)  # shards written by 2 processes
    write_moving_digits(str(tmp_path / "c"), seed=6, **kwargs)
    a, b, c = (_tar_bytes(tmp_path / name) for name in "abc")

    assert sorted(a) == ["train/shard-000000.tar", "train/shard-000001.tar", "val/shard-000000.tar"]
    assert summary["clips"] == {"train": 8, "val": 4}
    assert summary["shards"] == {"train": 2, "val": 1}
    assert summary["bytes"] == sum(len(v) for v in a.values())
    assert a == b and parallel == summary
    assert all(a[name] != c[name] for name in a)
    assert not list((tmp_path / "a").rglob("*.tmp"))

    labels = json.loads((tmp_path / "a" / "labels.json").read_text())
    assert labels == {"appearance": [str(d) for d in range(10)], "motion": ["right", "left", "down", "up"]}

    keys, indices = [], {"train": set(), "val": set()}
    for name in a:
        with tarfile.open(tmp_path / "a" / name) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
            files = {m.name: tar.extractfile(m).read() for m in members}
        for member, data in files.items():
            key, ext = member.split(".", 1)
            assert ext in ("json", "mp4") and f"{key}.json" in files and f"{key}.mp4" in files
            if ext == "mp4":
                continue
            meta = json.loads(data)
            split = name.split("/")[0]
            assert set(meta) == FIELDS
            assert meta == {**meta, "split": split, "source": "moving_digits", "fps": 30,
                            "num_frames": 20, "width": 32, "height": 32}
            assert 0 <= meta["appearance"] <= 9 and 0 <= meta["motion"] <= 3
            assert load_digits().target[meta["digit_index"]] == meta["appearance"]
            assert key.startswith(f"{split}-")
            keys.append(key)
            indices[split].add(meta["digit_index"])
    assert len(keys) == len(set(keys)) == 12
    assert not indices["train"] & indices["val"]
