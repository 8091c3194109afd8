"""Start-up and storage traffic at scale (issue 32's rows of make bench), each at two sizes side by side.

- `startup_rows`: time from starting `jobs.extract_targets` (as `make extract-targets` does) to its
  first teacher forward, and a stage-2 rank's time from listing its shards to its first batch, with
  500 and with 4,000 source shards of one tiny clip each, on a local disk and on the local
  S3-protocol server (moto's, as the tests use). The bound of a 4,000-shard row is 1.5 x the
  500-shard figure: start-up must not grow with the number of shards.
- `traffic_rows`: bytes read plus bytes written in the store during an extraction, per byte of the
  finished store, counted at the filesystem layer (pipeline/fs.py and Zarr's stores, in every
  process of the job). Bound 1.5.

Every measurement runs in a fresh process, as a job starts: nothing cached, no Ray up. The first
teacher forward is seen by a hook that Ray runs in each worker (`worker_process_setup_hook`),
which also counts the storage traffic; `PYTHONPATH` may name another checkout, so the same
measurement runs on another version of the code (the issue's "today" figures).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from experiments.bench import row
from pipeline import fs
from pipeline.dataset_index import entry_from_bytes, write_index
from pipeline.store.provenance import open_store, provenance
from pipeline.store.write import ExtractedRow, encode_shard, rebuild_tables
from pipeline.video import clip_hash, decode
from salt.config import Config

ROOT = Path(__file__).resolve().parents[1]
SIZES = (500, 4000)
GROWTH_BOUND = 1.5  # the larger size's figure over the smaller's
TRAFFIC_BOUND = 1.5
KEY = "clip"  # every shard's one sample: one decode gives every manifest its clip hash


def tiny_video(frames: int = 72, size: int = 32) -> bytes:
    """A few KB of H.264: enough frames for the tiny config's 16 x 4 clip."""
    from pipeline.digits import encode_mp4

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    return encode_mp4(np.stack([np.roll(base, i, axis=1) for i in range(frames)]))


def shard_bytes(video: bytes, keys: list[str]) -> bytes:
    """A WebDataset tar of `keys`, each the same video and a label."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key in keys:
            for ext, data in (("mp4", video), ("json", json.dumps({"label": 0}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def put_many(files: dict[str, bytes]) -> None:
    """Many small files: one concurrent batch on an object store, plain writes on a disk."""
    if not files:
        return
    first = next(iter(files))
    if fs.is_remote(first):
        filesystem, _ = fs.resolve(first)
        filesystem.pipe({fs.resolve(k)[1]: v for k, v in files.items()})
        return
    for path, data in files.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def write_dataset(root: str, shards: int, video: bytes, *, samples_per_shard: int = 1, index: bool = True) -> str:
    """`shards` tars under root/train (and the dataset index, as ingest writes it); returns root."""
    folder = fs.join(root, "train")
    files, entries = {}, []
    for i in range(shards):
        keys = [KEY] if samples_per_shard == 1 else [f"clip-{i:05d}-{j:03d}" for j in range(samples_per_shard)]
        data = shard_bytes(video, keys)
        files[fs.join(folder, f"shard-{i:06d}.tar")] = data
        if index:
            entries.append(entry_from_bytes(f"shard-{i:06d}", data) if samples_per_shard > 1 or not entries
                           else entries[0] | {"name": f"shard-{i:06d}"})  # identical bytes: one walk serves all
    put_many(files)
    if index:
        write_index(folder, entries)
    return root


def write_store(store: str, data: str, cfg: Config, shards: int, video: bytes) -> str:
    """A committed store of `shards` one-sample shards whose manifests match `data`'s clips, written
    directly (an extraction of 4,000 shards would take the bench's whole budget): store.json as
    extraction writes it, each shard's files and marker, and the store-level tables."""
    import hashlib

    from pipeline.dataset_index import load_index
    from pipeline.shards import list_shards
    from salt.models.factory import config_grid

    sources = list_shards(data)
    index = load_index(fs.join(data, "train"))
    tokens = int(np.prod(config_grid(cfg)))
    width = 96
    meta = provenance(cfg, data=data, split="train", teacher={"width": width, "note": "bench_scale: zero targets"},
                      shards=sources, index=index)
    store_id = open_store(store, meta, None)
    frames, spec = decode(video, cfg.data, key=KEY, view=0)
    latents = np.zeros((tokens, width), cfg.extract.dtype)
    sample = ExtractedRow(key=KEY, view=0, clip_hash=clip_hash(frames), frame_indices=tuple(spec.frame_indices),
                          crop=tuple(spec.crop), flip=bool(spec.flip), latents=latents)
    files, markers, fresh = {}, {}, {}
    template = encode_shard("shard-000000", [sample], [], cfg.extract.storage)  # the same array in every shard
    for i in range(shards):
        name = f"shard-{i:06d}"
        # only the manifest names its shard (the errors table has no rows): the rest is the template's bytes
        encoded = template | {"manifest.parquet": _renamed_manifest(template["manifest.parquet"], name)}
        folder = fs.join(store, "targets", f"{name}.zarr")
        files |= {fs.join(folder, k): v for k, v in encoded.items()}
        shard_meta = {"shard": name, "store_id": store_id, "rows": 1, "errors": 0, "storage": cfg.extract.storage.describe(),
                      "sha256": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(encoded.items())}}
        markers[fs.join(folder, "shard.json")] = json.dumps(shard_meta, indent=1).encode()
        fresh[name] = {"manifest": encoded["manifest.parquet"], "errors": encoded["errors.parquet"], "store_id": store_id}
    put_many(files)
    put_many(markers)  # the markers after every shard's files, as commits do
    rebuild_tables(store, fresh)
    return store


def _renamed_manifest(manifest: bytes, shard: str) -> bytes:
    """A manifest's bytes with its rows' shard column set to `shard`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store.layout import parquet_bytes

    table = pq.ParquetFile(pa.BufferReader(manifest)).read()
    column = table.schema.get_field_index("shard")
    return parquet_bytes(table.set_column(column, "shard", pa.array([shard] * table.num_rows, pa.string())))


# ---- measured in fresh processes ---------------------------------------------------------------

# Runs in the job's driver and, through Ray's worker_process_setup_hook, in every Ray worker: marks
# the first teacher forward (a file made once, holding the wall-clock time), and counts the bytes
# read and written below the locations SALT_BENCH_COUNT names ("name=prefix;..."), one line per
# operation appended to a file per process under SALT_BENCH_TRAFFIC.
HOOK = r'''
def bench_hook():
    import os, time
    from salt.models import frozen

    if getattr(frozen.FrozenTeacher, "_bench_hooked", False):
        return
    frozen.FrozenTeacher._bench_hooked = True
    real_forward = frozen.FrozenTeacher.forward

    def forward(self, clips):
        out = real_forward(self, clips)
        try:
            fd = os.open(os.environ["SALT_BENCH_MARK"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, repr(time.time()).encode())
            os.close(fd)
        except FileExistsError:
            pass
        return out

    frozen.FrozenTeacher.forward = forward
    spec = os.environ.get("SALT_BENCH_COUNT", "")
    if not spec:
        return
    prefixes = [p.split("=", 1) for p in spec.split(";") if p]
    log = os.path.join(os.environ["SALT_BENCH_TRAFFIC"], str(os.getpid()))

    def bare(location):
        text = str(location)
        return text.split("://", 1)[1] if "://" in text else text

    def record(kind, location, n):
        where = bare(location)
        for name, prefix in prefixes:
            if where.startswith(prefix):
                fd = os.open(log, os.O_CREAT | os.O_APPEND | os.O_WRONLY)
                os.write(fd, f"{name} {kind} {int(n)}\n".encode())
                os.close(fd)
                return

    from pipeline import fs

    real = {n: getattr(fs, n) for n in ("read_bytes", "read_range", "write_bytes", "open_file", "move")}

    def read_bytes(location, *a, **k):
        out = real["read_bytes"](location, *a, **k)
        record("r", location, len(out))
        return out

    def read_range(location, start, length, *a, **k):
        out = real["read_range"](location, start, length, *a, **k)
        record("r", location, len(out))
        return out

    def write_bytes(location, data, *a, **k):
        real["write_bytes"](location, data, *a, **k)
        record("w", location, len(data))

    class Counted:
        def __init__(self, f, location):
            self._f, self._where = f, location
        def read(self, *a):
            out = self._f.read(*a)
            record("r", self._where, len(out))
            return out
        def readinto(self, buffer):
            n = self._f.readinto(buffer)
            record("r", self._where, n or 0)
            return n
        def write(self, data):
            record("w", self._where, len(data))
            return self._f.write(data)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self._f.__exit__(*exc)
        def __iter__(self):
            return iter(self._f)
        def __getattr__(self, name):
            return getattr(self._f, name)

    def open_file(location, mode="rb", *a, **k):
        return Counted(real["open_file"](location, mode, *a, **k), location)

    def move(src, dst, *a, **k):
        if fs.is_remote(src):  # a copy of every object: each byte read and written once more
            total = fs.total_bytes(src)
            record("r", src, total)
            record("w", dst, total)
        return real["move"](src, dst, *a, **k)

    fs.read_bytes, fs.read_range, fs.write_bytes, fs.open_file, fs.move = read_bytes, read_range, write_bytes, open_file, move

    from zarr.storage import FsspecStore, LocalStore

    for cls, root in ((LocalStore, lambda s: str(s.root)), (FsspecStore, lambda s: str(s.path))):
        def wrap(cls=cls, root=root):
            get, put, partial = cls.get, cls.set, cls.get_partial_values

            async def counted_get(self, key, *a, **k):
                out = await get(self, key, *a, **k)
                if out is not None:
                    record("r", f"{root(self)}/{key}", len(out))
                return out

            async def counted_set(self, key, value, *a, **k):
                record("w", f"{root(self)}/{key}", len(value))
                return await put(self, key, value, *a, **k)

            async def counted_partial(self, prototype, key_ranges, *a, **k):
                key_ranges = list(key_ranges)
                out = await partial(self, prototype, key_ranges, *a, **k)
                for (key, _), buf in zip(key_ranges, out):
                    if buf is not None:
                        record("r", f"{root(self)}/{key}", len(buf))
                return out

            cls.get, cls.set, cls.get_partial_values = counted_get, counted_set, counted_partial
        wrap()
'''

EXTRACT = HOOK + r'''
import os, signal, sys, threading, time, runpy
import ray

bench_hook()
ray.init(num_cpus=int(os.environ["SALT_BENCH_CPUS"]), include_dashboard=False, logging_level="ERROR",
         _temp_dir=os.environ["SALT_BENCH_RAY_TMP"], runtime_env={"worker_process_setup_hook": bench_hook})
if os.environ.get("SALT_BENCH_STOP"):
    def stop_at_first_forward():
        while not os.path.exists(os.environ["SALT_BENCH_MARK"]):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=stop_at_first_forward, daemon=True).start()
sys.argv = ["jobs.extract_targets", *sys.argv[1:]]
try:
    runpy.run_module("jobs.extract_targets", run_name="__main__")
except KeyboardInterrupt:
    pass
finally:
    ray.shutdown()
'''

# A stage-2 rank's loader, as a training job builds it: the time from the process's start (argv[6],
# the parent's clock) to its first batch, and the part of it from listing the shards on.
STAGE2 = r'''
import json, sys, time
import torch  # a rank imports its model and training code before its loader
from pipeline.loaders import TargetStream
from pipeline.shards import list_shards
from salt.config import load_config
cfg = load_config(sys.argv[1], sys.argv[6:])
t1 = time.time()
stream = TargetStream(cfg, list_shards(sys.argv[2]), batch_size=int(sys.argv[4]), store=sys.argv[3])
batch = next(iter(stream))
t2 = time.time()
print(json.dumps({"rank_s": t2 - float(sys.argv[5]), "loader_s": t2 - t1, "samples": len(batch["keys"])}))
'''


def _env(pythonpath: str | None, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, as a job on one machine
    env["PYTHONPATH"] = os.pathsep.join([pythonpath or str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env | extra


def _kill_ray(temp: str) -> None:
    """Processes of the Ray this measurement started, found by its private temp dir on their
    command lines (a driver stopped at its first forward may leave its Ray running)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def run_extraction(data: str, teacher: str, store: str, overrides: list[str], *, config: str, stop_at_first_forward: bool,
                   count: dict[str, str] | None = None, pythonpath: str | None = None, cpus: int = 2,
                   timeout_s: float = 900) -> dict:
    """jobs.extract_targets in a fresh process; returns the seconds from its start to the first
    teacher forward, its wall time, and (with `count`: name -> location) bytes read and written
    below each location."""
    work = Path(tempfile.mkdtemp(prefix="bs", dir="/tmp"))  # Ray's socket paths must stay short
    mark, traffic, temp = work / "first-forward", work / "traffic", work / "ray"
    traffic.mkdir()
    spec = ";".join(f"{name}={loc.split('://', 1)[-1]}" for name, loc in (count or {}).items())
    env = _env(pythonpath, {"SALT_BENCH_MARK": str(mark), "SALT_BENCH_TRAFFIC": str(traffic), "SALT_BENCH_COUNT": spec,
                            "SALT_BENCH_CPUS": str(cpus), "SALT_BENCH_RAY_TMP": str(temp),
                            "SALT_BENCH_STOP": "1" if stop_at_first_forward else ""})
    cmd = [sys.executable, "-c", EXTRACT, "--config", config, "--data", data, "--teacher", teacher, "--store", store,
           "--no-progress", *overrides]
    start = time.time()
    try:
        # cwd: `python -c` puts the working folder first on sys.path, ahead of PYTHONPATH
        proc = subprocess.run(cmd, cwd=pythonpath or ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        wall = time.time() - start
        if not mark.exists():
            raise RuntimeError(f"extraction never ran its teacher (exit {proc.returncode}): {proc.stderr[-2000:]}")
        if not stop_at_first_forward and proc.returncode != 0:
            raise RuntimeError(f"extraction failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        counts: dict[str, dict[str, int]] = {name: {"r": 0, "w": 0} for name in (count or {})}
        for log in traffic.iterdir():
            for line in log.read_text().splitlines():
                name, kind, n = line.split()
                counts[name][kind] += int(n)
        return {"first_forward_s": float(mark.read_text()) - start, "wall_s": wall, "traffic": counts}
    finally:
        _kill_ray(str(temp))
        shutil.rmtree(work, ignore_errors=True)


def run_stage2(config: str, data: str, store: str, overrides: list[str], *, batch_size: int = 4,
               pythonpath: str | None = None, timeout_s: float = 900) -> dict:
    """A stage-2 rank's loader in a fresh process: seconds from the process's start to its first batch
    (`rank_s`), and from listing its shards to its first batch (`loader_s`)."""
    cmd = [sys.executable, "-c", STAGE2, config, data, store, str(batch_size), repr(time.time()), *overrides]
    proc = subprocess.run(cmd, cwd=pythonpath or ROOT, env=_env(pythonpath, {}), capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"stage-2 loader failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@contextmanager
def s3_server() -> Iterator[str]:
    """The local S3-protocol server (moto's), its endpoint and test credentials in this process's
    environment for as long as it runs (the measured processes inherit them); yields a new bucket's
    URL (moto keeps its buckets per process, not per server)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _root(backend: str, work: Path) -> Iterator[str]:
    """Where a measurement's data and stores go: `work` on the local disk, or a bucket of a local S3 server."""
    if backend == "s3":
        with s3_server() as bucket:
            yield bucket
    else:
        folder = work / f"run-{uuid.uuid4().hex[:8]}"  # fresh: an extraction into an old store would only resume
        folder.mkdir(parents=True)
        try:
            yield str(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def startup_figures(cfg: Config, config: str, overrides: list[str], teacher: str, work: Path, *, backends=("local", "s3"),
                    sizes=SIZES, pythonpath: str | None = None, index: bool = True) -> dict:
    """{backend: {size: {"first_forward_s", "first_batch_s"}}}: the measurements startup_rows reports.
    `pythonpath`: another checkout to measure (its code must read what this one writes)."""
    video = tiny_video()
    out: dict = {}
    for backend in backends:
        out[backend] = {}
        for n in sizes:
            # a bucket (folder) per size: moto answers a listing in time that grows with its bucket's objects
            with _root(backend, work) as root:
                data = write_dataset(fs.join(root, f"data-{n}"), n, video, index=index)
                first = run_extraction(data, teacher, fs.join(root, f"extract-{n}"), overrides, config=config,
                                       stop_at_first_forward=True, pythonpath=pythonpath)
                store = write_store(fs.join(root, f"store-{n}"), data, cfg, n, video)
                loader = run_stage2(config, data, store, overrides, pythonpath=pythonpath)
                out[backend][n] = {"first_forward_s": first["first_forward_s"], "first_batch_s": loader["rank_s"],
                                   "loader_s": loader["loader_s"]}
                print(f"bench_scale: {backend} {n} shards: {out[backend][n]}", file=sys.stderr, flush=True)
    return out


def startup_rows(cfg: Config, config: str, overrides: list[str], teacher: str, work: Path, **kwargs) -> list[dict]:
    """Rows: per backend, extraction's time to its first teacher forward and a stage-2 rank's time to
    its first batch at each size; each larger size's bound is GROWTH_BOUND x the smaller's figure."""
    figures = startup_figures(cfg, config, overrides, teacher, work, **kwargs)
    rows = []
    for backend, by_size in figures.items():
        small, *larger = sorted(by_size)
        for what, name in (("first_forward_s", "extract_first_forward_s"), ("first_batch_s", "stage2_first_batch_s")):
            where = "local S3 server (moto)" if backend == "s3" else "local disk"
            span = ("from the job's start" if what == "first_forward_s"
                    else "from the rank's process start (its loader's own part, from listing shards: {loader:.2f} s)")
            rows.append(row(f"{name}_{backend}_{small}", by_size[small][what], "s", None,
                            f"{small} shards of one tiny clip, {where}, {span}".format(loader=by_size[small]["loader_s"])))
            for n in larger:
                rows.append(row(f"{name}_{backend}_{n}", by_size[n][what], "s", GROWTH_BOUND * by_size[small][what],
                                f"{n} shards, {span}; bound: {GROWTH_BOUND} x the {small}-shard figure "
                                f"({by_size[small][what]:.2f} s)".format(loader=by_size[n]["loader_s"])))
    return rows


def traffic_figures(config: str, overrides: list[str], teacher: str, work: Path, *, backends=("local", "s3"),
                    shards: int = 8, samples_per_shard: int = 8, pythonpath: str | None = None) -> dict:
    """{backend: {"store_read", "store_written", "store_bytes", "source_read", "source_bytes"}} of one
    whole extraction of `shards` x `samples_per_shard` clips, counted in every process of the job."""
    video = tiny_video()
    out = {}
    for backend in backends:
        with _root(backend, work) as root:
            data = write_dataset(fs.join(root, "traffic-data"), shards, video, samples_per_shard=samples_per_shard)
            store = fs.join(root, "traffic-store")
            done = run_extraction(data, teacher, store, overrides, config=config, stop_at_first_forward=False,
                                  count={"store": store, "source": fs.join(data, "train")}, pythonpath=pythonpath)
            source_bytes = sum(fs.size(s) for s in fs.glob(fs.join(data, "train", "*.tar")))
            out[backend] = {"store_read": done["traffic"]["store"]["r"], "store_written": done["traffic"]["store"]["w"],
                            "store_bytes": fs.total_bytes(store), "source_read": done["traffic"]["source"]["r"],
                            "source_bytes": source_bytes}
            print(f"bench_scale: traffic {backend}: {out[backend]}", file=sys.stderr, flush=True)
    return out


def traffic_rows(config: str, overrides: list[str], teacher: str, work: Path, **kwargs) -> list[dict]:
    """Rows: store bytes read + written per byte of finished store, per backend (bound TRAFFIC_BOUND)."""
    rows = []
    for backend, f in traffic_figures(config, overrides, teacher, work, **kwargs).items():
        ratio = (f["store_read"] + f["store_written"]) / f["store_bytes"]
        rows.append(row(f"extract_store_traffic_{backend}", ratio, "x", TRAFFIC_BOUND,
                        f"store bytes read {f['store_read']:,} + written {f['store_written']:,} over the finished store's "
                        f"{f['store_bytes']:,} ({'local S3 server' if backend == 's3' else 'local disk'}); source shards read "
                        f"{f['source_read'] / f['source_bytes']:.2f}x their {f['source_bytes']:,} bytes"))
    return rows


def main(argv: list[str] | None = None) -> None:
    """python -m experiments.bench_scale [--pythonpath OTHER_CHECKOUT] [--sizes 500,4000] [--backends local,s3]:
    the figures as JSON (for before/after comparisons; make bench reports the rows)."""
    import argparse

    from experiments.runs import run_teacher
    from salt.config import load_config, with_overrides

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--config", default="jobs/configs/tiny.yaml")
    p.add_argument("--pythonpath", default=None)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--backends", default="local,s3")
    p.add_argument("--parts", default="startup,traffic")
    p.add_argument("--work", default=None)
    p.add_argument("--teacher", default=None)
    p.add_argument("--no-index", action="store_true", help="datasets without index.parquet (extraction makes it: its first use)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    overrides = ["extract.batch_size=4", *args.overrides]
    cfg = load_config(args.config, overrides)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher
    if teacher is None:
        teacher = str(work / "teacher")
        if not Path(teacher, "checkpoint.json").exists() and not Path(teacher).exists():
            from experiments.bench import QUICK_TEACHER

            data = write_dataset(str(work / "teacher-data"), 4, tiny_video(), samples_per_shard=4)
            run_teacher(with_overrides(cfg, *QUICK_TEACHER), data, Path(teacher), progress=False)
    backends = tuple(b for b in args.backends.split(",") if b)
    result: dict = {"pythonpath": args.pythonpath}
    if "startup" in args.parts:
        result["startup"] = startup_figures(cfg, args.config, overrides, teacher, work / "startup", backends=backends,
                                            sizes=tuple(int(s) for s in args.sizes.split(",")), pythonpath=args.pythonpath,
                                            index=not args.no_index)
    if "traffic" in args.parts:
        result["traffic"] = traffic_figures(args.config, overrides, teacher, work / "traffic", backends=backends,
                                            pythonpath=args.pythonpath)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
