"""Students at scale: loader position and shuffle buffer, torchrun data parallelism, any student size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.runs import run_student
from pipeline.shards import list_shards
from pipeline.loaders import ClipStream, LoaderStateMismatch, TargetStream, buffer_shuffle
from salt.seeds import sample_rng
from salt.checkpoint import read_meta
from tests.conftest import FAST, ROOT, tiny_config


def test_buffer_shuffle_is_a_seeded_permutation_that_moves_items_only_within_reach() -> None:
    items = list(range(100))
    out = buffer_shuffle(items, 8, sample_rng(0, "", 0, "t"))
    assert sorted(out) == items and out != items
    assert out == buffer_shuffle(items, 8, sample_rng(0, "", 0, "t"))
    # an item leaves the buffer no earlier than (size - 1) places before it arrived
    assert all(pos >= item - 7 for pos, item in enumerate(out))
    assert buffer_shuffle(items, 1, sample_rng(0, "", 0, "t")) == items


def test_shuffle_buffer_mixes_shards_in_a_batch(digits) -> None:
    shards = list_shards(digits)  # 2 shards of 8

    def shards_per_batch(buffer: int) -> list[int]:
        ds = ClipStream(tiny_config(f"data.shuffle_buffer={buffer}"), shards, batch_size=4)
        return [len({s for s, _ in ds.epoch_samples(e)[i : i + 4]}) for e in range(3) for i in range(0, 16, 4)]

    assert set(shards_per_batch(0)) == {1}  # without a buffer a batch comes from one shard
    assert max(shards_per_batch(16)) == 2


def test_loader_state_resumes_at_the_exact_next_batch(store_fp32, digits) -> None:
    cfg = tiny_config()
    make = lambda: TargetStream(cfg, list_shards(digits), batch_size=4, store=store_fp32)
    whole = make()
    state = whole.batch(5)["loader_state"]  # epoch 1, second batch
    assert state["next_batch"] == 6
    resumed = iter(make().at(json.loads(json.dumps(state))))  # as it comes back from checkpoint.json
    for g in (6, 7, 8):
        a, b = next(resumed), whole.batch(g)
        assert a["index"] == g and a["keys"] == b["keys"] and torch.equal(a["targets"], b["targets"])

    other = TargetStream(cfg, list_shards(digits), batch_size=2, store=store_fp32)
    with pytest.raises(LoaderStateMismatch, match=r"loader had batch_size=4 but this run has batch_size=2"):
        other.load_state_dict(state)


def test_student_checkpoint_carries_the_loader_state(store_fp32, digits, tmp_path) -> None:
    run_student(tiny_config(), digits, store_fp32, tmp_path / "s", stop_after=3, progress=False)
    loader = read_meta(tmp_path / "s")["loader"]
    assert loader["next_batch"] == 3 and loader["batch_size"] == 4 and loader["samples"] == 16


def test_a_smaller_student_learns_from_a_wider_teacher(store_fp32, digits, tmp_path) -> None:
    cfg = tiny_config("model.student=vit_cpu_xs", "student.optim.steps=2")
    summary = run_student(cfg, digits, store_fp32, tmp_path / "xs", progress=False)
    meta = read_meta(tmp_path / "xs")
    assert summary["step"] == 2 and meta["encoder"] == {"size": "vit_cpu_xs", "width": 64}
    assert meta["teacher"]["width"] == 96  # the predictor's head is the store's teacher width


@pytest.mark.parametrize("stage", ["teacher", "student"])
def test_two_torchrun_ranks_see_each_sample_once_per_epoch(stage, store_fp32, digits, tmp_path) -> None:
    """2 gloo ranks, global batch 6 (3 each), one epoch of 16 samples: 8 per rank, 2 batches each -> 12 trained,
    4 left out, fewer than one global batch (6)."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", f"jobs.{stage}", "--", "--data", digits, "--run", str(run), "--no-progress", *FAST,
           f"{stage}.optim.batch_size=6", f"{stage}.optim.steps=2", f"{stage}.log_samples=true"]
    if stage == "student":
        cmd += ["--store", store_fp32]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run / stage
    seen = []
    for rank in range(2):
        lines = [json.loads(l) for l in (out / f"samples.rank{rank}.jsonl").read_text().splitlines()]
        assert [l["step"] for l in lines] == [1, 2]
        seen += [k for l in lines for k in l["keys"]]
    everything = {f"train-{i:06d}" for i in range(16)}
    assert len(seen) == len(set(seen)) == 12 and set(seen) <= everything
    assert len(everything - set(seen)) < 2 * 3
    assert read_meta(out)["step"] == 2 and read_meta(out)["loader"]["world_size"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 logs, once per step


def test_a_student_run_refuses_to_resume_on_another_teachers_store(store_fp32, digits, tmp_path) -> None:
    import shutil

    from salt.train.student import TeacherMismatchError

    other = tmp_path / "other-store"
    shutil.copytree(store_fp32, other)
    meta = json.loads((other / "store.json").read_text())
    meta["teacher"]["sha256"] = "0" * 64  # stands for a retrained teacher of the same size
    (other / "store.json").write_text(json.dumps(meta))
    run_student(tiny_config("student.optim.steps=1"), digits, store_fp32, tmp_path / "s", progress=False)
    with pytest.raises(TeacherMismatchError, match=r"teacher with sha256='[0-9a-f]{64}', but this store's teacher has sha256='0{64}'"):
        run_student(tiny_config("student.optim.steps=2"), digits, str(other), tmp_path / "s", progress=False)


def test_the_scale_bench_writes_a_valid_dataset_and_store(tmp_path) -> None:
    """experiments/bench_scale.py writes its 4,000-shard stores directly, not by extraction: what
    it writes must be a dataset with its index and a store that verifies and trains."""
    from experiments import bench_scale
    from pipeline.dataset_index import load_index
    from pipeline.store.verify import verify_store

    cfg = tiny_config()
    video = bench_scale.tiny_video()
    data = bench_scale.write_dataset(str(tmp_path / "data"), 4, video)
    store = bench_scale.write_store(str(tmp_path / "store"), data, cfg, 4, video)
    assert sorted(load_index(str(tmp_path / "data" / "train"))) == [f"shard-{i:06d}" for i in range(4)]
    assert verify_store(store) == []
    batch = next(iter(TargetStream(cfg, list_shards(data), batch_size=4, store=store)))
    assert batch["keys"] == ["clip"] * 4  # one clip per shard, the same in each: its hash checked on every read
