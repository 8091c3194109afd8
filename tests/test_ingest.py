"""Real video folders and CSVs in: every input lands in the shards or the errors, with its reason."""

from __future__ import annotations

import json
import time
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.deadline_pool import bounded_map
from pipeline.digits import encode_mp4
from pipeline.extract import extract_targets
from pipeline.ingest import build_shards
from pipeline.shards import iter_shard, list_shards, write_shard
from pipeline.video import frame_indices, load_clip
from salt.config import DataConfig
from tests.conftest import tiny_config


def encode(path: Path, *, width: int, height: int, frames: int, fps: int) -> bytes:
    base = np.random.default_rng(width * frames).integers(0, 255, (height, width, 3), dtype=np.uint8)
    video = encode_mp4(np.stack([np.roll(base, i, axis=1) for i in range(frames)]), fps=fps)
    path.write_bytes(video)
    return video


def audio_only(path: Path) -> None:
    container = av.open(str(path), mode="w", format="mp4")
    stream = container.add_stream("aac", rate=16000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 16000
    for i in range(10):
        frame.pts = i * 1024
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


GOOD = {  # name: (width, height, frames, fps); "small" is smaller than the 96 px crop used below
    "walk/a.mp4": (160, 120, 80, 30),
    "walk/small.mp4": (80, 64, 40, 25),
    "run/b.mp4": (96, 96, 70, 15),
}
BAD = {
    "run/zero.mp4": "empty file (0 bytes)",
    "run/truncated.mp4": "not a decodable video",
    "run/notes.mp4": "not a decodable video",
    "run/audio.mp4": "not a decodable video",
    "run/narrow.mp4": "decoder returned frames of shape (48, 48, 4)",  # decord mis-sizes narrow videos
}


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for name, (w, h, n, fps) in GOOD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        encode(root / name, width=w, height=h, frames=n, fps=fps)
    (root / "run/zero.mp4").write_bytes(b"")
    full = encode(root / "run/tmp.mp4", width=128, height=96, frames=60, fps=30)
    (root / "run/tmp.mp4").unlink()
    (root / "run/truncated.mp4").write_bytes(full[: len(full) // 2])
    (root / "run/notes.mp4").write_text("these are my notes, not a video\n" * 20)
    audio_only(root / "run/audio.mp4")
    encode(root / "run/narrow.mp4", width=48, height=48, frames=20, fps=30)
    (root / "run/readme.txt").write_text("not picked up: not a video suffix")
    return root


def check_report(summary: dict, out: Path, prefix: str) -> None:
    assert summary["inputs"] == len(GOOD) + len(BAD)
    assert summary["samples"] == len(GOOD) and summary["errors"] == len(BAD)
    errors = {Path(r["source"]).relative_to(prefix).as_posix(): r["reason"] for r in pq.read_table(out / "errors.parquet").to_pylist()}
    assert errors.keys() == BAD.keys()
    for name, reason in BAD.items():
        assert reason in errors[name], (name, errors[name])
    samples = [s for shard in list_shards(str(out)) for s in iter_shard(shard)]
    assert sorted(s.key for s in samples) == sorted(n.replace("/", "_").removesuffix(".mp4") for n in GOOD)
    for s in samples:
        name = Path(s.meta["source"]).relative_to(prefix).as_posix()
        w, h, n, fps = GOOD[name]
        assert (s.meta["width"], s.meta["height"], s.meta["num_frames"]) == (w, h, n)
        assert s.meta["fps"] == pytest.approx(fps, rel=0.01)
        assert s.meta["label"] == name.split("/")[0]
        assert s.meta["label_index"] == ["run", "walk"].index(s.meta["label"])
    assert json.loads((out / "labels.json").read_text()) == {"label": ["run", "walk"]}


def test_folder_of_videos_to_shards_with_errors(video_folder, tmp_path, capsys):
    from jobs import data

    summary = data.main(["--src", str(video_folder), "--data", str(tmp_path / "shards"), "--samples-per-shard", "2"])
    check_report(summary, tmp_path / "shards", str(video_folder))
    assert summary["shards"] == 2
    printed = capsys.readouterr().out
    assert f"{len(GOOD) + len(BAD)} inputs -> {len(GOOD)} samples" in printed
    assert f"skipped {video_folder / 'run/zero.mp4'}: ValueError: empty file (0 bytes)" in printed


def test_csv_of_videos_gives_the_same_shards(video_folder, tmp_path):
    lines = [f"{video_folder / name} {name.split('/')[0]}" for name in [*GOOD, *BAD]]
    csv = video_folder / "index.csv"
    csv.write_text("\n".join(lines) + "\n")
    summary = build_shards(str(csv), str(tmp_path / "shards"), progress=False)
    check_report(summary, tmp_path / "shards", str(video_folder))
    # relative paths resolve from the CSV's folder; a repeated path is caught as a duplicate
    csv.write_text("walk/a.mp4 walk\nwalk/a.mp4 walk\n")
    summary = build_shards(str(csv), str(tmp_path / "dup"), progress=False)
    assert summary["samples"] == 1 and "duplicate key 'a'" in summary["error_reasons"][0]["reason"]
    csv.write_text("walk/a.mp4\n")
    with pytest.raises(ValueError, match=r"index.csv:1: expected 'path label'"):
        build_shards(str(csv), str(tmp_path / "bad"), progress=False)


def test_made_shards_train_extract_and_student(video_folder, tmp_path, teacher_dir, ray_local):
    """make data SRC=... then the three stages, on real videos of mixed size, rate and length."""
    from jobs import student, teacher

    data = tmp_path / "shards"
    build_shards(str(video_folder), str(data), progress=False)
    run = tmp_path / "run"
    args = ["--data", str(data), "--run", str(run), "--no-progress", "teacher.optim.batch_size=3", "student.optim.batch_size=3"]
    teacher.main(args + ["data.num_workers=0", "teacher.optim.steps=2"])
    summary = extract_targets(tiny_config(), data=str(data), teacher=str(run / "teacher"), store=str(run / "targets"), progress=False)
    assert summary["samples"] == 3 and summary["errors"] == 0
    assert student.main(args + ["data.num_workers=0", "student.optim.steps=2"])["step"] == 2


def test_small_short_video_is_upscaled_and_padded(video_folder):
    cfg = DataConfig(frames=16, frame_step=4, crop_size=96)
    clip, digest = load_clip((video_folder / "walk/small.mp4").read_bytes(), cfg, key="k", view=0)
    assert clip.shape == (3, 16, 96, 96) and len(digest) == 64
    # 40 frames cannot hold 16 frames 4 apart (61): the tail repeats the last frame
    assert frame_indices(40, 4, cfg, np.random.default_rng(0)) == (0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 39, 39, 39, 39, 39, 39)


def test_fps_option_samples_by_time(video_folder):
    from pipeline.video import decode

    by_step = DataConfig(frames=4, frame_step=2, crop_size=64)
    by_fps = DataConfig(frames=4, fps=7.5, crop_size=64)  # 30 fps source -> every 4th frame
    video = (video_folder / "walk/a.mp4").read_bytes()
    _, spec = decode(video, by_fps, key="k", view=0)
    assert np.diff(spec.frame_indices).tolist() == [4, 4, 4]
    _, spec = decode(video, by_step, key="k", view=0)
    assert np.diff(spec.frame_indices).tolist() == [2, 2, 2]


def test_bad_sample_at_extraction_time_is_recorded_not_fatal(digits, teacher_dir, ray_local, tmp_path):
    good = next(iter_shard(list_shards(digits)[0]))
    data = tmp_path / "data"
    data.mkdir()
    write_shard(
        data / "shard-000000.tar",
        [
            {"__key__": good.key, "mp4": good.video, "json": json.dumps(good.meta).encode()},
            {"__key__": "broken", "mp4": b"\x00" * 1000, "json": b"{}"},
            {"__key__": "novideo", "json": b"{}"},
        ],
    )
    summary = extract_targets(tiny_config(), data=str(data), teacher=teacher_dir, store=str(tmp_path / "s"), progress=False)
    assert summary["samples"] == 1 and summary["errors"] == 2
    reasons = {r["key"]: r["reason"] for r in pq.read_table(tmp_path / "s" / "errors.parquet").to_pylist()}
    assert reasons["novideo"] == "sample has no video member" and "broken" in reasons


def hang_on_negative(x: int) -> int:
    if x < 0:
        time.sleep(3600)  # stands in for decord's endless loop
    return x * 2


def test_a_hanging_decode_is_bounded_and_the_rest_goes_on():
    t0 = time.monotonic()
    results = {pos: (ok, r) for pos, ok, r in bounded_map(hang_on_negative, [1, -1, 2, 3], timeout_s=1.0, workers=2)}
    assert time.monotonic() - t0 < 20
    assert results[0] == (True, 2) and results[2] == (True, 4) and results[3] == (True, 6)
    assert results[1][0] is False and "TimeoutError" in results[1][1]
