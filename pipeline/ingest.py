"""Your videos -> WebDataset shards, as a resumable Ray job: `make data SRC=<folder or CSV>`.

Sources: a folder (recursively; label = top-level subfolder) or a CSV: V-JEPA's `path label`
(space-separated) or `path,label`, with or without a header line; relative paths are taken from
the CSV's folder. Local paths or fsspec URLs (`s3://...`), for the sources, the CSV and the output.

Layout of the output (split) folder `out`; the label map lives at the dataset root (`out` itself,
or its parent when `--split` names a subfolder; `pipeline/labelmap.py`):

    shard-000000.tar ...      KEY.<ext> + KEY.json per sample (label, label_index, frame facts,
                              and with --short-side/--max-fps the transcode settings)
    index.parquet             per shard: samples, member offsets and sizes, bytes, sha256
                              (`pipeline/dataset_index.py`), written once all shards are there
    errors.parquet            source, key, reason: every input that is not in a shard
    _ingest/job.json          the settings and a digest of the source list: a rerun must match
    _ingest/shard-NNNNNN.json a shard's commit marker: its index entry, errors and counts

The contract:
- Sources are sorted by key and shard i holds the sources [i*N, (i+1)*N) of that order (the ones
  that pass), so a shard's bytes depend on its slice and the settings only: never on the number of
  workers, the order tasks finish in, or a crash. A slice with no good video writes no tar (its
  marker records 0 samples), so shard numbers can have gaps; readers pair shards by name.
- One Ray task per shard reads its videos, decodes each fully in a forked worker with a deadline
  (decord can hang on a file whose container over-reports its frame count), optionally transcodes,
  and writes the tar whole under its final name (`pipeline/fs.py: write_bytes`: a temporary name
  and a rename on a local disk, one PUT on an object store), then its marker. A shard is committed
  when its marker exists; a rerun skips committed shards and redoes the rest, with the same bytes.
- Every input ends in exactly one place: a shard or errors.parquet. A video that does not decode
  (or is missing) is an error row, never fatal; a storage error that is not a missing file stops
  the job (a rerun resumes).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import posixpath
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import fs
from pipeline.dataset_index import entry_from_bytes, write_index
from pipeline.deadline_pool import bounded_map
from pipeline.labelmap import settle_label_map

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")
ERRORS_SCHEMA = pa.schema([("source", pa.string()), ("key", pa.string()), ("reason", pa.string())])
JOB_FORMAT = "salt-ingest/1"
STATE = "_ingest"  # the job record and the shards' commit markers
PATH_COLUMNS = ("path", "video", "video_path", "file", "filename", "clip")
LABEL_COLUMNS = ("label", "class", "label_name", "class_name", "category")


@dataclass(frozen=True, kw_only=True)
class Transcode:
    """Re-encode on ingest (libx264 through PyAV), so later decodes pay for what training uses.
    The settings are part of every transcoded sample's json."""

    short_side: int = 0  # > 0: scale so the short side is at most this many pixels
    max_fps: float = 0.0  # > 0: drop frames to at most this rate (by timestamp)
    crf: int = 23
    preset: str = "veryfast"

    def __post_init__(self):
        # the settings are written into every sample: 10 and 10.0 must not make two datasets
        for name, kind in (("short_side", int), ("max_fps", float), ("crf", int), ("preset", str)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.short_side < 0 or self.max_fps < 0:
            raise ValueError(f"transcode short_side={self.short_side}, max_fps={self.max_fps}: want >= 0 (0: keep)")

    def x264_options(self) -> dict[str, str]:
        # threads=1 and mbtree=0 make the bitstream a function of the input alone (the same
        # settings as pipeline/digits.py: frame threading and the macroblock tree made bytes vary)
        return {"crf": str(self.crf), "preset": self.preset, "threads": "1", "mbtree": "0"}


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    samples_per_shard: int = 128
    timeout_s: float = 60.0  # per video, decode (and transcode) included
    transcode: Transcode | None = None

    def __post_init__(self):
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard}: want at least 1")


@dataclass(frozen=True)
class SourceVideo:
    path: str
    label: str  # "" when the source gives none
    key: str


# ---------------------------------------------------------------- sources


def safe_key(relative: str) -> str:
    """A WebDataset key: no dots (they start the extension) and no slashes (no folders in tars)."""
    stem = relative.rsplit(".", 1)[0] if "." in PurePosixPath(relative).name else relative
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def _absolute(path: str) -> str:
    """URLs as given; local paths absolute (Ray workers need not share the driver's folder)."""
    return path if "://" in path else os.path.abspath(path)


def _keys(paths: list[str]) -> list[str]:
    """Keys: each path below the files' common folder, made safe (short, and stable when the
    dataset moves)."""
    rests = [p.split("://", 1)[-1] for p in paths]
    try:
        common = posixpath.commonpath([posixpath.dirname(r) for r in rests])
    except ValueError:  # absolute and relative mixed (local paths and URLs in one CSV)
        common = ""
    return [safe_key(r[len(common):].lstrip("/") if common else r) for r in rests]


def _csv_rows(src: str, text: str) -> list[tuple[str, str]]:
    """(path, label) per row. A first line with a comma makes it `path,label` (the csv module's
    quoting), else V-JEPA's `path label` (the label after the last space). A first line naming a
    path column (PATH_COLUMNS) is a header: its path and label columns are used, others ignored."""
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        return []
    comma = "," in lines[0][1]
    split = (lambda line: [f.strip() for f in next(csv.reader([line]))]) if comma else (lambda line: line.rsplit(" ", 1))
    expected = "'path,label'" if comma else "'path label'"
    header = [c.lower() for c in split(lines[0][1])]
    width, path_col, label_col = 2, 0, 1
    if any(c in PATH_COLUMNS for c in header):
        width = len(header)
        path_col = next(i for i, c in enumerate(header) if c in PATH_COLUMNS)
        label_col = next((i for i, c in enumerate(header) if c in LABEL_COLUMNS), 1 - path_col if width == 2 else -1)
        if label_col < 0:
            raise ValueError(f"{src}:{lines[0][0]}: header {lines[0][1]!r} names no label column ({', '.join(LABEL_COLUMNS)})")
        lines = lines[1:]
    rows = []
    for number, line in lines:
        fields = split(line)
        if len(fields) != width or not fields[path_col]:
            raise ValueError(f"{src}:{number}: expected {expected}, got {line!r}")
        rows.append((fields[path_col], fields[label_col]))
    return rows


def discover(src: str) -> list[SourceVideo]:
    """The videos of a folder or a CSV, in the order given there (`plan_shards` sorts them)."""
    if fs.isdir(src):
        root = _absolute(str(src).rstrip("/"))
        names = [n for n in fs.files_under(root) if n.lower().endswith(VIDEO_SUFFIXES)]
        return [
            SourceVideo(fs.join(root, n), n.split("/", 1)[0] if "/" in n else "", safe_key(n)) for n in names
        ]
    if fs.exists(src):
        csv_path = _absolute(str(src))
        folder = csv_path.rsplit("/", 1)[0]
        try:
            text = fs.read_bytes(csv_path).decode()
        except UnicodeDecodeError:
            raise ValueError(f"SRC={src!r} is neither a folder nor a text CSV") from None
        rows = [
            (path if "://" in path or path.startswith("/") else fs.join(folder, path), label)
            for path, label in _csv_rows(src, text)
        ]
        rows = [(posixpath.normpath(p) if "://" not in p else p, label) for p, label in rows]
        return [SourceVideo(p, label, key) for (p, label), key in zip(rows, _keys([p for p, _ in rows]))]
    raise FileNotFoundError(f"SRC={src!r}: no such folder or CSV file")


def plan_shards(videos: list[SourceVideo], samples_per_shard: int) -> tuple[list[list[SourceVideo]], list[tuple[str, str, str]]]:
    """Sorted by (key, path); a key seen before is an error (the first path keeps it); shard i is
    the i-th slice of `samples_per_shard` of the rest."""
    ordered = sorted(videos, key=lambda v: (v.key, v.path))
    unique: list[SourceVideo] = []
    errors = []
    for v in ordered:
        if unique and unique[-1].key == v.key:
            errors.append((v.path, v.key, f"duplicate key {v.key!r}: also made from {unique[-1].path}"))
        else:
            unique.append(v)
    return [unique[i : i + samples_per_shard] for i in range(0, len(unique), samples_per_shard)], errors


# ---------------------------------------------------------------- one video (in a forked worker)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:160] if text else type(e).__name__


def probe_video(data: bytes) -> dict:
    """Facts about a video's bytes from a full decode with decord (the decoder every later stage
    uses), or a ValueError naming what is wrong: files whose decoded frame count or frame shape
    disagree with what the decoder reports are where it picks wrong frames later."""
    import decord

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
    return {"fps": float(reader.get_avg_fps()), "num_frames": decoded, "height": int(first.shape[0]), "width": int(first.shape[1])}


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at most `short_side` (0: unchanged), aspect kept, both
    even (yuv420p halves the chroma planes)."""
    scale = short_side / min(width, height) if short_side > 0 and min(width, height) > short_side else 1.0
    return (_even(width * scale), _even(height * scale)) if scale < 1 else (width - width % 2 or 2, height - height % 2 or 2)


def transcode(data: bytes, t: Transcode) -> tuple[bytes, dict]:
    """H.264 mp4 bytes of a video's frames at most `t.short_side` on the short side and at most
    `t.max_fps` frames per second (frames kept by timestamp: the first of each 1/max_fps slot),
    and facts about the source. Audio is dropped. Deterministic: one thread everywhere."""
    import av

    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        src = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise ValueError(f"not a decodable video ({_first_line(e)})") from None
    with src:
        if not src.streams.video:
            raise ValueError("not a decodable video (no video stream)")
        vin = src.streams.video[0]
        vin.codec_context.thread_count = 1
        rate_in = vin.average_rate or vin.guessed_rate or vin.base_rate
        if not rate_in:
            raise ValueError("the video stream states no frame rate")
        rate_in = Fraction(rate_in)
        limit = Fraction(t.max_fps).limit_denominator(1001) if t.max_fps > 0 else rate_in
        rate_out = min(rate_in, limit)
        width, height = vin.codec_context.width, vin.codec_context.height
        if not width or not height:
            raise ValueError("the video stream states no frame size")
        out_w, out_h = output_size(width, height, t.short_side)
        buf = io.BytesIO()
        decoded = kept = 0
        with av.open(buf, "w", format="mp4") as dst:
            vout = dst.add_stream("libx264", rate=rate_out, options=t.x264_options())
            vout.width, vout.height, vout.pix_fmt = out_w, out_h, "yuv420p"
            first_pts, last_slot = None, -1
            try:
                for frame in src.decode(vin):
                    decoded += 1
                    if rate_out < rate_in:
                        pts = frame.pts if frame.pts is not None else decoded - 1
                        first_pts = pts if first_pts is None else first_pts
                        seconds = (pts - first_pts) * (vin.time_base if frame.pts is not None else 1 / rate_in)
                        slot = math.floor(Fraction(seconds) * rate_out)
                        if slot <= last_slot:
                            continue
                        last_slot = slot
                    out = frame.reformat(width=out_w, height=out_h, format="yuv420p", interpolation="AREA")
                    out.pts, out.time_base = kept, 1 / rate_out
                    dst.mux(vout.encode(out))
                    kept += 1
            except av.FFmpegError as e:
                raise ValueError(f"decoding stopped at frame {decoded}: {_first_line(e)}") from None
            if kept == 0:
                raise ValueError("no video frames")
            dst.mux(vout.encode())
        if vin.frames and vin.frames != decoded:
            raise ValueError(f"container reports {vin.frames} frames but {decoded} decode")
    source = {"width": width, "height": height, "fps": float(rate_in), "num_frames": decoded, "bytes": len(data)}
    return buf.getvalue(), source


def transcode_record(t: Transcode) -> dict:
    """What a transcoded sample's json says about how it was made."""
    import av

    return dataclasses.asdict(t) | {
        "codec": "libx264", "x264_options": t.x264_options(), "pyav": av.__version__,
        "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
    }


def decord_version() -> str:
    import decord

    return decord.__version__


def check_video(item: tuple[bytes, dict | None]) -> tuple[bytes | None, dict]:
    """Runs in a bounded worker: (the bytes to store where they are new, facts), or an exception
    naming what is wrong. Transcoded bytes are probed too: they are what every stage decodes."""
    data, settings = item
    if settings is None:
        return None, probe_video(data)
    stored, source = transcode(data, Transcode(**settings))
    return stored, probe_video(stored) | {"source_video": source}


# ---------------------------------------------------------------- one shard (a Ray task)


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def tar_bytes(samples: list[dict]) -> bytes:
    """A reproducible tar (fixed mtime and owner, as `pipeline/shards.py: write_shard`) in memory."""
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, user="", group="", mtime=0, encoder=False) as sink:  # leaves buf open
        for sample in samples:
            sink.write(sample)
    return buf.getvalue()


def marker_location(out: str, name: str) -> str:
    return fs.join(out, STATE, f"{name}.json")


def ingest_shard(job: dict) -> dict:
    """Write shard `job["name"]` of `job["out"]` from `job["videos"]` ([path, key, label, label_index]
    rows) and its commit marker; returns the marker. A missing or undecodable video is an error
    row; any other storage error propagates (the shard stays uncommitted, a rerun redoes it)."""
    settings = job["transcode"]
    record = transcode_record(Transcode(**settings)) if settings else None
    retries_before = fs.retry_counts()
    samples, errors = [], []
    for path, key, label, label_index in job["videos"]:
        try:
            data = fs.read_bytes(path)
        except FileNotFoundError:
            errors.append([path, key, "FileNotFoundError: no such file"])
            continue
        _, ok, result = next(bounded_map(check_video, [(data, settings)], timeout_s=job["timeout_s"], workers=1))
        if not ok:
            errors.append([path, key, result])
            continue
        stored, facts = result
        meta = {"source": path, "label": label, "label_index": label_index} | facts
        if record:
            meta["transcode"] = record
        suffix = PurePosixPath(path).suffix.lower()
        ext = "mp4" if stored is not None or suffix not in VIDEO_SUFFIXES else suffix.lstrip(".")
        samples.append({"__key__": key, ext: data if stored is None else stored, "json": json.dumps(meta, sort_keys=True).encode()})
    marker = {"name": job["name"], "inputs": len(job["videos"]), "samples": len(samples), "errors": errors, "entry": None}
    if samples:
        data = tar_bytes(samples)
        entry = entry_from_bytes(job["name"], data)  # from the bytes in hand: no read back
        fs.write_bytes(fs.join(job["out"], f"{job['name']}.tar"), data)
        members = {k: {ext: [int(m[0]), int(m[1])] for ext, m in exts.items()} for k, exts in entry["members"].items()}
        marker["entry"] = entry | {"members": members}
    # written last: a shard is committed once this exists
    fs.write_bytes(marker_location(job["out"], job["name"]), json.dumps(marker, sort_keys=True).encode())
    # this task's storage retries (pipeline/fs.py counts per process; a Ray worker is another process)
    retries = {k: n - retries_before.get(k, 0) for k, n in fs.retry_counts().items() if n > retries_before.get(k, 0)}
    return marker | {"storage_retries": retries}


# ---------------------------------------------------------------- the driver


def _job_record(cfg: IngestConfig, shards: list[list[SourceVideo]], label_map: list[str]) -> dict:
    digest = hashlib.sha256()
    for i, videos in enumerate(shards):
        for v in videos:
            digest.update(json.dumps([i, v.path, v.key, v.label]).encode())
    return {
        "format": JOB_FORMAT,
        "samples_per_shard": cfg.samples_per_shard,
        # with the versions: a rerun by another encoder or decoder would mix two kinds of shard
        "transcode": transcode_record(cfg.transcode) if cfg.transcode else None,
        "decord": decord_version(),
        "sources": sum(len(s) for s in shards),
        "shards": len(shards),
        "sources_sha256": digest.hexdigest(),
        "label_map_sha256": hashlib.sha256(json.dumps(label_map).encode()).hexdigest(),
    }


def _check_job(out: str, record: dict) -> None:
    """The first run records its settings; a rerun into the same folder must have the same, since
    its shards are kept. A folder with shards and no record came from elsewhere: refused."""
    location = fs.join(out, STATE, "job.json")
    if not fs.exists(location):
        if fs.exists(out) and fs.glob(fs.join(out, "*.tar")):
            raise ValueError(f"DATA={out} already holds shards that no ingest recorded (moving digits, an older make data?): "
                             "ingest into an empty folder")
        fs.write_bytes(location, json.dumps(record, indent=1, sort_keys=True).encode())
        return
    before = json.loads(fs.read_bytes(location))
    changed = [k for k in record if before.get(k) != record[k]]
    if changed:
        k = changed[0]
        raise ValueError(f"DATA={out} was ingested with {k}={before.get(k)!r}, this run has {record[k]!r}: "
                         "ingest into a new folder (a rerun keeps the shards there, so its settings must match)")


def _clear_temporaries(out: str) -> None:
    """Half-written files of a killed run on a local disk (object stores have none: a PUT is whole)."""
    if fs.is_remote(out):
        return
    for pattern in ("shard-*.tar.tmp-*", f"{STATE}/shard-*.json.tmp-*"):
        for path in fs.glob(fs.join(out, pattern)):
            fs.remove(path)


def _committed(out: str, names: list[str]) -> dict[str, dict]:
    """The markers of committed shards (read in parallel: thousands of small GETs on a bucket)."""
    present = {p.rsplit("/", 1)[-1].removesuffix(".json") for p in fs.glob(fs.join(out, STATE, "shard-*.json"))}
    todo = [n for n in names if n in present]
    with ThreadPoolExecutor(max_workers=16) as pool:
        markers = list(pool.map(lambda n: json.loads(fs.read_bytes(marker_location(out, n))), todo))
    return dict(zip(todo, markers))


def _run_tasks(jobs: list[dict], *, workers: int | None, progress: bool, in_process: bool) -> list[dict]:
    bar = tqdm(total=sum(len(j["videos"]) for j in jobs), desc="ingest", unit="video", disable=not progress)
    markers = []
    if in_process or not jobs:
        for job in jobs:
            markers.append(ingest_shard(job))
            bar.update(len(job["videos"]))
        bar.close()
        return markers
    import ray

    from pipeline.cluster import init_ray

    init_ray(num_cpus=workers)
    task = ray.remote(ingest_shard).options(num_cpus=1, max_retries=2)
    pending = {task.remote(job): job for job in jobs}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                markers.append(ray.get(done[0]))
            except ray.exceptions.RayTaskError as e:  # the task's own exception, as one line from the job
                cause = e.cause if isinstance(e.cause, (OSError, ValueError)) else None
                if cause is None:
                    raise
                message = f"shard {job['name']}: {_first_line(cause)}"
                try:
                    error = type(cause)(message)
                except Exception:  # an exception type that wants other arguments
                    error = (OSError if isinstance(cause, OSError) else ValueError)(message)
                raise error from None
            bar.update(len(job["videos"]))
    finally:
        bar.close()
    return markers


def build_shards(
    src: str, out: str, cfg: IngestConfig | None = None, *, label_root: str | None = None, labels: str | None = None,
    workers: int | None = None, progress: bool = True, in_process: bool = False,
) -> dict:
    """Ingest `src` into the split folder `out` (the label map at `label_root`, default `out`);
    shards committed by an earlier run of the same job are kept. `workers`: CPUs of a local Ray
    (None: all; ignored under RAY_ADDRESS); 0 or `in_process`: one shard after another in this
    process, no Ray (the same bytes). Returns a summary."""
    cfg = cfg or IngestConfig()
    in_process = in_process or workers == 0
    retries_before = fs.retry_counts()
    out = _absolute(str(out).rstrip("/"))
    label_root = _absolute(str(label_root or out).rstrip("/"))
    videos = discover(src)
    shards, errors = plan_shards(videos, cfg.samples_per_shard)
    label_map, label_location = settle_label_map(label_root, [v.label for v in videos], given=labels)
    index_of = {name: i for i, name in enumerate(label_map)}
    _check_job(out, _job_record(cfg, shards, label_map))
    _clear_temporaries(out)
    names = [shard_name(i) for i in range(len(shards))]
    done = _committed(out, names)
    settings = dataclasses.asdict(cfg.transcode) if cfg.transcode else None
    jobs = [
        {"out": out, "name": name, "timeout_s": cfg.timeout_s, "transcode": settings,
         "videos": [[v.path, v.key, v.label, index_of[v.label]] for v in group]}
        for name, group in zip(names, shards) if name not in done
    ]
    if done:
        print(f"ingest: resuming, {len(done)} of {len(names)} shards already committed in {out}")
    task_retries: Counter[str] = Counter()
    for marker in _run_tasks(jobs, workers=workers, progress=progress, in_process=in_process):
        task_retries.update(marker.pop("storage_retries"))
        done[marker["name"]] = marker
    markers = [done[n] for n in names]
    errors += [tuple(e) for m in markers for e in m["errors"]]
    errors.sort(key=lambda e: (e[1], e[0]))
    entries = [m["entry"] for m in markers if m["entry"] is not None]
    write_index(out, entries)
    table = pa.table({name: [e[i] for e in errors] for i, name in enumerate(ERRORS_SCHEMA.names)}, schema=ERRORS_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    fs.write_bytes(fs.join(out, "errors.parquet"), sink.getvalue().to_pybytes())
    # this process's retries, and the Ray tasks' (in process, the tasks' are among this process's)
    retries = Counter(fs.retry_counts()) - Counter(retries_before) + (Counter() if in_process else task_retries)
    samples = sum(m["samples"] for m in markers)
    if samples + len(errors) != len(videos):  # the invariant the whole report rests on
        raise RuntimeError(f"{len(videos)} inputs but {samples} samples + {len(errors)} errors")
    return {
        "inputs": len(videos),
        "samples": samples,
        "errors": len(errors),
        "shards": len(entries),
        "shards_written_now": len(jobs),
        "shards_kept": len(names) - len(jobs),
        "bytes": sum(e["bytes"] for e in entries),
        "labels": label_location,
        "classes": len(label_map),
        "storage_retries": dict(retries),  # each also a WARNING line in the log of the process that retried
        "error_reasons": [{"source": e[0], "reason": e[2]} for e in errors],
    }
