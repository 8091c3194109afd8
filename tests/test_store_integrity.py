"""A store is all-or-nothing per shard, resumable after SIGKILL, verifiable, and refuses to be
trained on once damaged."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from jobs import inspect_store
from pipeline.extract import extract_targets
from pipeline.shards import list_shards
from pipeline.loaders import TargetStream
from pipeline.store.layout import CorruptStoreError, StoreMismatchError, parts_dir, shard_dir
from pipeline.store.read import TargetStore, summarize
from pipeline.store.verify import verify_store
from tests.conftest import FAST, ROOT, tiny_config
from tests.test_pipeline import assert_same_store, store_contents

FP32 = ["extract.dtype=float32"]


def extract_cli(data: str, teacher: str, store: str, env: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "jobs.extract_targets", "--data", data, "--teacher", teacher, "--store", store,
            "--no-progress", *FAST, *FP32]


def settled_shards(store: Path, *, quiet_s: float = 3.0, limit_s: float = 60.0) -> list[Path]:
    """The committed shards once none has appeared for quiet_s: a shard-commit task that a driver's
    kill left running in a Ray worker still finishes its (whole) shard until Ray ends that worker."""
    seen, since, deadline = None, time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        now = sorted((store / "targets").glob("*.zarr/shard.json"))
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.2)
    return seen


def test_sigkill_of_the_driver_then_rerun_gives_the_clean_store(six_shards, teacher_dir, clean_six, ray_local, tmp_path):
    store = tmp_path / "killed"
    proc = subprocess.Popen(extract_cli(six_shards, teacher_dir, str(store)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((store / "targets").glob("*.zarr/shard.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = settled_shards(store)
    assert 1 <= len(committed) < 6, "the kill must land mid-job"
    rerun = extract_targets(tiny_config(*FP32), data=six_shards, teacher=teacher_dir, store=str(store), progress=False)
    assert rerun["shards_extracted_now"] == 6 - len(committed)
    assert_same_store(clean_six, str(store))


def test_source_shards_are_read_from_the_index_and_a_changed_one_is_refused_by_its_reader(
        six_shards, teacher_dir, ray_local, tmp_path, monkeypatch):
    """store.json's sizes and sha256 come from the dataset index: the driver opens no source shard,
    on a first extraction or a rerun. A shard edited after indexing is refused by the decode task
    that opens it, with one line naming it (no serial pre-pass over the dataset)."""
    from pipeline import fs
    from pipeline.dataset_index import ShardChangedError

    data, store = tmp_path / "data", str(tmp_path / "store")
    shutil.copytree(six_shards, data)  # a copy: the test changes a shard
    shards = list_shards(str(data), "train")
    opened: list[str] = []
    for name in ("sha256", "size", "read_bytes", "open_file"):  # every way the driver could read a shard
        real = getattr(fs, name)
        monkeypatch.setattr(fs, name, lambda location, *a, _real=real, **k: opened.append(str(location)) or _real(location, *a, **k))
    cfg = tiny_config(*FP32)
    assert extract_targets(cfg, data=str(data), teacher=teacher_dir, store=store, progress=False)["shards_extracted_now"] == 6
    again = extract_targets(cfg, data=str(data), teacher=teacher_dir, store=store, progress=False)
    assert again["shards_extracted_now"] == 0 and not set(opened) & set(shards)  # Ray's workers read them, not the driver

    with open(shards[2], "ab") as f:
        f.write(b"\0" * 512)  # a tar padded by one block: same samples, other bytes
    shutil.rmtree(shard_dir(store, "shard-000002"))  # so that a rerun extracts it again
    with pytest.raises(ShardChangedError, match=rf"source shard {shards[2]} changed after it was indexed"):
        extract_targets(cfg, data=str(data), teacher=teacher_dir, store=store, progress=False)
    assert not set(opened) & set(shards)


def test_extraction_through_a_separately_started_ray_cluster(six_shards, teacher_dir, clean_six, tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    env = dict(os.environ)
    start = subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            f"--temp-dir={temp}"], env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        store = tmp_path / "cluster"
        run = subprocess.run(extract_cli(six_shards, teacher_dir, str(store)), cwd=ROOT, env=env | {"RAY_ADDRESS": f"127.0.0.1:{port}"},
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert f':{port}"' in run.stdout.split('"ray_address"')[1]  # it joined that cluster rather than starting its own
    finally:
        stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert_same_store(clean_six, str(store))


def stop_cluster(temp: Path) -> None:
    """Kill the processes of the cluster this test started: `ray start` detaches them, so they are
    not its descendants, but every one names the test's private temp dir (made by mkdtemp) on its
    command line. `ray stop` would also stop this session's own Ray and any neighbour's."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(temp) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def shard_files(store: str) -> dict[str, bytes]:
    """Every file of every committed shard, by path below targets/, except shard.json (it holds the
    store's id): equal dicts, byte-identical shards."""
    targets = Path(store) / "targets"
    return {str(f.relative_to(targets)): f.read_bytes() for f in sorted(targets.rglob("*")) if f.is_file() and f.name != "shard.json"}


def test_shard_files_are_written_by_worker_processes(six_shards, teacher_dir, clean_six, ray_local, tmp_path, monkeypatch):
    """The teacher's actors compute the latents and Ray tasks write the shards: the driver (this process,
    Ray being local) does neither, and a pool of two actors gives the store, byte for byte, of one."""
    from ray.data import DataContext

    # Both actors up before the first batch, and one batch at a time each: the second actor gets work
    # whenever two batches wait at once. Whether they do is Ray's scheduling (on a loaded machine one
    # actor may finish each batch before the next is decoded), so the test asserts 1 or 2 actors.
    monkeypatch.setattr(DataContext.get_current(), "max_tasks_in_flight_per_actor", 1)
    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", 120)
    store = str(tmp_path / "workers")
    cfg = tiny_config(*FP32, "extract.num_actors=2", "extract.actor_num_cpus=0.5", "extract.decode_num_cpus=0.5")
    summary = extract_targets(cfg, data=six_shards, teacher=teacher_dir, store=store, progress=False)
    assert len(summary["forward_workers"]) in (1, 2) and summary["shard_writers"]
    assert os.getpid() not in summary["forward_workers"] + summary["shard_writers"]
    assert summary["teacher_forward_samples"] == 24 and summary["write_s"] > 0
    assert not Path(parts_dir(store)).exists()
    assert shard_files(store) == shard_files(clean_six) and len(shard_files(store)) >= 6 * 4
    assert verify_store(store) == []


FULL_DISK_AFTER_THE_FIRST_SHARD = """
import errno, os, runpy, sys
import ray

def disk_full_after_the_first_shard():
    # runs in every Ray worker, where shards are written: the job's first commit goes through
    # (it makes the marker file), every later one finds the disk full halfway
    from pathlib import Path
    from pipeline.store import write as store_write
    real = store_write._write_shard
    def write(folder, shard, *args):
        try:
            os.close(os.open(os.environ["FIRST_COMMIT_MARKER"], os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            (Path(folder) / "c").mkdir(parents=True, exist_ok=True)
            (Path(folder) / "c" / "partial").write_bytes(b"\\0" * 100)  # what a half-done write leaves
            raise OSError(errno.ENOSPC, "No space left on device") from None
        return real(folder, shard, *args)
    store_write._write_shard = write

ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
         runtime_env={"worker_process_setup_hook": disk_full_after_the_first_shard})
sys.argv = ["jobs.extract_targets", *sys.argv[1:]]
runpy.run_module("jobs.extract_targets", run_name="__main__")
"""


def test_full_disk_in_a_shard_writing_worker_names_the_shard_and_leaves_nothing_partial(digits, teacher_dir, store_fp32, ray_local,
                                                                                        tmp_path):
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"FIRST_COMMIT_MARKER": str(tmp_path / "first-commit"),
                                                                        "SALT_TRACEBACK": "1"}
    failed = subprocess.run([sys.executable, "-c", FULL_DISK_AFTER_THE_FIRST_SHARD, *extract_cli(digits, teacher_dir, str(store))[3:]],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    assert "OSError: [Errno 28] No space left on device" in failed.stderr
    assert "while committing shard shard-00000" in failed.stderr  # the failing shard, named in the error
    committed = sorted(p.parent.name for p in (store / "targets").glob("*.zarr/shard.json"))
    assert len(committed) == 1 and sorted(p.name for p in (store / "targets").iterdir()) == committed  # no temp folder, no parts
    rerun = extract_targets(tiny_config(*FP32), data=digits, teacher=teacher_dir, store=str(store), progress=False)
    assert rerun["shards_extracted_now"] == 1
    assert shard_files(str(store)) == shard_files(store_fp32)


def rows_of_a_task(latents: list[float]) -> list[dict]:
    """What a teacher actor returns for rows a and b of one shard: small columns and the latents."""
    return [{"shard": "shard-000000", "shard_total": 2, "order": i, "key": key, "view": 0, "error": "", "clip_hash": "h" + key,
             "frame_indices": np.arange(4, dtype=np.int32), "crop": np.zeros(4, np.int32), "flip": False,
             "latents": np.full((3, 2), x, np.float32), "writer_pid": 0} for i, (key, x) in enumerate(zip("ab", latents))]


def test_retried_rows_are_written_once(tmp_path, ray_local):
    import ray

    from pipeline.extract import _commit_as_complete
    from salt.storage import StorageFormat

    store = str(tmp_path)
    (a, b), (a_again, b_again) = rows_of_a_task([0, 1]), rows_of_a_task([10, 11])
    # rows arrive twice, as when Ray re-runs a task whose output was already seen, before and
    # after their shard is complete; the first copy of each is the one written
    ds = ray.data.from_items([a, a_again, b, b_again], override_num_blocks=2)
    summary = _commit_as_complete(ds, store, StorageFormat(dtype="float32"), "test-store")
    manifest, array = store_contents(store)["shard-000000"]
    assert summary["teacher_forward_samples"] == 2 and [m["key"] for m in manifest] == ["a", "b"]
    assert np.array_equal(array, np.stack([np.full((3, 2), x, np.float32) for x in (0, 1)]))
    assert summary["shard_writers"] and os.getpid() not in summary["shard_writers"]
    assert sorted(p.name for p in (tmp_path / "targets").iterdir()) == ["shard-000000.zarr"]  # no temporary folder


def test_a_failed_shard_commit_names_the_shard_and_leaves_nothing_partial(tmp_path, ray_local):
    import ray

    from pipeline.extract import _commit_as_complete
    from salt.storage import StorageFormat

    store = tmp_path / "store"
    store.mkdir()
    (store / "targets").write_bytes(b"")  # a file where the shards' folder should be: every write fails
    ds = ray.data.from_items(rows_of_a_task([0, 1]), override_num_blocks=1)
    with pytest.raises(OSError, match="while committing shard shard-000000 of target store"):
        _commit_as_complete(ds, str(store), StorageFormat(dtype="float32"), "test-store")
    assert [p.name for p in store.iterdir()] == ["targets"] and (store / "targets").read_bytes() == b""


def test_lossy_formats_are_smaller_and_close(store_fp32, digits, teacher_dir, tmp_path):
    store = str(tmp_path / "lossy")
    cfg = tiny_config("extract.keepbits=7", "extract.codec=blosc")
    extract_targets(cfg, data=digits, teacher=teacher_dir, store=store, progress=False)
    assert TargetStore(store).meta["storage"] | {} == {**TargetStore(store).meta["storage"], "keepbits": 7, "codec": "blosc"}
    exact, lossy = store_contents(store_fp32), store_contents(store)
    for shard in exact:
        a, b = exact[shard][1], lossy[shard][1].astype(np.float32)
        assert np.abs(a - b).mean() / np.abs(a).mean() < 0.01
    chunk_bytes = lambda s: sum(f.stat().st_size for sh in TargetStore(s).shards for f in (Path(shard_dir(s, sh)) / "c").rglob("*") if f.is_file())
    assert chunk_bytes(store) < 0.5 * chunk_bytes(store_fp32) * 0.8


def damaged_copy(store: str, tmp_path: Path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(store, copy)
    return copy


def test_flipped_byte_is_found_by_verify_and_stops_stage_2(store_fp32, digits, tmp_path, capsys):
    copy = damaged_copy(store_fp32, tmp_path)
    data_file = Path(shard_dir(copy, "shard-000001")) / "c" / "0" / "0" / "0"
    blob = bytearray(data_file.read_bytes())
    row_bytes = 128 * 96 * 4
    blob[3 * row_bytes + 1001] ^= 0xFF  # inside row 3's chunk
    data_file.write_bytes(bytes(blob))
    with pytest.raises(SystemExit):
        inspect_store.main([str(copy), "--verify"])
    out = capsys.readouterr().out
    assert "shard shard-000001: file c/0/0/0 changed since extraction" in out
    assert "shard shard-000001: key 'train-0000" in out and "does not match its checksum" in out
    assert out.count("CORRUPT") == 2
    dataset = TargetStream(tiny_config(), list_shards(digits), batch_size=4, store=str(copy))
    with pytest.raises(CorruptStoreError, match=r"row 3 \(key 'train-0000\d\d', view 0\) of shard shard-000001"):
        for g in range(4):
            dataset.batch(g)


def test_truncated_manifest_missing_shard_and_foreign_store_json(store_fp32, tmp_path):
    copy = damaged_copy(store_fp32, tmp_path)
    manifest = Path(shard_dir(copy, "shard-000000")) / "manifest.parquet"
    manifest.write_bytes(manifest.read_bytes()[:100])
    shutil.rmtree(Path(shard_dir(copy, "shard-000001")))
    problems = verify_store(copy)
    assert "shard shard-000000: file manifest.parquet changed since extraction" in problems
    assert any(p.startswith("shard shard-000000: manifest.parquet unreadable") for p in problems)
    assert "shard shard-000001: missing (not committed)" in problems
    assert verify_store(store_fp32) == []


PIXELS = [*FP32, "extract.pixel_cache=true"]


def test_pixel_cache_holds_the_crops_the_teacher_saw(pixel_store, store_fp32, digits):
    """Each row's stored pixels are the uint8 crop box decoding its (key, view) gives, byte for byte;
    the latents and the rest of the manifest are those of the same extraction without the cache."""
    from pipeline.shards import iter_shard
    from pipeline.video import crop, decode

    cfg = tiny_config(*PIXELS)
    store = TargetStore(pixel_store)
    assert store.has_pixels and not TargetStore(store_fp32).has_pixels
    videos = {s.key: s.video for shard in list_shards(digits) for s in iter_shard(shard)}
    with_cache, without = store_contents(pixel_store), store_contents(store_fp32)
    assert with_cache.keys() == without.keys()
    for shard, (manifest, latents) in with_cache.items():
        assert np.array_equal(latents, without[shard][1])
        columns = ("pixels_offset", "pixels_bytes", "pixels_crc32")
        assert [{k: v for k, v in m.items() if k not in columns} for m in manifest] == without[shard][0]
        for entry in manifest:
            stored = store.pixels(shard, entry)
            expected = crop(*decode(videos[entry["key"]], cfg.data, key=entry["key"], view=entry["view"]))
            assert stored.dtype == np.uint8 and stored.shape == expected.shape and stored.tobytes() == expected.tobytes()
    assert verify_store(pixel_store) == []
    cache = summarize(pixel_store)["pixel_cache"]
    assert 0 < cache["bytes_per_sample"] < cache["raw_bytes_per_sample"] and cache["codec"]["cname"] == "zstd"
    assert not Path(parts_dir(pixel_store)).exists()


def test_a_store_without_pixels_says_how_to_get_them(store_fp32, digits, teacher_dir):
    store = TargetStore(store_fp32)
    entry = next(iter(store.manifest("shard-000000").values()))
    with pytest.raises(StoreMismatchError, match=r"has no pixel cache; extract it with extract.pixel_cache=true"):
        store.pixels("shard-000000", entry)
    with pytest.raises(StoreMismatchError, match=r"pixel_cache: store has None"):  # no cache added to a store by a rerun
        extract_targets(tiny_config(*PIXELS), data=digits, teacher=teacher_dir, store=store_fp32, progress=False)


def test_flipped_byte_in_pixels_is_found_by_verify(pixel_store, tmp_path, capsys):
    copy = damaged_copy(pixel_store, tmp_path)
    store = TargetStore(copy)
    entry = sorted(store.manifest("shard-000001").values(), key=lambda e: e["row"])[3]
    pixels_bin = Path(shard_dir(copy, "shard-000001")) / "pixels.bin"
    blob = bytearray(pixels_bin.read_bytes())
    blob[entry["pixels_offset"] + entry["pixels_bytes"] // 2] ^= 0xFF  # inside row 3's blob
    pixels_bin.write_bytes(bytes(blob))
    with pytest.raises(SystemExit):
        inspect_store.main([str(copy), "--verify"])
    out = capsys.readouterr().out
    assert "shard shard-000001: file pixels.bin changed since extraction" in out
    assert f"shard shard-000001: key {entry['key']!r} view 0: CorruptStoreError" in out and out.count("CORRUPT") == 2
    with pytest.raises(CorruptStoreError, match=rf"pixels of key {entry['key']!r} view 0 in shard shard-000001"):
        store.pixels("shard-000001", entry)


def test_teacher_actors_ask_the_cluster_for_gpus(ray_local, monkeypatch):
    """GPUs per actor come from the cluster's resources, not from the driver's CUDA."""
    import torch

    from pipeline.cluster import actor_gpus

    assert actor_gpus({"CPU": 128.0, "GPU": 8.0}) == 1  # a CPU-only driver of a GPU cluster
    assert actor_gpus({"CPU": 2.0}) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a driver that sees CUDA ...
    assert actor_gpus() == 0  # ... of this CPU-only local cluster asks for none


def test_an_empty_source_shard_is_committed_empty_and_trains(digits, teacher_dir, ray_local, tmp_path):
    """A valid tar without samples gives no row: it must still end up committed, or every rerun
    stops on it and no student can start."""
    import tarfile

    from experiments.runs import run_student

    data, store = tmp_path / "data", str(tmp_path / "store")
    shutil.copytree(digits, data)
    tarfile.open(data / "train" / "shard-000099.tar", "w").close()
    cfg = tiny_config(*FP32)
    first = extract_targets(cfg, data=str(data), teacher=teacher_dir, store=store, progress=False)
    assert first["samples"] == 16 and first["shards_extracted_now"] == 3
    again = extract_targets(cfg, data=str(data), teacher=teacher_dir, store=store, progress=False)
    assert again["shards_extracted_now"] == 0 and again["teacher_forward_samples"] == 0
    assert TargetStore(store).manifest("shard-000099") == {}
    assert verify_store(store) == [] and summarize(store)["missing_shards"] == []
    summary = run_student(tiny_config("student.optim.steps=2"), str(data), store, tmp_path / "student", progress=False)
    assert summary["step"] == 2 and np.isfinite(summary["final_loss"])


def test_commits_in_flight_is_sized_from_the_cluster():
    from pipeline.extract import commits_in_flight
    from salt.config import ConfigError

    assert commits_in_flight(tiny_config(), {"CPU": 2.0}) == 4  # a laptop: at least 4
    assert commits_in_flight(tiny_config("extract.num_actors=64"), {"CPU": 1024.0, "GPU": 64.0}) == 128  # two per actor
    assert commits_in_flight(tiny_config("extract.num_actors=64", "extract.decode_num_cpus=4"), {"CPU": 256.0}) == 64  # one per CPU share
    assert commits_in_flight(tiny_config("extract.commits_in_flight=3"), {"CPU": 1024.0}) == 3  # the setting wins
    with pytest.raises(ConfigError, match=r"extract.commits_in_flight=-1"):
        tiny_config("extract.commits_in_flight=-1")


def test_store_level_tables_serve_the_shards_whose_marker_is_unchanged(store_fp32, tmp_path):
    """Stage 2 reads a shard's rows from the store-level manifest while the shard's marker is the
    one the tables were built from; a recommitted shard is read from its own files; verify finds a
    store-level copy that differs from a shard's own manifest."""
    import pyarrow.parquet as pq

    copy = damaged_copy(store_fp32, tmp_path)  # copytree keeps the markers' times: the tables still describe them
    whole = TargetStore(store_fp32).manifest("shard-000000")
    (Path(shard_dir(copy, "shard-000000")) / "manifest.parquet").unlink()
    assert TargetStore(copy).manifest("shard-000000") == whole  # not read from the shard

    own = Path(shard_dir(copy, "shard-000001")) / "manifest.parquet"
    table = pq.read_table(own)
    pq.write_table(table.set_column(table.schema.get_field_index("clip_hash"), "clip_hash",
                                    pa.array(["f" * 64] * table.num_rows)), own)
    marker = Path(shard_dir(copy, "shard-000001")) / "shard.json"
    time.sleep(0.01)
    marker.write_bytes(marker.read_bytes())  # a recommit: another version of the marker
    assert {r["clip_hash"] for r in TargetStore(copy).manifest("shard-000001").values()} == {"f" * 64}

    other = tmp_path / "other"
    shutil.copytree(store_fp32, other)
    level = other / "manifest.parquet"
    table = pq.read_table(level)
    tampered = ["0" * 64 if s == "shard-000000" else h for s, h in zip(table.column("shard").to_pylist(), table.column("clip_hash").to_pylist())]
    pq.write_table(table.set_column(table.schema.get_field_index("clip_hash"), "clip_hash", pa.array(tampered)), level)
    assert verify_store(str(other)) == [
        "shard shard-000000: its rows in the store-level manifest.parquet differ from its own manifest.parquet"]


def test_a_remote_store_is_not_listed_at_start_and_a_recommitted_shard_is_refused(monkeypatch):
    """On an object store a reader takes the committed shards from the store-level tables (no listing
    of every object) and checks each shard's marker when it first reads it."""
    import json as _json
    import uuid

    from pipeline import fs
    from pipeline.store import layout, read as store_read
    from pipeline.store.write import ExtractedRow, commit_shard, rebuild_tables
    from salt.storage import StorageFormat

    store = f"memory://stores/{uuid.uuid4().hex}"  # a remote filesystem to pipeline/fs.py
    fs.write_bytes(fs.join(store, "store.json"), _json.dumps({"store_id": "s1", "views_per_clip": 1}).encode())
    rows = [ExtractedRow(key="k", view=0, clip_hash="h", frame_indices=(0,), crop=(0, 0, 1, 1), flip=False,
                         latents=np.full((3, 2), 1, np.float32))]
    fmt = StorageFormat(dtype="float32")
    fresh = {s: commit_shard(store, s, rows, [], fmt=fmt, store_id="s1") for s in ("shard-000000", "shard-000001")}
    rebuild_tables(store, fresh)
    listings = []
    real = layout.marker_versions
    monkeypatch.setattr(store_read, "marker_versions", lambda s: listings.append(s) or real(s))
    target = TargetStore(store)
    assert target.shards == ["shard-000000", "shard-000001"] and listings == []
    target.check_identity("shard-000001")
    assert np.array_equal(target.latents("shard-000000", 0), rows[0].latents)

    marker = fs.join(shard_dir(store, "shard-000001"), "shard.json")
    time.sleep(0.01)
    fs.write_bytes(marker, fs.read_bytes(marker))  # a recommit: another version of the marker
    with pytest.raises(CorruptStoreError, match=r"shard shard-000001 was recommitted since the store-level tables were built"):
        TargetStore(store).latents("shard-000001", 0)

    commit_shard(store, "shard-000002", rows, [], fmt=fmt, store_id="s1")  # after the tables: a killed job's last commit
    late = TargetStore(store)
    assert "shard-000002" in late.shards and len(listings) == 1  # listed once, when asked for a shard the tables lack
