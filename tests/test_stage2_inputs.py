"""Stage 2 fed from the pixel cache (the conftest pixel_store): the same batches and losses as from video, no video read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from experiments.runs import run_student
from pipeline.shards import list_shards
from pipeline.loaders import TargetStream
from pipeline.store.read import TargetStore
from salt.train.student import train_student
from tests.conftest import assert_same_batch, tiny_config

PIXELS = "data.stage2_input=pixels"


def test_pixel_cache_batches_equal_decoded_ones_without_the_videos(pixel_store, digits, tmp_path):
    """Every clip from the cache is bit-equal to the clip decoded from the video (same crop box,
    same resize, flip and normalisation), and stage 2 no longer opens the source shards."""
    cfg = tiny_config()
    from_video = TargetStream(cfg, list_shards(digits), batch_size=4, store=pixel_store)
    copy = tmp_path / "data"
    shutil.copytree(digits, copy)
    shards = list_shards(str(copy))
    for s in shards:
        Path(s).unlink()  # the videos are gone: only their shard names remain
    from_cache = TargetStream(tiny_config(PIXELS), shards, batch_size=4, store=pixel_store)
    for g in (0, 5):  # epochs 0 and 1: fresh masks, same views
        assert_same_batch(from_cache.batch(g), from_video.batch(g))


def test_student_from_the_pixel_cache_trains_like_from_video(pixel_store, digits, tmp_path):
    meta = TargetStore(pixel_store).meta
    losses = {}
    for mode in ("video", "pixels"):
        cfg = tiny_config(f"data.stage2_input={mode}")
        run = tmp_path / mode
        train_student(cfg, run, lambda state: TargetStream(cfg, list_shards(digits), batch_size=4, store=pixel_store).at(state),
                      teacher_width=96, store_meta=meta, progress=False)
        losses[mode] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses["pixels"] == losses["video"] and len(losses["video"]) == 4


def test_pixels_from_a_store_without_a_cache_are_refused(store_fp32, digits):
    with pytest.raises(ValueError, match=r"has no pixel cache: extract it with extract.pixel_cache=true"):
        TargetStream(tiny_config(PIXELS), list_shards(digits), batch_size=4, store=store_fp32)


def test_a_corrupt_pixel_blob_stops_stage_2(pixel_store, digits, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(pixel_store, store)
    (pixels,) = store.glob("targets/shard-000000.zarr/pixels.bin")
    data = bytearray(pixels.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pixels.write_bytes(bytes(data))
    dataset = TargetStream(tiny_config(PIXELS), list_shards(digits), batch_size=16, store=str(store))
    with pytest.raises(Exception, match="shard-000000"):
        for g in range(dataset.batches_per_epoch):
            dataset.batch(g)


def test_make_student_from_the_pixel_cache_needs_no_data_folder(pixel_store, digits, tmp_path):
    """With the pixel cache the store alone feeds stage 2: its shard list comes from the store, so
    the source shards' folder may be moved away (as make student ARGS="data.stage2_input=pixels")."""
    cfg = tiny_config(PIXELS)
    losses = {}
    moved = tmp_path / "moved"
    for name in ("present", "gone"):
        if name == "gone":
            shutil.move(digits, moved)
        try:
            run_student(cfg, digits, pixel_store, tmp_path / name, progress=False)
        finally:
            if moved.exists():
                shutil.move(str(moved), digits)
        losses[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert losses["gone"] == losses["present"] and len(losses["present"]) == 4
