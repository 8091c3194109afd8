"""Your videos -> WebDataset shards: `make data SRC=<folder or CSV>`.

Every input ends in exactly one place: a shard, or the errors table with its reason.
Each file is probed in a worker process with a deadline (decord can hang on a file
whose container over-reports its frame count), fully decoded once to count the frames
that really decode, and refused when that count or the frame shape disagrees with
what the decoder reports: such files are where decoders pick wrong frames later.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.deadline_pool import bounded_map
from pipeline.shards import write_shard

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")
ERRORS_SCHEMA = pa.schema([("source", pa.string()), ("key", pa.string()), ("reason", pa.string())])


@dataclass(frozen=True)
class SourceVideo:
    path: str
    label: str  # "" when the source gives none
    key: str


def safe_key(relative: str) -> str:
    """A WebDataset key: no dots (they start the extension) and no slashes (no folders in tars)."""
    stem = relative.rsplit(".", 1)[0] if "." in Path(relative).name else relative
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def discover(src: str) -> list[SourceVideo]:
    """Videos of a folder (recursively; label = top-level subfolder) or of a V-JEPA style
    CSV (`path label` per line, space-separated, no header; relative paths are taken
    from the CSV's folder). Keys are the paths below the common folder, made safe."""
    root = Path(src)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        return [
            SourceVideo(str(p), p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "", safe_key(str(p.relative_to(root))))
            for p in files
        ]
    if root.is_file():
        rows = []
        for number, line in enumerate(root.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            if " " not in line.strip():
                raise ValueError(f"{src}:{number}: expected 'path label', got {line!r}")
            path, label = line.strip().rsplit(" ", 1)
            rows.append((Path(path) if Path(path).is_absolute() else root.parent / path, label))
        if not rows:
            return []
        # keys relative to the files' common folder: short, and stable when the dataset moves
        common = Path(os.path.commonpath([str(p.parent) for p, _ in rows]))
        return [SourceVideo(str(p), label, safe_key(str(p.relative_to(common)))) for p, label in rows]
    raise FileNotFoundError(f"SRC={src!r}: no such folder or CSV file")


def probe(path: str) -> dict:
    """Runs in a bounded worker: facts about one video, or an exception naming what is wrong."""
    import decord

    data = Path(path).read_bytes()
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # decord's message for text files, truncated files and audio-only files
        raise ValueError(f"not a decodable video ({_first_line(e)})") from None
    reported = len(reader)
    if reported == 0:
        raise ValueError("no video frames")
    first = reader[0].asnumpy()
    if first.ndim != 3 or first.shape[2] != 3:
        raise ValueError(f"decoder returned frames of shape {first.shape}, not HxWx3")
    reader.seek(0)
    decoded = 0
    try:
        while True:
            frame = reader.next().asnumpy()
            if frame.shape != first.shape:
                raise ValueError(f"frame {decoded} has shape {frame.shape}, frame 0 {first.shape}")
            decoded += 1
    except StopIteration:
        pass
    except Exception as e:
        raise ValueError(f"decoding stopped at frame {decoded} of {reported}: {_first_line(e)}") from None
    if decoded != reported:
        raise ValueError(f"decoder reports {reported} frames but {decoded} decode")
    return {
        "fps": float(reader.get_avg_fps()),
        "num_frames": decoded,
        "height": int(first.shape[0]),
        "width": int(first.shape[1]),
        "bytes": len(data),
    }


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:160] if text else type(e).__name__


def build_shards(
    src: str, out: str, *, samples_per_shard: int = 256, workers: int = 2, timeout_s: float = 60.0, progress: bool = True
) -> dict:
    """Probe every video of `src`, write the good ones as shards of `out`, the rest as errors."""
    videos = discover(src)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    errors: list[tuple[str, str, str]] = []
    unique: list[SourceVideo] = []
    first_of: dict[str, str] = {}
    for v in videos:
        if v.key in first_of:
            errors.append((v.path, v.key, f"duplicate key {v.key!r}: also made from {first_of[v.key]}"))
        else:
            first_of[v.key] = v.path
            unique.append(v)
    facts: dict[int, dict] = {}
    bar = tqdm(total=len(unique), desc="probing videos", unit="video", disable=not progress)
    for position, ok, result in bounded_map(probe, [v.path for v in unique], timeout_s=timeout_s, workers=workers):
        if ok:
            facts[position] = result
        else:
            errors.append((unique[position].path, unique[position].key, result))
        bar.update(1)
    bar.close()
    good = [(v, facts[i]) for i, v in enumerate(unique) if i in facts]
    labels = sorted({v.label for v, _ in good}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    label_index = {name: i for i, name in enumerate(labels)}
    shard_bytes = 0
    shards = 0
    for start in range(0, len(good), samples_per_shard):
        samples = []
        for v, f in good[start : start + samples_per_shard]:
            meta = {"source": v.path, "label": v.label, "label_index": label_index[v.label]} | {
                k: f[k] for k in ("fps", "num_frames", "width", "height")
            }
            ext = Path(v.path).suffix.lower().lstrip(".")
            samples.append({"__key__": v.key, ext: Path(v.path).read_bytes(), "json": json.dumps(meta).encode()})
        shard_bytes += write_shard(out_dir / f"shard-{shards:06d}.tar", samples)
        shards += 1
    (out_dir / "labels.json").write_text(json.dumps({"label": labels}, indent=1))
    table = pa.table(
        {"source": [e[0] for e in errors], "key": [e[1] for e in errors], "reason": [e[2] for e in errors]},
        schema=ERRORS_SCHEMA,
    )
    pq.write_table(table, out_dir / "errors.parquet")
    if len(good) + len(errors) != len(videos):  # the invariant the whole report rests on
        raise RuntimeError(f"{len(videos)} inputs but {len(good)} samples + {len(errors)} errors")
    return {
        "inputs": len(videos),
        "samples": len(good),
        "errors": len(errors),
        "shards": shards,
        "bytes": shard_bytes,
        "error_reasons": [{"source": e[0], "reason": e[2]} for e in errors],
    }
