"""The whole path on real components: decord, Ray Data, Zarr, Arrow, torch."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from torch import nn

from pipeline.extract import extract_targets
from experiments.runs import run_student
from pipeline.shards import list_shards
from pipeline.loaders import ClipHashMismatch, ClipStream, TargetStream, make_loader
from pipeline.store.write import ExtractedRow, commit_shard, rebuild_tables
from pipeline.store.layout import StoreMismatchError, committed_shards, shard_dir
from pipeline.store.read import TargetStore
from pipeline.store.provenance import check_compatible
from pipeline.store.verify import verify_store
from salt.storage import StorageFormat
from salt.checkpoint import save_checkpoint
from salt.optim import make_optimizer
from salt.train.loop import TrainState, fit, masked_prediction_loss, prepare_batch
from salt.train.student import build_student_state, cached_targets, online_targets, train_student
from salt.models.teachers import load_teacher
from tests.conftest import assert_same_batch, tiny_config


def store_contents(store: str) -> dict:
    out = {}
    for shard in committed_shards(store):
        manifest = pq.read_table(Path(shard_dir(store, shard)) / "manifest.parquet").to_pylist()
        array = zarr.open_array(str(Path(shard_dir(store, shard))), mode="r")[:]
        out[shard] = (manifest, array)
    return out


def assert_same_store(a: str, b: str) -> None:
    ca, cb = store_contents(a), store_contents(b)
    assert ca.keys() == cb.keys() and ca
    for shard in ca:
        assert ca[shard][0] == cb[shard][0], f"manifests of {shard} differ"
        assert np.array_equal(ca[shard][1], cb[shard][1]), f"arrays of {shard} differ"


def test_store_describes_itself(store_fp32, digits):
    store = TargetStore(store_fp32)
    meta = store.meta
    assert meta["teacher"]["width"] == 96 and len(meta["teacher"]["sha256"]) == 64
    assert meta["geometry"]["num_tokens"] == 128 and meta["geometry"]["grid"] == [8, 4, 4]
    assert meta["storage"]["dtype"] == "float32" and meta["decoder"].startswith("decord ")
    assert [s["name"] for s in meta["source"]["shards"]] == ["shard-000000", "shard-000001"]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in meta["source"]["shards"])
    manifest = pq.read_table(Path(store_fp32) / "manifest.parquet")
    assert manifest.num_rows == 16 and len(set(manifest.column("key").to_pylist())) == 16
    assert pq.read_table(Path(store_fp32) / "errors.parquet").num_rows == 0
    assert (Path(store_fp32) / "config.yaml").is_file()
    row = store.latents("shard-000000", 0)
    assert row.shape == (128, 96) and row.dtype == np.float32 and np.isfinite(row).all()


def test_extraction_twice_gives_identical_stores(store_fp32, digits, teacher_dir, tmp_path):
    again = str(tmp_path / "again")
    extract_targets(tiny_config("extract.dtype=float32"), data=digits, teacher=teacher_dir, store=again, progress=False)
    assert_same_store(store_fp32, again)


def test_rerun_skips_committed_shards_and_resumes_missing_ones(store_fp32, digits, teacher_dir, tmp_path):
    cfg = tiny_config("extract.dtype=float32")
    summary = extract_targets(cfg, data=digits, teacher=teacher_dir, store=store_fp32, progress=False)
    assert summary["teacher_forward_samples"] == 0 and summary["shards_extracted_now"] == 0
    # a job killed after one shard: one committed shard plus a half-written temporary folder
    partial = tmp_path / "partial"
    shutil.copytree(store_fp32, partial)
    shutil.rmtree(Path(shard_dir(partial, "shard-000001")))
    (partial / "targets" / ".shard-000001.zarr.tmp-deadbeef").mkdir()
    summary = extract_targets(cfg, data=digits, teacher=teacher_dir, store=str(partial), progress=False)
    assert summary["shards_extracted_now"] == 1 and summary["teacher_forward_samples"] == 8
    assert not list((partial / "targets").glob(".*tmp-*"))
    assert_same_store(store_fp32, str(partial))


def test_extraction_in_process_writes_the_store_ray_writes(store_fp32, digits, teacher_dir, tmp_path):
    """Without Ray (make gpu-check's chain on a node that has none): the actor's and the commit
    task's own code run in this process and give the same manifests and arrays."""
    local = str(tmp_path / "local")
    summary = extract_targets(tiny_config("extract.dtype=float32"), data=digits, teacher=teacher_dir, store=local,
                              progress=False, in_process=True)
    assert summary["teacher_forward_samples"] == 16 and summary["ray_address"] is None
    assert_same_store(store_fp32, local)
    assert verify_store(local) == []


def test_store_of_another_job_is_refused(store_fp32, digits, teacher_dir):
    with pytest.raises(StoreMismatchError, match=r"storage\.dtype: store has 'float32', this job has 'float16'"):
        extract_targets(tiny_config("extract.dtype=float16"), data=digits, teacher=teacher_dir, store=store_fp32, progress=False)


def relative_token_error(stored: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Per token: |stored - live| / |live| (vector norms over the width), [B, N]."""
    return (stored - live).norm(dim=-1) / live.norm(dim=-1)


def test_cached_targets_equal_online_teacher(store_fp32, digits, teacher_dir):
    """Every stored token of every sample equals the live teacher's (fp32 store), and so does the loss."""
    cfg = tiny_config()
    dataset = TargetStream(cfg, list_shards(digits), batch_size=4, store=store_fp32)
    teacher = load_teacher(teacher_dir, cfg)
    seen = set()
    for g in range(dataset.batches_per_epoch):
        batch = prepare_batch(dataset.batch(g), "cpu", cfg.data)
        with torch.no_grad():
            live = teacher(batch["clips"])
        assert relative_token_error(batch["targets"], live).max() <= 1e-5
        seen |= set(batch["keys"])
    assert len(seen) == 16  # every sample of the store
    batch = prepare_batch(dataset.batch(0), "cpu", cfg.data)
    state = build_student_state(cfg, teacher_width=96)
    with torch.no_grad():
        cached = masked_prediction_loss(state.encoder, state.predictor, batch["clips"], batch["masks"], cached_targets(batch))
        online = masked_prediction_loss(state.encoder, state.predictor, batch["clips"], batch["masks"], online_targets(teacher)(batch))
        assert cached.item() > 0
        assert abs(cached.item() - online.item()) / abs(online.item()) <= 1e-5
        # why the loss alone is not enough: a token no mask selects can be wrong without moving it
        never_target = sorted(set(range(batch["targets"].shape[1])) - {int(i) for m in batch["masks"] for i in m.tgt_idx[0][m.tgt_valid[0]]})
        wrong = batch["targets"].clone()
        wrong[0, never_target] += torch.randn(len(never_target), wrong.shape[-1])
        blind = masked_prediction_loss(state.encoder, state.predictor, batch["clips"], batch["masks"], cached_targets(batch | {"targets": wrong}))
        assert never_target and blind.item() == cached.item()
        assert relative_token_error(wrong, teacher(batch["clips"])).max() > 1e-2


def test_student_trains_with_the_teacher_checkpoint_deleted(digits, teacher_dir, ray_local, tmp_path, store_fp32):
    from jobs import student

    teacher_copy = tmp_path / "run" / "teacher"
    shutil.copytree(teacher_dir, teacher_copy)
    store = tmp_path / "run" / "targets"
    extract_targets(tiny_config(), data=digits, teacher=str(teacher_copy), store=str(store), progress=False)
    shutil.rmtree(teacher_copy)  # stage 2 must not need it
    summary = student.main(["--data", digits, "--run", str(tmp_path / "run"), "--no-progress", *tiny_config_args()])
    assert summary["step"] == 4 and np.isfinite(summary["final_loss"])
    lines = [json.loads(l) for l in (tmp_path / "run" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    # the default fp16 store holds half the bytes of fp32 for the same latents, within fp16 rounding
    f16 = zarr.open_array(str(Path(shard_dir(store, "shard-000000"))), mode="r")[:]
    f32 = zarr.open_array(str(Path(shard_dir(store_fp32, "shard-000000"))), mode="r")[:]
    assert f16.dtype == np.float16 and np.allclose(f16.astype(np.float32), f32, rtol=1e-3, atol=1e-3)


def tiny_config_args() -> list[str]:
    from tests.conftest import FAST

    return FAST


def test_student_refuses_a_store_for_other_clips(store_fp32):
    store = TargetStore(store_fp32)
    check_compatible(store.meta, tiny_config(), store_fp32)
    with pytest.raises(StoreMismatchError, match=r"preprocessing\.seed=0 but this run has preprocessing\.seed=5"):
        check_compatible(store.meta, tiny_config("data.seed=5"), store_fp32)
    with pytest.raises(StoreMismatchError, match=r"geometry\.crop_size=32 but this run has geometry\.crop_size=64"):
        check_compatible(store.meta, tiny_config("data.crop_size=64"), store_fp32)


def test_any_masking_config_trains_on_any_store(store_fp32, digits, tmp_path):
    """Masks are drawn by the student, not stored: a mask sweep reuses one store."""
    other_masks = tiny_config(
        "masking.generators=[{num_blocks: 3, spatial_scale: 0.3}, {num_blocks: 1, spatial_scale: 0.5}]",
        "masking.fresh_per_epoch=false",
        "student.optim.steps=2",
    )
    assert TargetStore(store_fp32).meta.get("masking") is None
    summary = run_student(other_masks, digits, store_fp32, tmp_path / "student", progress=False)
    assert summary["step"] == 2 and np.isfinite(summary["final_loss"])


def test_clip_hash_mismatch_stops_stage_2(store_fp32, digits, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(store_fp32, tampered)
    path = Path(shard_dir(tampered, "shard-000000")) / "manifest.parquet"
    table = pq.read_table(path).to_pylist()
    for row in table:
        row["clip_hash"] = "0" * 64
    pq.write_table(pq.read_table(path).from_pylist(table, schema=pq.read_table(path).schema), path)
    (tampered / "manifest.parquet").unlink()  # else a reader takes shard-000000's rows from the store-level copy
    dataset = TargetStream(tiny_config(), list_shards(digits), batch_size=4, store=str(tampered))
    with pytest.raises(ClipHashMismatch, match=r"clip hash mismatch for key 'train-0000\d\d' view 0 of shard shard-000000"):
        for g in range(4):
            dataset.batch(g)


def test_batches_do_not_depend_on_loader_workers(store_fp32, digits):
    cfg = tiny_config()

    def first_batches(workers: int, n: int = 3) -> list[dict]:
        loader = make_loader(TargetStream(cfg, list_shards(digits), batch_size=4, store=store_fp32), workers)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    for a, b in zip(first_batches(0), first_batches(2)):
        assert a["index"] == b["index"]
        assert_same_batch(a, b)


def test_ranks_split_an_epoch_without_overlap(digits):
    cfg = tiny_config()
    shards = list_shards(digits)
    ranks = [ClipStream(cfg, shards, batch_size=2, rank=r, world_size=2) for r in range(2)]
    seen = [{k for _, k in ds.epoch_samples(0)} for ds in ranks]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"train-{i:06d}" for i in range(16)}
    assert ranks[0].epoch_samples(1) != ranks[0].epoch_samples(0)  # reshuffled each epoch
    # a sample is the same whichever rank loads it
    shard, key = ranks[1].epoch_samples(0)[0]
    (a,), (b,) = ranks[0].load_samples(shard, key, epoch=0), ranks[1].load_samples(shard, key, epoch=0)
    assert torch.equal(a["crop"], b["crop"]) and a["flip"] == b["flip"]
    assert all(np.array_equal(x.target, y.target) for x, y in zip(a["masks"], b["masks"]))


def test_student_resume_equals_uninterrupted_run(store_fp32, digits, tmp_path):
    cfg = tiny_config()
    shards = list_shards(digits)
    meta = TargetStore(store_fp32).meta

    def batches(state: dict | None):
        return TargetStream(cfg, shards, batch_size=4, store=store_fp32).at(state)

    def losses(run: Path) -> list[float]:
        return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]

    whole, split = tmp_path / "whole", tmp_path / "split"
    train_student(cfg, whole, batches, teacher_width=96, store_meta=meta, progress=False)
    train_student(cfg, split, batches, teacher_width=96, store_meta=meta, progress=False, stop_after=2)
    assert len(losses(split)) == 2
    train_student(cfg, split, batches, teacher_width=96, store_meta=meta, progress=False)
    assert losses(split) == losses(whole) and len(losses(whole)) == 4


def test_resume_places_the_model_before_it_loads_the_optimizer_state(tmp_path):
    """torch's Optimizer.load_state_dict puts each state tensor on its parameter's device, so the
    model must be on the training device first: loaded the other way round, a CUDA run's Adam
    moments stay on the CPU and its first step fails. A CPU has no second device to show that
    on, so this watches the order; tests/test_gpu.py resumes on CUDA."""
    cfg = tiny_config()

    def state() -> TrainState:
        torch.manual_seed(0)
        encoder, predictor = nn.Linear(4, 4), nn.Linear(4, 4)
        return TrainState(encoder, predictor, make_optimizer([encoder, predictor], cfg.student.optim))

    trained = state()
    trained.predictor(trained.encoder(torch.randn(2, 4))).sum().backward()
    trained.optimizer.step()
    save_checkpoint(tmp_path, trained.modules(), trained.optimizer, {"step": 1})
    resumed, events = state(), []

    def spy(name, method):
        def call(*args, **kwargs):
            events.append(name)
            return method(*args, **kwargs)
        return call

    for name, module in resumed.modules().items():
        module.to = spy(f"{name}.to", module.to)
    resumed.optimizer.load_state_dict = spy("optimizer.load_state_dict", resumed.optimizer.load_state_dict)
    fit(resumed, tmp_path, lambda loader_state: [], cached_targets, cfg.student, data=cfg.data, checkpoint_meta={},
        stop_after=0, progress=False)
    assert events == ["encoder.to", "predictor.to", "optimizer.load_state_dict"]
    assert resumed.step == 1 and resumed.optimizer.state[resumed.encoder.weight]["exp_avg"].device == resumed.encoder.weight.device


def test_inspect_reports_the_store(store_fp32, capsys):
    from jobs import inspect_store

    summary = inspect_store.main([store_fp32, "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == summary["samples"] == 16 and printed["errors"] == 0
    assert printed["storage"]["dtype"] == "float32" and printed["bytes"] > 16 * 128 * 96 * 4
    assert printed["teacher"]["size"] == "vit_cpu_s" and printed["missing_shards"] == []


def test_two_views_per_clip_are_stored_and_both_used(digits, teacher_dir, ray_local, tmp_path):
    store = str(tmp_path / "views")
    cfg = tiny_config("extract.views_per_clip=2")
    summary = extract_targets(cfg, data=digits, teacher=teacher_dir, store=store, progress=False)
    assert summary["samples"] == 32
    rows = pq.read_table(Path(store) / "manifest.parquet").to_pylist()
    by_key: dict[str, list[dict]] = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r)
    assert len(by_key) == 16 and all(sorted(r["view"] for r in v) == [0, 1] for v in by_key.values())
    assert all((v[0]["crop"], v[0]["frame_indices"], v[0]["flip"]) != (v[1]["crop"], v[1]["frame_indices"], v[1]["flip"]) for v in by_key.values())
    target_store = TargetStore(store)
    first = by_key["train-000000"]
    a, b = (target_store.latents(r["shard"], r["row"]) for r in first)
    assert not np.array_equal(a, b)
    # the student reads view 0 in its first pass over the data and view 1 in its second
    dataset = TargetStream(cfg, list_shards(digits), batch_size=4, store=store)
    assert dataset.batches_per_epoch == 4
    assert set(dataset.batch(0)["views"]) == {0} and set(dataset.batch(4)["views"]) == {1}

    # one decode serves both views (data.views_per_decode=2): a batch holds 2 clips x 2 views, each
    # sample exactly what a one-view decode gives, and an epoch visits every clip once
    two = TargetStream(tiny_config("extract.views_per_clip=2", "data.views_per_decode=2"), list_shards(digits), batch_size=4, store=store)
    assert two.batches_per_epoch == 8
    batch = two.batch(0)
    assert batch["keys"][0] == batch["keys"][1] and batch["keys"][2] == batch["keys"][3] and batch["views"] == [0, 1, 0, 1]
    for i, (key, view) in enumerate(zip(batch["keys"], batch["views"])):
        shard = next(s for s, k in dataset.epoch_samples(0) if k == key)
        (single,) = dataset.load_samples(shard, key, epoch=view)  # epoch v reads view v here
        assert torch.equal(batch["crops"][i], single["crop"]) and torch.equal(batch["targets"][i], single["targets"])
        assert bool(batch["flips"][i]) == single["flip"]
    assert sorted(k for g in range(8) for k in two.batch(g)["keys"][::2]) == sorted(by_key)
    with pytest.raises(ValueError, match="not a multiple of data.views_per_decode=2"):
        TargetStream(tiny_config("data.views_per_decode=2"), list_shards(digits), batch_size=3, store=store)
    with pytest.raises(ValueError, match="holds 2 view"):
        TargetStream(tiny_config("data.views_per_decode=3"), list_shards(digits), batch_size=3, store=store)


def drop_view(store: str, shard: str, key: str, view: int) -> None:
    """Re-commit a shard as extraction would have, had (key, view) failed to decode."""
    target_store = TargetStore(store)
    kept = []
    for (k, v), r in sorted(target_store.manifest(shard).items(), key=lambda item: item[1]["row"]):
        if (k, v) != (key, view):
            kept.append(ExtractedRow(k, v, r["clip_hash"], tuple(r["frame_indices"]), tuple(r["crop"]), r["flip"],
                                     target_store.latents(shard, r["row"])))
    shutil.rmtree(shard_dir(store, shard))
    commit_shard(store, shard, kept, [(key, view, "VideoDecodeError: view failed")],
                 fmt=StorageFormat(dtype="float16"), store_id=target_store.meta["store_id"])
    rebuild_tables(store)


def test_a_clip_with_a_failed_view_reuses_its_stored_view(digits, teacher_dir, ray_local, tmp_path, caplog):
    """views_per_clip=2 where one clip's view 1 failed and view 0 did not: every epoch still trains."""
    store = str(tmp_path / "views")
    cfg = tiny_config("extract.views_per_clip=2")
    extract_targets(cfg, data=digits, teacher=teacher_dir, store=store, progress=False)
    drop_view(store, "shard-000000", "train-000003", 1)
    assert verify_store(store) == []
    with caplog.at_level(logging.WARNING):
        dataset = TargetStream(cfg, list_shards(digits), batch_size=4, store=store)
    assert "1 clip(s) of store" in caplog.text and "fewer than 2 stored views" in caplog.text
    views = {}
    for g in range(3 * dataset.batches_per_epoch):  # epochs 0, 1, 2: views 0, 1, 0
        batch = dataset.batch(g)
        for k, v in zip(batch["keys"], batch["views"]):
            views.setdefault(k, []).append(v)
    assert views["train-000003"] == [0, 0, 0]
    assert all(v == [0, 1, 0] for k, v in views.items() if k != "train-000003") and len(views) == 16


def test_extraction_ships_uint8_crops_that_become_the_loaders_clip(digits):
    """Decode tasks hand the teacher's actors the crop box as uint8 (fewer bytes than the float32
    clip whenever the box has fewer than 4x the model input's pixels); the actor's resize and
    normalisation give exactly the clip the stage-2 loader makes from the same video."""
    from pipeline.extract import decode_shard
    from pipeline.shards import iter_shard
    from pipeline.video import load_clip
    from salt.clips import resize_flip_normalise
    from salt.config import to_dict

    cfg = tiny_config()
    shard = list_shards(digits)[0]
    rows = list(decode_shard({"path": shard, "shard": "s"}, data_cfg=to_dict(cfg.data), views=2))
    videos = {s.key: s.video for s in iter_shard(shard)}
    assert len(rows) == 2 * len(videos)
    for r in rows:
        top, left, h, w = r["crop"]
        assert r["frames"].dtype == np.uint8 and r["frames"].shape == (cfg.data.frames, h, w, 3)
        clip, digest = load_clip(videos[r["key"]], cfg.data, key=r["key"], view=r["view"])
        assert digest == r["clip_hash"]
        assert torch.equal(resize_flip_normalise(torch.from_numpy(r["frames"]), bool(r["flip"]), cfg.data), clip)


def teacher_and_student_clips(cfg, teacher_dir: str, digits: str, store: str, work: Path) -> tuple[dict, dict]:
    """Per (key, view): the clip extraction's actor code gives its teacher (in process, on the
    default device), and the clip a student's training step trains on (fit, same device)."""
    from pipeline.extract import decode_shard, numpy_batch, teacher_forward
    from salt.config import to_dict
    from salt.devices import default_device

    teacher = load_teacher(teacher_dir, cfg, default_device())
    fed: list[torch.Tensor] = []
    teacher.register_forward_pre_hook(lambda module, args: fed.append(args[0].clone()))
    rows = [r for shard in list_shards(digits)
            for r in decode_shard({"path": shard, "shard": Path(shard).stem}, data_cfg=to_dict(cfg.data), views=1)]
    teacher_forward(teacher, cfg, numpy_batch(rows), default_device())
    teacher_clips = dict(zip(((r["key"], r["view"]) for r in rows), torch.cat(fed)))
    student_clips = {}

    def recording_targets(batch: dict) -> torch.Tensor:
        student_clips.update(zip(zip(batch["keys"], batch["views"]), batch["clips"].clone()))
        return cached_targets(batch)

    state = build_student_state(cfg, teacher_width=96)
    fit(state, work / "student", lambda loader_state: TargetStream(cfg, list_shards(digits), batch_size=4, store=store),
        recording_targets, cfg.student, data=cfg.data, checkpoint_meta={}, progress=False)
    return teacher_clips, student_clips


@pytest.mark.parametrize("stage2_input", ["video", "pixels"])
def test_a_student_trains_on_the_clips_extraction_fed_its_teacher(stage2_input, pixel_store, digits, teacher_dir, tmp_path):
    """The resize runs in the training step (prepare_batch) and in the teacher's actor, by one
    function: every (key, view) clip a student's step trains on, from video or from the pixel
    cache, is byte for byte the clip extraction's actor gave its teacher (here both on the CPU)."""
    cfg = tiny_config(f"data.stage2_input={stage2_input}")
    teacher_clips, student_clips = teacher_and_student_clips(cfg, teacher_dir, digits, pixel_store, tmp_path)
    assert student_clips.keys() == teacher_clips.keys() and len(student_clips) == 16
    for sample, clip in student_clips.items():
        assert torch.equal(clip, teacher_clips[sample]), sample
