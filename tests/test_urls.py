"""Shards and stores as fsspec URLs: no step may assume a local path."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import pytest
import torch

from pipeline import fs
from salt.storage import StorageFormat
from pipeline.extract import extract_targets
from pipeline.shards import index_shard, list_shards, read_member
from pipeline.loaders import ClipStream, TargetStream
from pipeline.store.write import ExtractedRow, commit_shard
from pipeline.store.read import TargetStore, read_tables
from pipeline.store.layout import committed_shards
from pipeline.store.verify import verify_store
from experiments.runs import run_student
from tests.conftest import ROOT, assert_same_batch, start_moto_server, tiny_config
from tests.test_pipeline import assert_same_store
from tests.test_store_integrity import extract_cli


def test_file_urls_through_extraction_and_stage_2(digits, teacher_dir, ray_local, store_fp32, tmp_path):
    data_url = f"file://{digits}"
    store_url = f"file://{tmp_path}/store"
    summary = extract_targets(tiny_config("extract.dtype=float32"), data=data_url, teacher=teacher_dir, store=store_url, progress=False)
    assert summary["samples"] == 16
    assert_same_store(store_fp32, str(tmp_path / "store"))
    meta = TargetStore(store_url).meta
    assert all(s["path"].startswith("file://") for s in meta["source"]["shards"])
    assert verify_store(store_url) == []
    batch = TargetStream(tiny_config(), list_shards(data_url), batch_size=4, store=store_url).batch(0)
    assert batch["targets"].shape == (4, 128, 96)


def test_memory_urls_for_shards_and_store(digits):
    memory = fsspec.filesystem("memory")
    for shard in list_shards(digits):
        memory.pipe_file(f"/data/train/{Path(shard).name}", Path(shard).read_bytes())
    shards = list_shards("memory://data")
    assert shards == ["memory:///data/train/shard-000000.tar", "memory:///data/train/shard-000001.tar"]
    index = index_shard(shards[0])
    local = index_shard(list_shards(digits)[0])
    assert index == local
    key = next(iter(index))
    assert read_member(shards[0], index[key]["mp4"]) == read_member(list_shards(digits)[0], local[key]["mp4"])
    # stage 1's loader reads shards from the URL in-process (memory:// is per process, so no Ray here)
    batch = ClipStream(tiny_config(), shards, batch_size=4).batch(0)
    local_batch = ClipStream(tiny_config(), list_shards(digits), batch_size=4).batch(0)
    assert_same_batch(batch, local_batch)

    store = "memory://stores/s1"
    fs.write_bytes(fs.join(store, "store.json"), json.dumps({"store_id": "m1", "source": {"shards": [{"name": "shard-000000"}]}}).encode())
    rows = [ExtractedRow(key=f"k{i}", view=0, clip_hash="h", frame_indices=(0,), crop=(0, 0, 1, 1), flip=False,
                         latents=np.full((3, 2), i, np.float32)) for i in range(3)]
    commit_shard(store, "shard-000000", rows, [("bad", 0, "no video")], fmt=StorageFormat(dtype="float32", codec="zstd"), store_id="m1")
    assert committed_shards(store) == ["shard-000000"]
    assert not memory.glob("/stores/s1/targets/.*tmp*")
    target_store = TargetStore(store)
    assert np.array_equal(target_store.latents("shard-000000", 2), np.full((3, 2), 2, np.float32))
    manifest, errors = read_tables(store)
    assert manifest.column("key").to_pylist() == ["k0", "k1", "k2"] and errors.column("reason").to_pylist() == ["no video"]
    assert verify_store(store) == []


@pytest.fixture
def s3_endpoint(monkeypatch) -> Iterator[dict]:
    """An S3-compatible server on localhost (moto's server mode), reached through s3fs the way a
    real endpoint is: AWS_ENDPOINT_URL and credentials in the environment."""
    import s3fs

    server, url = start_moto_server()
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches filesystems with the endpoint they were made for
    try:
        yield env
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def test_s3_end_to_end_shards_teacher_store_and_stage_2(digits, teacher_dir, store_fp32, s3_endpoint, tmp_path):
    """Shards and the teacher's run folder on S3, extraction as a job (its own Ray: decode tasks and
    the actor read S3, the actor copies the teacher once), the store written to S3 byte-equal to the
    local one, verified there, and a student trained from S3 with the losses of one trained locally."""
    import s3fs

    s3 = s3fs.S3FileSystem(skip_instance_cache=True)
    s3.mkdir("salt")
    s3.put(digits, "salt/data", recursive=True)
    s3.put(teacher_dir, "salt/teacher", recursive=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, whose workers see S3
    run = subprocess.run(extract_cli("s3://salt/data", "s3://salt/teacher", "s3://salt/store"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    s3.get("salt/store", str(tmp_path / "store"), recursive=True)
    assert_same_store(store_fp32, str(tmp_path / "store"))
    meta = TargetStore("s3://salt/store").meta
    assert meta["teacher"]["checkpoint"] == "s3://salt/teacher"  # provenance names the URL, not a local copy
    assert all(s["path"].startswith("s3://salt/data/") for s in meta["source"]["shards"])
    assert verify_store("s3://salt/store") == []

    cfg = tiny_config("extract.dtype=float32")
    run_student(cfg, "s3://salt/data", "s3://salt/store", tmp_path / "student-s3", progress=False)
    run_student(cfg, digits, store_fp32, tmp_path / "student-local", progress=False)
    losses = {k: [json.loads(line)["loss"] for line in (tmp_path / f"student-{k}" / "metrics.jsonl").read_text().splitlines()]
              for k in ("s3", "local")}
    assert losses["s3"] == losses["local"] and len(losses["local"]) == cfg.student.optim.steps


def test_teacher_specs_with_urls_name_local_folders(teacher_dir):
    from pipeline.teacher_cache import local_teacher

    assert local_teacher(teacher_dir) == teacher_dir  # a path stays as given
    assert local_teacher(f"file://{teacher_dir}") == teacher_dir
    assert local_teacher(f"hf-videomae:file://{teacher_dir}") == f"hf-videomae:{teacher_dir}"
    memory = fsspec.filesystem("memory")
    for f in Path(teacher_dir).iterdir():
        if f.is_file():
            memory.pipe_file(f"/teacher-url/{f.name}", f.read_bytes())
    copy = local_teacher("memory://teacher-url")
    assert copy != teacher_dir and local_teacher("memory://teacher-url") == copy  # copied once per machine
    for f in Path(teacher_dir).iterdir():
        if f.is_file():
            assert (Path(copy) / f.name).read_bytes() == f.read_bytes()
    # the checkpoint rewritten at the same URL with every size unchanged: a fresh copy, not the stale one
    meta = Path(teacher_dir) / "checkpoint.json"
    edited = meta.read_bytes().replace(b"1", b"7", 1)
    assert len(edited) == meta.stat().st_size and edited != meta.read_bytes()
    memory.pipe_file("/teacher-url/checkpoint.json", edited)
    fresh = local_teacher("memory://teacher-url")
    assert fresh != copy and (Path(fresh) / "checkpoint.json").read_bytes() == edited
