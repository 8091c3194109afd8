"""Real video folders and CSVs in (local or s3://): every input lands in the shards or the errors,
with its reason; a killed ingest resumes to the bytes of a clean one; splits share one label map."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.dataset_index import load_index
from pipeline.deadline_pool import bounded_map
from pipeline.digits import encode_mp4
from pipeline.extract import extract_targets
from pipeline.ingest import IngestConfig, Transcode, build_shards, discover
from pipeline.labelmap import new_label_map
from pipeline.shards import iter_shard, list_shards, write_shard
from pipeline.video import frame_indices, load_clip
from salt.config import DataConfig
from tests.conftest import ROOT, tiny_config, tree_digest
from tests.test_reliability import descendants
from tests.test_urls import s3_endpoint  # noqa: F401  (the local S3 server fixture)


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
    index = load_index(str(out))  # written with the shards, from the bytes the tasks wrote
    assert sorted(index) == [Path(s).stem for s in list_shards(str(out))]
    for shard in list_shards(str(out)):
        data = Path(shard).read_bytes()
        assert index.fingerprint(Path(shard).stem) == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_folder_of_videos_to_shards_with_errors(video_folder, tmp_path, ray_local, capsys):
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


# ---------------------------------------------------------------- sources, label map, resume


def test_csv_formats_name_the_same_videos(tmp_path):
    """V-JEPA's `path label`, `path,label`, and a header (in any column order) read alike."""
    (tmp_path / "v" / "a").mkdir(parents=True)
    forms = {
        "space.csv": "v/a/x.mp4 3\n/abs/y.mp4 10\n",
        "comma.csv": "v/a/x.mp4,3\n/abs/y.mp4,10\n",
        "header.csv": "path,label\nv/a/x.mp4,3\n/abs/y.mp4,10\n",
        "swapped.csv": "label,video,split\n3,v/a/x.mp4,train\n10,/abs/y.mp4,train\n",
    }
    found = {}
    for name, text in forms.items():
        (tmp_path / name).write_text(text)
        found[name] = [(v.path, v.label, v.key) for v in discover(str(tmp_path / name))]
    assert all(f == found["space.csv"] for f in found.values()), found
    assert [p for p, _, _ in found["space.csv"]] == [str(tmp_path / "v/a/x.mp4"), "/abs/y.mp4"]
    (tmp_path / "bad.csv").write_text("path,label\nv/a/x.mp4,3,extra\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: expected 'path,label', got 'v/a/x.mp4,3,extra'"):
        discover(str(tmp_path / "bad.csv"))
    # V-JEPA's integer labels keep their number even where a split lacks a class
    assert new_label_map(["3", "0", "3"]) == ["0", "1", "2", "3"]
    assert new_label_map(["walk", "run", "10", "2"]) == ["2", "10", "run", "walk"]


def test_splits_ingested_separately_share_one_label_map(video_folder, tmp_path, ray_local, capsys):
    """train/ and val/ in two runs: one labels.json at the dataset root; a class missing from val,
    or whose only video fails, keeps its number; a label outside the map is one line naming it."""
    from jobs import data

    def csv(name: str, rows: list[str]) -> str:
        (video_folder / name).write_text("".join(f"{r}\n" for r in rows))
        return str(video_folder / name)

    train = csv("train.csv", ["walk/a.mp4 walk", "run/b.mp4 run", "run/zero.mp4 jump"])  # jump: its only video fails
    val = csv("val.csv", ["walk/small.mp4 walk"])  # no run, no jump
    root = tmp_path / "ds"
    base = ["--data", str(root), "--no-progress", "--samples-per-shard", "2"]
    data.main(["--src", train, "--split", "train", *base])
    data.main(["--src", val, "--split", "val", *base])
    assert json.loads((root / "labels.json").read_text()) == {"label": ["jump", "run", "walk"]}
    assert not (root / "train" / "labels.json").exists()
    labels = {s.key: (s.meta["label"], s.meta["label_index"]) for split in ("train", "val") for sh in list_shards(str(root), split)
              for s in iter_shard(sh)}
    assert labels == {"walk_a": ("walk", 2), "run_b": ("run", 1), "small": ("walk", 2)}

    capsys.readouterr()
    swim = csv("swim.csv", ["walk/a.mp4 walk", "run/b.mp4 swim"])
    with pytest.raises(SystemExit, match=r"^data error: label 'swim' is not in the label map .*labels.json \(3 classes\)$"):
        data.main(["--src", swim, "--split", "test", *base])
    given = tmp_path / "given.json"
    given.write_text(json.dumps({"label": ["walk", "run"]}))
    with pytest.raises(SystemExit, match=r"^data error: LABELS=.*given.json differs from the map"):
        data.main(["--src", val, "--split", "other", "--labels", str(given), *base])
    # a given map numbers a new dataset: positions in the map, whatever this run decodes
    data.main(["--src", val, "--data", str(tmp_path / "given-ds"), "--labels", str(given), "--no-progress"])
    (sample,) = [s for sh in list_shards(str(tmp_path / "given-ds")) for s in iter_shard(sh)]
    assert (sample.meta["label"], sample.meta["label_index"]) == ("walk", 0)


def test_rerun_keeps_committed_shards_and_redoes_the_rest(video_folder, tmp_path):
    """The state a kill can leave on a local disk: a shard renamed into place but not marked
    committed, a half-written temporary, no index or errors yet. The rerun redoes that shard
    only and ends with every byte of the clean run. Other settings in the same folder: refused."""
    out = tmp_path / "shards"
    cfg = IngestConfig(samples_per_shard=2)
    first = build_shards(str(video_folder), str(out), cfg, progress=False, in_process=True)
    clean = tree_digest(str(out))
    assert (out / "index.parquet").exists() and first["shards_written_now"] == 4
    (out / "_ingest" / "shard-000003.json").unlink()
    (out / "shard-000001.tar.tmp-0badc0de").write_bytes(b"half a tar")
    (out / "index.parquet").unlink()
    (out / "errors.parquet").unlink()
    again = build_shards(str(video_folder), str(out), cfg, progress=False, in_process=True)
    assert (again["shards_written_now"], again["shards_kept"]) == (1, 3)
    assert tree_digest(str(out)) == clean
    with pytest.raises(ValueError, match=r"was ingested with samples_per_shard=2, this run has 3"):
        build_shards(str(video_folder), str(out), IngestConfig(samples_per_shard=3), progress=False, in_process=True)


# ---------------------------------------------------------------- s3://: killed mid-way, rerun, equal bytes


def tiny_mp4(seed: int, frames: int = 12) -> bytes:
    base = np.random.default_rng(seed).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    return encode_mp4(np.stack([np.roll(base, 2 * i, axis=1) for i in range(frames)]), fps=20)


S3_GOOD, S3_SHARDS = 12, 16  # one video per shard: enough shards for a kill to land between commits
TRANSCODE = ["--short-side", "40", "--max-fps", "10"]


@pytest.fixture
def s3_csv(s3_endpoint) -> str:  # noqa: F811
    """An s3:// `path,label` CSV (header, relative paths) of real H.264 mp4s, four of them bad."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # an earlier test's client points at an earlier server
    s3 = s3fs.S3FileSystem(skip_instance_cache=True)
    s3.mkdir("ingest")
    rows = ["path,label"]
    for i in range(S3_GOOD):
        s3.pipe(f"ingest/videos/c{i % 3}/v{i:02d}.mp4", tiny_mp4(i))
        rows.append(f"videos/c{i % 3}/v{i:02d}.mp4,class{i % 3}")
    s3.pipe("ingest/videos/bad/zero.mp4", b"")
    s3.pipe("ingest/videos/bad/half.mp4", tiny_mp4(99)[:3000])
    s3.pipe("ingest/videos/bad/notes.mp4", b"notes, not a video\n" * 50)
    rows += ["videos/bad/zero.mp4,class0", "videos/bad/half.mp4,class1", "videos/bad/notes.mp4,class2", "videos/bad/gone.mp4,class2"]
    s3.pipe("ingest/train.csv", ("\n".join(rows) + "\n").encode())
    return "s3://ingest/train.csv"


def s3_tree(prefix: str) -> dict[str, bytes]:
    import s3fs

    s3 = s3fs.S3FileSystem(skip_instance_cache=True)
    return {p[len(prefix) + 1:]: s3.cat_file(p) for p in s3.find(prefix)}


def test_s3_csv_ingest_killed_mid_way_then_rerun_equals_a_clean_run(s3_csv, tmp_path):
    import s3fs

    clean = build_shards(s3_csv, "s3://ingest/clean", IngestConfig(samples_per_shard=1, transcode=Transcode(short_side=40, max_fps=10)),
                         progress=False, in_process=True)
    assert (clean["inputs"], clean["samples"], clean["errors"], clean["shards"]) == (S3_SHARDS, S3_GOOD, 4, S3_GOOD)
    reasons = {r["source"].rsplit("/", 1)[-1]: r["reason"] for r in clean["error_reasons"]}
    assert reasons == {"gone.mp4": "FileNotFoundError: no such file", "zero.mp4": "ValueError: empty file (0 bytes)",
                       "half.mp4": reasons["half.mp4"], "notes.mp4": reasons["notes.mp4"]}
    assert "not a decodable video" in reasons["half.mp4"] and "not a decodable video" in reasons["notes.mp4"]
    sample = next(iter_shard(list_shards("s3://ingest/clean")[0]))
    assert (sample.meta["width"], sample.meta["height"], sample.meta["fps"], sample.meta["num_frames"]) == (60, 40, 10.0, 6)
    assert sample.meta["transcode"]["short_side"] == 40 and sample.meta["source_video"]["width"] == 96

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, whose workers see the server
    cli = [sys.executable, "-m", "jobs.data", "--src", s3_csv, "--data", "s3://ingest/killed", "--samples-per-shard", "1",
           "--workers", "1", "--no-progress", *TRANSCODE]
    s3 = s3fs.S3FileSystem(skip_instance_cache=True)

    def committed() -> list[str]:
        s3.invalidate_cache()
        return s3.glob("ingest/killed/_ingest/shard-*.json")

    proc = subprocess.Popen(cli, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not committed() and proc.poll() is None:
        time.sleep(0.05)
    ray_processes = descendants(proc.pid)  # its local Ray: some of it outlives a SIGKILL of the driver for a while
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen, since = committed(), time.monotonic()
    while time.monotonic() - since < 2.0:  # a task in flight at the kill may still finish its shard
        time.sleep(0.2)
        if (now := committed()) != seen:
            seen, since = now, time.monotonic()
    for pid, command in ray_processes.items():  # what this test started, by pid, if still the same process
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") == command:
                os.kill(pid, signal.SIGKILL)
    assert 1 <= len(seen) < S3_SHARDS, f"the kill must land mid-job ({len(seen)} shards committed; {proc.stderr.read()[-2000:]})"
    # the rerun without Ray (--workers 0): the same bytes whichever engine ran a shard, and no second Ray start-up
    rerun = subprocess.run([*cli, "--workers", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"({len(seen)} kept from an earlier run)" in rerun.stdout
    killed, whole = s3_tree("ingest/killed"), s3_tree("ingest/clean")
    assert sorted(killed) == sorted(whole)
    assert [k for k in whole if killed[k] != whole[k]] == []
    assert sum(k.endswith(".tar") for k in whole) == S3_GOOD and "index.parquet" in whole and "labels.json" in whole
