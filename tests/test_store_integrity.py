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
import pytest

from jobs import inspect_store
from pipeline.extract import extract_targets
from pipeline.shards import list_shards
from pipeline.stream import TargetStream
from pipeline.targets import CorruptStoreError, TargetStore, shard_dir, verify_store
from tests.conftest import FAST, ROOT, tiny_config
from tests.test_pipeline import assert_same_store, store_contents

FP32 = ["extract.dtype=float32"]


def extract_cli(data: str, teacher: str, store: str, env: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "jobs.extract_targets", "--data", data, "--teacher", teacher, "--store", store,
            "--no-progress", *FAST, *FP32]


def test_sigkill_of_the_driver_then_rerun_gives_the_clean_store(six_shards, teacher_dir, clean_six, tmp_path):
    store = tmp_path / "killed"
    proc = subprocess.Popen(extract_cli(six_shards, teacher_dir, str(store)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((store / "targets").glob("*.zarr/shard.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = list((store / "targets").glob("*.zarr/shard.json"))
    assert 1 <= len(committed) < 6, "the kill must land mid-job"
    rerun = subprocess.run(extract_cli(six_shards, teacher_dir, str(store)), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f'"shards_extracted_now": {6 - len(committed)}' in rerun.stdout
    assert_same_store(clean_six, str(store))


def test_source_shards_are_fingerprinted_once(six_shards, teacher_dir, ray_local, tmp_path, monkeypatch):
    """A resume trusts the sha256 the store recorded for a shard of the same name, path and size
    instead of re-reading every source shard; a shard whose size changed is hashed again and the
    store refuses the job."""
    from pipeline import fs
    from pipeline.targets import StoreMismatchError

    data, store = tmp_path / "data", str(tmp_path / "store")
    shutil.copytree(six_shards, data)  # a copy: the test changes a shard
    cfg = tiny_config(*FP32)
    assert extract_targets(cfg, data=str(data), teacher=teacher_dir, store=store, progress=False)["shards_extracted_now"] == 6
    hashed: list[str] = []
    real = fs.sha256
    monkeypatch.setattr(fs, "sha256", lambda location: hashed.append(location) or real(location))
    shards = list_shards(str(data), "train")
    again = extract_targets(cfg, data=str(data), teacher=teacher_dir, store=store, progress=False)
    assert again["shards_extracted_now"] == 0 and not set(hashed) & set(shards)

    with open(shards[2], "ab") as f:
        f.write(b"\0" * 512)  # a tar padded by one block: same samples, other bytes
    with pytest.raises(StoreMismatchError, match=r"source\.shards"):
        extract_targets(cfg, data=str(data), teacher=teacher_dir, store=store, progress=False)
    assert hashed == [shards[2]]


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


def test_retried_rows_are_written_once(tmp_path, ray_local):
    import ray

    from pipeline.extract import _commit_as_complete
    from salt.storage import StorageFormat

    def row(key: str, order: int) -> dict:
        return {"shard": "shard-000000", "shard_total": 2, "order": order, "key": key, "view": 0, "error": "",
                "clip_hash": "h" + key, "frame_indices": np.arange(4, dtype=np.int32), "crop": np.zeros(4, np.int32),
                "flip": False, "latents": np.full((3, 2), order, np.float32)}

    # rows arrive twice, as when Ray re-runs a task whose output was already seen,
    # before and after their shard is complete
    ds = ray.data.from_items([row("a", 0), row("a", 0), row("b", 1), row("b", 1)], override_num_blocks=1)
    forwarded, _ = _commit_as_complete(ds, tmp_path, StorageFormat(dtype="float32"), "test-store")
    manifest, array = store_contents(str(tmp_path))["shard-000000"]
    assert forwarded == 2 and [m["key"] for m in manifest] == ["a", "b"] and array.shape == (2, 3, 2)


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


def test_teacher_actors_ask_the_cluster_for_gpus(ray_local, monkeypatch):
    """GPUs per actor come from the cluster's resources, not from the driver's CUDA."""
    import torch

    from pipeline.cluster import actor_gpus

    assert actor_gpus({"CPU": 128.0, "GPU": 8.0}) == 1  # a CPU-only driver of a GPU cluster
    assert actor_gpus({"CPU": 2.0}) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a driver that sees CUDA ...
    assert actor_gpus() == 0  # ... of this CPU-only local cluster asks for none
