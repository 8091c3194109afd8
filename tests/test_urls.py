"""Shards and stores as fsspec URLs: no step may assume a local path."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import torch

from pipeline import fs
from salt.storage import StorageFormat
from pipeline.extract import extract_targets
from pipeline.shards import index_shard, list_shards, read_member
from pipeline.stream import ClipStream, TargetStream
from pipeline.targets import ExtractedRow, TargetStore, commit_shard, committed_shards, read_tables, verify_store
from tests.conftest import tiny_config
from tests.test_pipeline import assert_same_store


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
    assert batch["keys"] == local_batch["keys"] and torch.equal(batch["clips"], local_batch["clips"])

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
