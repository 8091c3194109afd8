"""make bench's ingest rows: videos per second per core through `make data SRC=...`, with and
without transcode, against the bench's decode-only rate (`experiments/bench.py: decode_throughput`'s
bound: one 16-frame clip decoded from the same 10 s 360p video, in the same process).

Ingest here is the body of one shard's task (`pipeline/ingest.py: ingest_shard`, run in process:
one core, its forked decode worker included), over copies of that video in a local folder: read,
full decode (and transcode), tar, sha256, write. Ray's scheduling is left out: it is paid once per
shard of `samples_per_shard` videos. A ratio of 1 would mean ingesting a whole video costs what
decoding one clip from it does; the probe decodes all 300 frames, so expect well below 1.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from experiments.bench import real_resolution_video, row, timed_rate
from pipeline.ingest import IngestConfig, Transcode, build_shards
from pipeline.video import decode
from salt.config import DataConfig

# Kinetics pipelines commonly store a short side of 256-320 px; the bench's source is 360p, 30 fps.
TRANSCODE = Transcode(short_side=256, max_fps=30)


def ingest_rate(src: Path, out: Path, videos: int, transcode: Transcode | None) -> float:
    """Videos per second of one in-process ingest of `src` into a fresh `out` (one shard)."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = IngestConfig(samples_per_shard=videos, timeout_s=600.0, transcode=transcode)
    t0 = time.perf_counter()
    summary = build_shards(str(src), str(out), cfg, progress=False, in_process=True)
    seconds = time.perf_counter() - t0
    if summary["samples"] != videos:
        raise RuntimeError(f"ingest bench: {summary['samples']} of {videos} videos ingested: {summary['error_reasons'][:1]}")
    return videos / seconds


def ingest_rows(work: Path, videos: int = 6, clips: int = 20) -> list[dict]:
    torch.set_num_threads(1)  # per core, as decode_throughput
    video = real_resolution_video()
    src = Path(work) / "ingest-src"
    shutil.rmtree(src, ignore_errors=True)
    (src / "clips").mkdir(parents=True)
    for i in range(videos):
        (src / "clips" / f"v{i:03d}.mp4").write_bytes(video)
    cfg = DataConfig()
    bound = timed_rate(lambda i: decode(video, cfg, key=f"clip{i}", view=0), clips)
    plain = ingest_rate(src, Path(work) / "ingest-plain", videos, None)
    transcoded = ingest_rate(src, Path(work) / "ingest-transcode", videos, TRANSCODE)
    return [
        row("ingest_videos_per_s_per_core", plain, "videos/s", bound,
            "make data SRC=...: 640x360 H.264, 300 frames per video: read, full decode (probe), tar, sha256, write; "
            "bound: decode-only clips/s (16 frames) of the same video"),
        row("ingest_transcode_videos_per_s_per_core", transcoded, "videos/s", bound,
            f"as ingest_videos_per_s_per_core with --short-side {TRANSCODE.short_side} --max-fps {TRANSCODE.max_fps:g} "
            f"(libx264 {TRANSCODE.preset}, crf {TRANSCODE.crf}, one thread): decode, scale, encode, probe the result"),
    ]
